"""The DATEncoder nodes (V3 schema). Each node's ``execute`` takes exactly its schema's input ids."""

from __future__ import annotations

import logging
import os

import comfy.model_management
import comfy.model_patcher
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import ComfyExtension, io, ui
from typing_extensions import override

from ..datencoder_core import (Concept, DATEncoder, DATEncoderError, TuningConfig, architecture_fingerprint,
                               load_encoder, personalize)
from . import compat, paths
from .backend import ComfyUIBackend
from .conditioning import encode_with_concept
from .patching import comfy_sites, patch_model

ConceptType = io.Custom("CONCEPT")
EncoderType = io.Custom("DATENCODER")
logger = logging.getLogger("datencoder")


class LoadedEncoder:
    """DATENCODER: the encoder in a ModelPatcher, so that ComfyUI's model management moves it to the
    GPU with the models it runs beside and offloads it after; ``encoder_id`` names its weights."""

    def __init__(self, encoder: DATEncoder, encoder_id: str):
        self.encoder_id = encoder_id
        self.patcher = comfy.model_patcher.ModelPatcher(encoder, load_device=comfy.model_management.get_torch_device(),
                                                        offload_device=comfy.model_management.unet_offload_device())

    @property
    def encoder(self) -> DATEncoder:
        return self.patcher.model

    def check_base_model(self, model) -> None:
        """Refuse an encoder made for another base model than ``model``, naming both."""
        sites, _ = comfy_sites(model)
        expected = architecture_fingerprint(sites, model.model.model_config.unet_config["context_dim"])
        found = architecture_fingerprint(self.encoder.sites, self.encoder.config.token_dim)
        if found != expected:
            raise DATEncoderError(f"the encoder {self.encoder_id} was made for another base model (fingerprint "
                                  f"{found}) than this MODEL (fingerprint {expected}, {len(sites)} LoRA sites); "
                                  f"use the SD1.x checkpoint it was trained for, or an encoder trained for this one")


class DATEncoderLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DATEncoderLoader", display_name="DATEncoder Loader", category="DATEncoder",
            description="Loads DATEncoder weights (.safetensors) from models/datencoder/.",
            inputs=[io.Combo.Input("encoder_name", options=folder_paths.get_filename_list(paths.ENCODERS))],
            outputs=[EncoderType.Output()],
        )

    @classmethod
    def execute(cls, encoder_name) -> io.NodeOutput:
        encoder, encoder_id = load_encoder(folder_paths.get_full_path_or_raise(paths.ENCODERS, encoder_name))
        return io.NodeOutput(LoadedEncoder(encoder, encoder_id), ui=ui.PreviewText(f"encoder {encoder_id}"))


class DATEncoderPersonalize(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        defaults = TuningConfig()
        return io.Schema(
            node_id="DATEncoderPersonalize", display_name="Personalize Concept", category="DATEncoder",
            description="From one photo (or a batch of photos of the same concept): one encoder forward, "
                        "then a few tuning steps of the concept's word embedding and LoRA. steps = 0: encoder only.",
            inputs=[io.Model.Input("model"), io.Clip.Input("clip"), io.Vae.Input("vae"),
                    io.ClipVision.Input("clip_vision", tooltip="CLIP-ViT-H-14 (the IP-Adapter one)"),
                    EncoderType.Input("datencoder"), io.Image.Input("image"),
                    io.Int.Input("steps", default=defaults.steps, min=0, max=100),
                    io.Float.Input("lr", default=defaults.lr, min=1e-5, max=1e-1, step=1e-4),
                    io.Float.Input("alpha_blend", default=defaults.alpha_blend, min=0.0, max=1.0, step=0.01),
                    io.Int.Input("timesteps_per_step", default=defaults.timesteps_per_step, min=1, max=32),
                    io.Int.Input("seed", default=0, min=0, max=2**63 - 1)],
            outputs=[ConceptType.Output()],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip, vae, clip_vision, datencoder, image, steps, lr, alpha_blend,
                timesteps_per_step, seed) -> io.NodeOutput:
        config = TuningConfig(steps=steps, lr=lr, alpha_blend=alpha_blend, timesteps_per_step=timesteps_per_step,
                              seed=seed)
        bar = comfy.utils.ProgressBar(max(steps, 1))
        node_id = cls.hidden.unique_id if cls.hidden is not None else None

        def progress(step: int, total: int, loss: float) -> None:
            bar.update_absolute(step, total)
            if node_id is not None:
                from server import PromptServer

                PromptServer.instance.send_progress_text(f"step {step}/{total}  loss {loss:.4f}", node_id)

        with torch.inference_mode(False), torch.enable_grad():
            backend = ComfyUIBackend(model, clip, vae, clip_vision, extra_models=[datencoder.patcher])  # loads nothing
            datencoder.check_base_model(model)
            concept = personalize(backend, datencoder.encoder, datencoder.encoder_id, image, config,
                                  progress=progress,
                                  interrupt=comfy.model_management.throw_exception_if_processing_interrupted)
        logger.info("DATEncoder: concept ready, nearest word %r", concept.token)
        return io.NodeOutput(concept, ui=ui.PreviewText(f"nearest word: {concept.token}"))


def _concept_file_inputs() -> list:
    """Inputs of the nodes that write a concept to files: the concept, a plain file name, overwrite."""
    return [ConceptType.Input("concept"), io.String.Input("name", default="my_concept"),
            io.Boolean.Input("overwrite", default=False, tooltip="replace an existing file of that name")]


class DATEncoderLoadConcept(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DATEncoderLoadConcept", display_name="Load Concept", category="DATEncoder",
            description="Loads a concept saved by Save Concept from "
                        "models/datencoder_concepts/.",
            inputs=[io.Combo.Input("concept_name", options=folder_paths.get_filename_list(paths.CONCEPTS))],
            outputs=[ConceptType.Output()],
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
        return io.NodeOutput(concept, ui=ui.PreviewText(describe_concept(concept)))


def describe_concept(concept: Concept) -> str:
    """Load Concept's text: the nearest word, then where the concept came from (its provenance)."""
    if concept.tuning is None:
        tuning = "not recorded (a format 1 file)"
    else:
        tuning = ", ".join(f"{name}={value!r}" for name, value in concept.tuning.to_dict().items())
    return (f"nearest word: {concept.token}\ntuning: {tuning}\nLoRA targets: {', '.join(concept.lora_targets)}\n"
            f"encoder: {concept.encoder_id}")


class DATEncoderSaveConcept(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DATEncoderSaveConcept", display_name="Save Concept", category="DATEncoder",
            description="Saves a concept to models/datencoder_concepts/<name>.safetensors.",
            inputs=_concept_file_inputs(),
            outputs=[], is_output_node=True,
        )

    @classmethod
    def execute(cls, concept, name, overwrite) -> io.NodeOutput:
        path = paths.output_path(paths.CONCEPTS, name, overwrite)
        concept.save(path)
        return io.NodeOutput(ui=ui.PreviewText(f"saved {path}"))


class DATEncoderExportConcept(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DATEncoderExportConcept", display_name="Export Concept as LoRA + Embedding",
            category="DATEncoder",
            description="Writes models/loras/<name>.safetensors and models/embeddings/<name>.safetensors for "
                        "any SD1.5 tool (prompt with embedding:<name>). The export has no dual path: it is the "
                        "concept at alpha_blend = 1.",
            inputs=_concept_file_inputs(),
            outputs=[], is_output_node=True,
        )

    @classmethod
    def execute(cls, concept, name, overwrite) -> io.NodeOutput:
        lora_path = paths.output_path("loras", name, overwrite)
        embedding_path = paths.output_path("embeddings", name, overwrite)
        concept.export(lora_path, embedding_path)
        return io.NodeOutput(ui=ui.PreviewText(f"saved {lora_path} and {embedding_path}"))


class DATEncoderDualPathPatch(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DATEncoderDualPathPatch", display_name="Dual-Path Model Patch", category="DATEncoder",
            description="A copy of the model that samples with the concept: every attention module blends "
                        "the concept's path (LoRA + soft prompt) with the original one (nearest word), "
                        "out = a * concept + (1 - a) * original. Use it with Apply Concept Token.",
            inputs=[io.Model.Input("model"), ConceptType.Input("concept"),
                    io.Float.Input("alpha_blend", default=0.25, min=0.0, max=1.0, step=0.01,
                                   tooltip="0: the original model with the nearest word; 1: plain LoRA"),
                    io.Float.Input("lora_strength", default=1.0, min=0.0, max=2.0, step=0.05)],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, concept, alpha_blend, lora_strength) -> io.NodeOutput:
        return io.NodeOutput(patch_model(model, concept, alpha_blend, lora_strength))


class DATEncoderApplyConceptToken(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DATEncoderApplyConceptToken", display_name="Apply Concept Token", category="DATEncoder",
            description="Encodes a prompt in which the placeholder stands for the concept.",
            inputs=[io.Clip.Input("clip"), ConceptType.Input("concept"),
                    io.String.Input("text", multiline=True, default="a photo of S* on the beach"),
                    io.String.Input("placeholder", default="S*")],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, clip, concept, text, placeholder) -> io.NodeOutput:
        return io.NodeOutput(encode_with_concept(clip, text, concept, placeholder))


class DATEncoderExtension(ComfyExtension):
    """The pack as ComfyUI loads it. Set-up happens in ``get_node_list``, which every release calls before
    it builds any schema (ComfyUI before 0.30 never calls ``on_load``)."""

    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        paths.register()  # the Loader and Load Concept schemas list these folders
        nodes = [DATEncoderLoader, DATEncoderPersonalize, DATEncoderLoadConcept, DATEncoderSaveConcept,
                 DATEncoderExportConcept, DATEncoderDualPathPatch, DATEncoderApplyConceptToken]
        return compat.refuse_unsupported(nodes, compat.running_version())
