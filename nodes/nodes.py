"""The DATEncoder nodes (V3 schema). Each node's ``execute`` takes exactly its schema's input ids."""

from __future__ import annotations

import logging
import os
import time

import comfy.model_management
import comfy.model_patcher
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import ComfyExtension, io
from typing_extensions import override

from ..datencoder_core import (WORD_START_TUNING, Concept, DATEncoder, LoRAConfig, TuningConfig,
                               architecture_fingerprint, load_encoder, personalize, personalize_from_word)
from ..datencoder_core.checkpoint import check_base_model, demo_weights
from . import compat, paths
from .backend import ComfyUIBackend
from .conditioning import encode_with_concepts, placeholder_problem, prompt_problem
from .patching import model_fingerprint, patch_model

ConceptType = io.Custom("CONCEPT")
ConceptListType = io.Custom("CONCEPT_LIST")  # a tuple of (placeholder, Concept), from Concept List
EncoderType = io.Custom("DATENCODER")
logger = logging.getLogger("datencoder")
# What the editor's node search also matches (ComfyUI 0.30 and newer; compat.schema_options).
SEARCH_ALIASES = ["DATEncoder", "personalize", "personalization", "one photo", "subject", "textual inversion"]
UI_KEY = "datencoder"  # the nodes' structured ui output (``shown``); the pack's name keeps it apart from ComfyUI's keys


def show_text(node_id: str | None, text: str) -> None:
    """Put ``text`` on node ``node_id`` in the editor: ComfyUI's progress text, which the editor draws under
    the node's widgets and keeps after the run (it draws a V3 node's ``ui`` text only for ComfyUI's own
    preview nodes). The nodes also return the text as ``ui`` output (``shown``, beside the structured
    record that code reads), with CLIP's end-of-word mark in tokens (``cat</w>``); the editor renders the
    progress text as HTML, which would hide that mark's angle brackets and what they enclose, so it is
    dropped here: the editor shows ``cat``."""
    if node_id is not None:
        from server import PromptServer

        PromptServer.instance.send_progress_text(text.replace("</w>", ""), node_id)


def shown(node_id: str | None, text: str, record: dict, *outputs) -> io.NodeOutput:
    """``outputs`` with ``text`` for people (shown on the node, ``show_text``) and ``record`` for code: the
    node's ``ui`` is ``{"text": [text], "datencoder": [record]}``, which the editor's ``executed`` event,
    /history and the cache all carry. ``record`` holds only JSON values (a saved workflow's run is read
    back from JSON); scripts and the editor's extension read it, never the text, which may change."""
    show_text(node_id, text)
    return io.NodeOutput(*outputs, ui={"text": [text], UI_KEY: [record]})


def concept_record(concept: Concept) -> dict:
    """What the ``ui`` record of a node that outputs a concept says about it (``init_word``: only for one
    made without an encoder, whose encoder_id is "none")."""
    extra = {} if concept.init_word is None else {"init_word": concept.init_word}
    return {"token": concept.token, "token_id": concept.token_id, "encoder_id": concept.encoder_id, **extra}


def _schema(**fields) -> io.Schema:
    """``io.Schema`` with the pack's category and search aliases."""
    return io.Schema(category="DATEncoder", **fields, **compat.schema_options(search_aliases=SEARCH_ALIASES))


def _node_id(cls) -> str | None:
    return cls.hidden.unique_id if cls.hidden is not None else None


class LoadedEncoder:
    """DATENCODER: the encoder in a ModelPatcher, so that ComfyUI's model management moves it to the
    GPU with the models it runs beside and offloads it after; ``encoder_id`` names its weights, ``path``
    the file they were loaded from; ``note``, shown beside what it makes, says when its weights are a demo
    file's (``checkpoint.demo_weights``)."""

    def __init__(self, encoder: DATEncoder, encoder_id: str, path: str | None = None, note: str | None = None):
        self.encoder_id, self.path, self.note = encoder_id, path, note
        self.patcher = comfy.model_patcher.ModelPatcher(encoder, load_device=comfy.model_management.get_torch_device(),
                                                        offload_device=comfy.model_management.unet_offload_device())

    @property
    def encoder(self) -> DATEncoder:
        return self.patcher.model

    def check_base_model(self, model) -> None:
        """Refuse an encoder made for another base model than ``model`` (``checkpoint.check_base_model``)."""
        where = self.encoder_id if self.path is None else f"{self.path} ({self.encoder_id})"
        made_for = architecture_fingerprint(self.encoder.sites, self.encoder.config.token_dim)
        check_base_model(f"the encoder {where}", made_for, "this MODEL", model_fingerprint(model))


class DATEncoderLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _schema(
            node_id="DATEncoderLoader", display_name="DATEncoder Loader",
            description="Loads DATEncoder weights (.safetensors) from models/datencoder/.",
            inputs=[io.Combo.Input("encoder_name", options=folder_paths.get_filename_list(paths.ENCODERS),
                                   tooltip="DATEncoder weights in models/datencoder/, trained for your SD1.x "
                                           "checkpoint")],
            outputs=[EncoderType.Output(tooltip="the encoder, for Personalize Concept")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, encoder_name) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise(paths.ENCODERS, encoder_name)
        encoder, encoder_id = load_encoder(path)
        weights = demo_weights(path)
        note = f"demo encoder ({weights}): not a result" if weights else None
        return shown(_node_id(cls), "\n".join([f"encoder {encoder_id}", *([note] if note else [])]),
                     {"encoder_id": encoder_id}, LoadedEncoder(encoder, encoder_id, path, note))


def _tuning_inputs(defaults: TuningConfig, lr_tooltip: str, seed_tooltip: str) -> list:
    """The tuning inputs both Personalize nodes end with: lr, alpha_blend, timesteps_per_step, seed."""
    return [io.Float.Input("lr", default=defaults.lr, min=1e-5, max=1e-1, step=1e-4, tooltip=lr_tooltip),
            io.Float.Input("alpha_blend", default=defaults.alpha_blend, min=0.0, max=1.0, step=0.01,
                           tooltip="the dual-path blend WHILE TUNING, 0-1 (the paper: 0.25): the weight of the "
                                   "concept's path. Sampling uses Dual-Path Model Patch's own alpha_blend"),
            io.Int.Input("timesteps_per_step", default=defaults.timesteps_per_step, min=1, max=32,
                         tooltip="random diffusion timesteps per tuning step (its mini-batch), 1-32 (default 4)"),
            io.Int.Input("seed", default=0, min=0, max=2**63 - 1, control_after_generate="fixed",
                         tooltip=seed_tooltip)]


class DATEncoderPersonalize(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        defaults = TuningConfig()
        return _schema(
            node_id="DATEncoderPersonalize", display_name="Personalize Concept",
            description="From one photo (or a batch of photos of the same concept): one encoder forward, "
                        "then a few tuning steps of the concept's word embedding and LoRA. steps = 0: encoder only.",
            inputs=[io.Model.Input("model", tooltip="the SD1.x MODEL to personalize (Load Checkpoint); it is "
                                                    "never changed"),
                    io.Clip.Input("clip", tooltip="the checkpoint's CLIP (SD1.x text encoder); CLIP Set Last "
                                                  "Layer is honoured"),
                    io.Vae.Input("vae", tooltip="the checkpoint's VAE: it encodes the photo for the UNet"),
                    io.ClipVision.Input("clip_vision", tooltip="CLIP-ViT-H-14 from Load CLIP Vision (the "
                                                               "IP-Adapter file): the encoder's image features"),
                    EncoderType.Input("datencoder", tooltip="the encoder, from DATEncoder Loader"),
                    io.Image.Input("image", tooltip="one photo of the concept, or a batch of photos of the same "
                                                    "concept; any size, alpha and grey are fine"),
                    io.Int.Input("steps", default=defaults.steps, min=0, max=100,
                                 tooltip="tuning steps after the encoder's prediction, 0-100 (the paper: 12; "
                                         "0 = the encoder's prediction only)"),
                    *_tuning_inputs(defaults, lr_tooltip="AdamW learning rate of the tuning steps, 1e-5 to 0.1 (the "
                                                         "paper: 2e-3)",
                                    seed_tooltip="seed of the tuning timesteps and noise: the same photo and seed "
                                                 "give the same concept. Keep it fixed, so a new Run reuses the "
                                                 "concept")],
            outputs=[ConceptType.Output(tooltip="the concept: its word embedding v*, LoRA offsets and nearest "
                                                "word, for Dual-Path Model Patch, Apply Concept Token, Save Concept")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip, vae, clip_vision, datencoder, image, steps, lr, alpha_blend,
                timesteps_per_step, seed) -> io.NodeOutput:
        config = TuningConfig(steps=steps, lr=lr, alpha_blend=alpha_blend, timesteps_per_step=timesteps_per_step,
                              seed=seed)

        def make(progress, interrupt) -> Concept:
            backend = ComfyUIBackend(model, clip, vae, clip_vision, extra_models=[datencoder.patcher])  # loads nothing
            datencoder.check_base_model(model)
            return personalize(backend, datencoder.encoder, datencoder.encoder_id, image, config, progress=progress,
                               interrupt=interrupt)

        return run_tuning(_node_id(cls), steps, make, note=datencoder.note)


ETA_AFTER_STEPS = 10  # runs longer than this show the time left in their progress text


def run_tuning(node_id: str | None, steps: int, make, note: str | None = None) -> io.NodeOutput:
    """The shared body of the two Personalize nodes: ``make(progress, interrupt)`` creates the backend and
    returns the concept; this shows each step's loss (and, on runs over ``ETA_AFTER_STEPS`` steps, the time
    left) on the node, stops within one step on Cancel, and outputs the concept with its ui record. ``note``
    (the demo encoder's) is shown under the nearest word."""
    bar = comfy.utils.ProgressBar(max(steps, 1))
    losses: list[float] = []
    start = time.monotonic()

    def progress(step: int, total: int, loss: float) -> None:
        bar.update_absolute(step, total)
        losses.append(loss)
        text = f"step {step}/{total}  loss {loss:.4f}"
        if total > ETA_AFTER_STEPS and step < total:
            text += f"  ~{(time.monotonic() - start) / step * (total - step):.0f} s left"
        show_text(node_id, text)

    try:
        with torch.inference_mode(False), torch.enable_grad():
            concept = make(progress, comfy.model_management.throw_exception_if_processing_interrupted)
    except comfy.model_management.InterruptProcessingException:
        show_text(node_id, f"cancelled after step {len(losses)}/{steps}: no concept was made")
        raise
    logger.info("DATEncoder: concept ready, nearest word %r", concept.token)
    return shown(node_id, "\n".join([f"nearest word: {concept.token}", *([note] if note else [])]),
                 {**concept_record(concept), "losses": losses}, concept)


class DATEncoderPersonalizeFromWord(io.ComfyNode):
    """Personalize Concept without an encoder (issue 27): v* starts at a class word's embedding, the LoRA
    at dW = 0, then the same tuning loop (``datencoder_core.tuning.personalize_from_word``), longer."""

    @classmethod
    def define_schema(cls):
        defaults = WORD_START_TUNING
        return _schema(
            node_id="DATEncoderPersonalizeFromWord", display_name="Personalize Concept (no encoder)",
            description="From one photo (or a batch of photos of the same concept), without DATEncoder weights: "
                        "the concept's word embedding starts at a class word you name and its LoRA at zero, then "
                        "tuning steps as in Personalize Concept, many more (slower; no encoder to train).",
            inputs=[io.Model.Input("model", tooltip="the SD1.x MODEL to personalize (Load Checkpoint); it is "
                                                    "never changed"),
                    io.Clip.Input("clip", tooltip="the checkpoint's CLIP (SD1.x text encoder): the start word's "
                                                  "embedding and the tuning prompt"),
                    io.Vae.Input("vae", tooltip="the checkpoint's VAE: it encodes the photo for the UNet"),
                    io.Image.Input("image", tooltip="one photo of the concept, or a batch of photos of the same "
                                                    "concept; any size, alpha and grey are fine"),
                    io.String.Input("init_word", default="cat",
                                    tooltip="the concept's class word (cat, dog, teapot): its embedding is where "
                                            "tuning starts; several tokens -> the mean of their embeddings"),
                    io.Int.Input("steps", default=defaults.steps, min=1, max=2000,
                                 tooltip="tuning steps, 1-2000 (default 200; more fits the photo closer)"),
                    *_tuning_inputs(defaults, lr_tooltip="AdamW learning rate, 1e-5 to 0.1 (default 1e-3; lower it "
                                                         "if tuning diverges)",
                                    seed_tooltip="seed of the LoRA start, the tuning timesteps and noise: the same "
                                                 "photo, word and seed give the same concept. Keep it fixed")],
            outputs=[ConceptType.Output(tooltip="the concept: its word embedding v*, LoRA offsets and nearest "
                                                "word, for Dual-Path Model Patch, Apply Concept Token, Save Concept")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, init_word) -> bool | str:
        if init_word is None:  # linked from another node: checked when it runs
            return True
        if not init_word.strip():
            return ("init_word is empty: name the concept's class word (e.g. cat, dog, teapot); tuning starts "
                    "from its embedding")
        return True

    @classmethod
    def execute(cls, model, clip, vae, image, init_word, steps, lr, alpha_blend, timesteps_per_step,
                seed) -> io.NodeOutput:
        config = TuningConfig(steps=steps, lr=lr, alpha_blend=alpha_blend, timesteps_per_step=timesteps_per_step,
                              seed=seed)

        def make(progress, interrupt) -> Concept:
            backend = ComfyUIBackend(model, clip, vae, node="Personalize Concept (no encoder)")  # loads nothing
            return personalize_from_word(backend, init_word, LoRAConfig(), image, config, progress=progress,
                                         interrupt=interrupt)

        return run_tuning(_node_id(cls), steps, make)


class _SaveNode(io.ComfyNode):
    """Save Concept and Export: the concept, a plain file name checked when the prompt is queued,
    ``overwrite``; files named as ``paths.choose_paths`` says (never a failure on an existing name)."""

    FOLDERS: list[str] = []

    @classmethod
    def file_inputs(cls, name_tooltip: str) -> list:
        return [ConceptType.Input("concept", tooltip="the concept to write"),
                io.String.Input("name", default="my_concept", tooltip=name_tooltip),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="on: replace <name>.safetensors; off: an existing file is never replaced "
                                         "(a different concept goes to <name>_00001.safetensors, ...)")]

    @classmethod
    def validate_inputs(cls, name) -> bool | str:
        return paths.name_problem(name) or True

    @classmethod
    def save(cls, contents: list, name: str, overwrite: bool, write) -> io.NodeOutput:
        """Choose the paths for ``contents`` (one (tensors, metadata) per ``FOLDERS`` key), call
        ``write(paths)`` unless they already hold them, and show what happened on the node."""
        target = paths.choose_paths(cls.FOLDERS, name, overwrite, contents)
        if not target.unchanged:
            write(target.paths)
        # Short, to fit the node: the file name (the same in each folder), the folders only where there are
        # several; the record has the full paths.
        text = f"{'unchanged (same concept)' if target.unchanged else 'saved'} {os.path.basename(target.paths[0])}"
        if len(cls.FOLDERS) > 1:
            text += f" in {' and '.join(f'{key}/' for key in cls.FOLDERS)}"
        return shown(_node_id(cls), text, {"files": target.paths, "saved": not target.unchanged})


class DATEncoderLoadConcept(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _schema(
            node_id="DATEncoderLoadConcept", display_name="Load Concept",
            description="Loads a concept saved by Save Concept from "
                        "models/datencoder_concepts/.",
            inputs=[io.Combo.Input("concept_name", options=folder_paths.get_filename_list(paths.CONCEPTS),
                                   tooltip="a concept file in models/datencoder_concepts/, written by Save Concept")],
            outputs=[ConceptType.Output(tooltip="the concept, for Dual-Path Model Patch and Apply Concept Token")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def fingerprint_inputs(cls, concept_name):
        """The file's modification time, size and inode (every atomic save makes a new one): ComfyUI
        reuses a node's output while this stays the same, so a concept overwritten by Save Concept is
        read again. A missing file gives NaN, which never equals itself, so ``execute`` reports it."""
        path = folder_paths.get_full_path(paths.CONCEPTS, concept_name)
        if path is None:
            return float("nan")
        stat = os.stat(path)
        return stat.st_mtime_ns, stat.st_size, stat.st_ino

    @classmethod
    def execute(cls, concept_name) -> io.NodeOutput:
        concept = Concept.load(folder_paths.get_full_path_or_raise(paths.CONCEPTS, concept_name))
        record = {**concept_record(concept), "tuning": None if concept.tuning is None else concept.tuning.to_dict(),
                  "lora_targets": list(concept.lora_targets)}
        return shown(_node_id(cls), describe_concept(concept), record, concept)


def describe_concept(concept: Concept) -> str:
    """Load Concept's text, two short lines that fit the node: the nearest word, then the main tuning
    settings. The whole provenance (every setting, LoRA targets, encoder) is in the node's ui record."""
    if concept.tuning is None:
        tuning = "not recorded (format 1 file)"
    else:
        tuning = f"steps={concept.tuning.steps}, lr={concept.tuning.lr!r}, alpha_blend={concept.tuning.alpha_blend!r}"
    made = f"\n{concept.origin}" if concept.init_word is not None else ""  # no encoder: a third line, its start word
    return f"nearest word: {concept.token}\ntuning: {tuning}{made}"


class DATEncoderSaveConcept(_SaveNode):
    FOLDERS = [paths.CONCEPTS]

    @classmethod
    def define_schema(cls):
        return _schema(
            node_id="DATEncoderSaveConcept", display_name="Save Concept",
            description="Saves a concept to models/datencoder_concepts/<name>.safetensors. Never stops the run: "
                        "the same concept already there is kept, a different one goes to <name>_00001 "
                        "(unless overwrite).",
            inputs=cls.file_inputs("file name in models/datencoder_concepts/ (.safetensors is added), without "
                                   "folders"),
            outputs=[], is_output_node=True, hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, concept, name, overwrite) -> io.NodeOutput:
        return cls.save([concept.file_contents()], name, overwrite, lambda targets: concept.save(targets[0]))


class DATEncoderExportConcept(_SaveNode):
    FOLDERS = ["loras", "embeddings"]

    @classmethod
    def define_schema(cls):
        return _schema(
            node_id="DATEncoderExportConcept", display_name="Export Concept as LoRA + Embedding",
            description="Writes models/loras/<name>.safetensors and models/embeddings/<name>.safetensors for "
                        "any SD1.5 tool (prompt with embedding:<name>). The export has no dual path: it is the "
                        "concept at alpha_blend = 1.",
            inputs=cls.file_inputs("file name for models/loras/ and models/embeddings/ (.safetensors is added), "
                                   "without folders"),
            outputs=[], is_output_node=True, hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, concept, name, overwrite) -> io.NodeOutput:
        return cls.save(concept.export_contents(), name, overwrite, lambda targets: concept.export(*targets))


class DATEncoderDualPathPatch(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _schema(
            node_id="DATEncoderDualPathPatch", display_name="Dual-Path Model Patch",
            description="A copy of the model that samples with the concept: every attention module blends "
                        "the concept's path (LoRA + soft prompt) with the original one (nearest word), "
                        "out = a * concept + (1 - a) * original. Use it with Apply Concept Token. On a model "
                        "already patched it adds the concept (chain one per concept).",
            inputs=[io.Model.Input("model", tooltip="the SD1.x MODEL the concept was made with, or one already "
                                                    "patched with other concepts (this one is added)"),
                    ConceptType.Input("concept", tooltip="from Personalize Concept or Load Concept"),
                    io.Float.Input("alpha_blend", default=0.25, min=0.0, max=1.0, step=0.01,
                                   tooltip="the dual-path blend WHILE SAMPLING, 0-1 (the paper: 0.25): 0 = the "
                                           "original model with the nearest word, 1 = plain LoRA. Independent of "
                                           "Personalize Concept's alpha_blend, used while tuning; one value for "
                                           "all chained concepts"),
                    io.Float.Input("lora_strength", default=1.0, min=0.0, max=2.0, step=0.05,
                                   tooltip="scale of this concept's LoRA offsets, 0-2 (1 = as tuned)"),
                    io.Mask.Input("mask", optional=True,
                                  tooltip="optional: where this concept's LoRA acts (white = on); the image's "
                                          "size, one mask or one per image of the batch; none = everywhere")],
            outputs=[io.Model.Output(tooltip="a patched copy of the model, for KSampler or the next concept's "
                                             "Dual-Path Model Patch")],
        )

    @classmethod
    def execute(cls, model, concept, alpha_blend, lora_strength, mask=None) -> io.NodeOutput:
        return io.NodeOutput(patch_model(model, concept, alpha_blend, lora_strength, mask))


class DATEncoderConceptList(io.ComfyNode):
    """Several concepts in one prompt: each Concept List node adds one concept with its placeholder,
    chained, for Apply Concept Token's ``more_concepts``."""

    @classmethod
    def define_schema(cls):
        return _schema(
            node_id="DATEncoderConceptList", display_name="Concept List",
            description="A concept with its own placeholder, for a prompt with several concepts: connect it to "
                        "Apply Concept Token's more_concepts; chain Concept Lists for a third concept and more.",
            inputs=[ConceptType.Input("concept", tooltip="from Personalize Concept or Load Concept"),
                    io.String.Input("placeholder", default="S2*",
                                    tooltip="the word that stands for this concept in Apply Concept Token's text; "
                                            "each concept needs its own"),
                    ConceptListType.Input("concept_list", optional=True,
                                          tooltip="optional: the concepts of another Concept List, kept before "
                                                  "this one")],
            outputs=[ConceptListType.Output(tooltip="the concepts with their placeholders, for Apply Concept "
                                                    "Token's more_concepts")],
        )

    @classmethod
    def validate_inputs(cls, placeholder) -> bool | str:
        if placeholder is None:  # linked from another node: checked when it runs
            return True
        return placeholder_problem(placeholder) or True

    @classmethod
    def execute(cls, concept, placeholder, concept_list=None) -> io.NodeOutput:
        return io.NodeOutput((*(concept_list or ()), (placeholder, concept)))


class DATEncoderApplyConceptToken(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _schema(
            node_id="DATEncoderApplyConceptToken", display_name="Apply Concept Token",
            description="Encodes a prompt in which the placeholder stands for the concept (and each Concept "
                        "List placeholder for its concept).",
            inputs=[io.Clip.Input("clip", tooltip="the checkpoint's CLIP (SD1.x)"),
                    ConceptType.Input("concept", tooltip="from Personalize Concept or Load Concept"),
                    io.String.Input("text", multiline=True, default="a photo of S* on the beach",
                                    tooltip="the prompt, with the placeholder where the concept goes"),
                    io.String.Input("placeholder", default="S*",
                                    tooltip="the word in text that stands for the concept (default S*); a prompt "
                                            "without it is refused when queued"),
                    ConceptListType.Input("more_concepts", optional=True,
                                          tooltip="optional: more concepts in the same prompt, each with its own "
                                                  "placeholder, from Concept List")],
            outputs=[io.Conditioning.Output(tooltip="the positive prompt for KSampler, with the Dual-Path Model "
                                                    "Patch's model")],
        )

    @classmethod
    def validate_inputs(cls, text, placeholder) -> bool | str:
        if text is None or placeholder is None:  # linked from another node: checked when it runs
            return True
        return prompt_problem(text, placeholder) or True

    @classmethod
    def execute(cls, clip, concept, text, placeholder, more_concepts=None) -> io.NodeOutput:
        return io.NodeOutput(encode_with_concepts(clip, text, [(placeholder, concept), *(more_concepts or ())]))


class DATEncoderExtension(ComfyExtension):
    """The pack as ComfyUI loads it. Set-up happens in ``get_node_list``, which every release calls before
    it builds any schema (ComfyUI before 0.30 never calls ``on_load``)."""

    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        paths.register()  # the Loader and Load Concept schemas list these folders
        nodes = [DATEncoderLoader, DATEncoderPersonalize, DATEncoderLoadConcept, DATEncoderPersonalizeFromWord,
                 DATEncoderSaveConcept, DATEncoderExportConcept, DATEncoderDualPathPatch, DATEncoderConceptList,
                 DATEncoderApplyConceptToken]
        return compat.refuse_unsupported(nodes, compat.running_version())
