"""What the world's own models can do, measured with the ground truth before any encoder exists.

``world_checks`` (written into ``build.json`` and the report) separates "the world cannot show it" from
"the method does not do it":

* ``photo_identity`` / ``vae_identity``: ``truth_identity`` of the concept photos, and of the same photos
  through the world VAE (encode, decode): how much appearance the latent space keeps;
* ``prompt_shape`` / ``prompt_context``: the probability of the prompted shape and context on the world
  UNet's own generations of "a photo of a {shape} {context}" (every shape x context, DDIM, guidance 4):
  whether the base model follows its prompts;
* ``prompt_identity``: ``truth_identity`` of its generations of each concept described in words ("a photo
  of a red circle with a blue stripe {context}", every context): no caption ever described these appearances,
  so this is how far the base model composes the colour words it learnt apart; with ``named_body`` /
  ``named_mark``, the probability of each part;
* the ceilings of personalization in the world (``ceilings``), from each concept's one photo, before any encoder:
  ``oracle_identity`` / ``oracle_editability`` of per-concept tuning without an encoder (``ORACLE_TUNING``: v*
  and LoRA from the class word, ``personalize_from_word``), sampled at alpha 1 for identity and on the dual path
  (``TuningConfig``'s alpha_blend) for the prompt's context; ``v_star_alone_identity`` of textual inversion, v* alone
  (``TEXTUAL_INVERSION``: the same tuning at a higher learning rate, with A and B starting at zero, so that dW gets
  no gradient and stays 0).

``CEILINGS`` are what the world must reach before it can judge an encoder (issue 26): a world whose base model
cannot draw a named appearance, or whose best per-concept tuning cannot, says nothing about an encoder.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from datencoder_core import LoRAConfig, LoRAFactors, TuningConfig, personalize_from_word, word_start
from datencoder_core.concept import NO_ENCODER
from datencoder_core.tuning import tune
from training.evaluate.concepts import load_photo
from training.evaluate.sampling import ConceptPrediction, generate
from training.toyworld import world
from training.toyworld.models import load_world_models
from training.toyworld.truth import WorldTruth


# The thresholds of issue 26: a named appearance drawn at identity >= 0.8 (each part >= 0.7), the oracle at >= 0.8
# keeping the prompt's context >= 0.9 on the dual path, v* alone >= 0.6.
CEILINGS = {"prompt_identity": 0.8, "named_body": 0.7, "named_mark": 0.7,
            "oracle_identity": 0.8, "oracle_editability": 0.9, "v_star_alone_identity": 0.6}
# The oracle: per-concept tuning from the class word as hard as it needs to be (the best identity the world
# allows): 300 steps of 16 timesteps at lr 5e-3, alpha 1 while tuning, no anchors. At the method's settings
# (4 timesteps, lr 2e-3, anchors 1e-2) the same 300 steps reached identity 0.424 on the six concepts.
ORACLE_TUNING = TuningConfig(steps=300, lr=5e-3, alpha_blend=1.0, timesteps_per_step=16, embedding_anchor_weight=0.0,
                             lora_anchor_weight=0.0)
# Textual inversion, the v* alone ceiling: the oracle's tuning at a higher learning rate, which one vector alone
# needs in the world: at the oracle's 5e-3 it reached identity 0.499 on the six concepts, at 2e-2 0.609.
TEXTUAL_INVERSION = dataclasses.replace(ORACLE_TUNING, lr=2e-2)
# The sampling guidance of the world's checks and evaluation.
GUIDANCE = 4.0


def failed_ceilings(checks: dict[str, float]) -> list[str]:
    """The ``CEILINGS`` that ``checks`` (``world_checks``' figures) do not reach, as "name value < threshold"."""
    return [f"{name} {checks[name]:.3f} < {floor}" for name, floor in CEILINGS.items() if checks[name] < floor]


@torch.no_grad()
def world_checks(folder: Path, oracle_steps: int = ORACLE_TUNING.steps, images_per_prompt: int = 2,
                 sampling_steps: int = 20) -> dict[str, float]:
    """The module docstring's figures for the world in ``folder`` (its ``sd/``, ``truth.safetensors`` and
    ``concepts/``); the ceilings' tuning runs ``oracle_steps`` steps (``ORACLE_TUNING``'s 300 for a world that
    is to judge the method, a few for the test's reduced world, which only runs the pipeline)."""
    models = load_world_models(folder / "sd", folder / "clip_vision.safetensors")
    backend, truth = models.backend(LoRAConfig()), WorldTruth(folder / "truth.safetensors")
    concepts = sorted(p for p in (folder / "concepts").iterdir() if p.is_dir())
    photos = torch.stack([load_photo(sorted(c.glob("*.png"))[0]) for c in concepts])
    latents = backend.encode_latents(photos) / backend.vae.config.scaling_factor
    decoded = ((backend.vae.decode(latents).sample.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)
    any_context = next(iter(world.CONTEXTS.values()))  # score() needs a context phrase; identity ignores it
    identity = {name: float(np.mean([truth.score(images[i:i + 1], c, any_context)["truth_identity"]
                                     for i, c in enumerate(concepts)]))
                for name, images in (("photo_identity", photos), ("vae_identity", decoded))}

    # alpha 0 is the untouched model with the hard prompt: "a photo of a {shape} {context}", no LoRA.
    no_lora = LoRAFactors({s.name: torch.zeros(1, s.in_features) for s in backend.sites},
                          {s.name: torch.zeros(s.out_features, 1) for s in backend.sites}, 1.0)

    def shape_word(shape: str) -> ConceptPrediction:
        (token,) = backend.word_token_ids(shape)  # every shape is one token of the world's vocabulary
        embedding, _ = word_start(backend, shape, LoRAConfig(), seed=0)  # its embedding; its LoRA start is unused
        return ConceptPrediction(embedding, no_lora, token)

    def sample(concept, text: str, alpha: float = 0.0) -> torch.Tensor:
        return generate(backend, concept, text, list(range(images_per_prompt)), alpha=alpha, steps=sampling_steps,
                        guidance=GUIDANCE)

    shape_p, context_p = [], []
    for shape in world.SHAPES:
        word = shape_word(shape)
        for context, phrase in world.CONTEXTS.items():
            p = truth.probabilities(sample(word, "a photo of a {} " + phrase))
            shape_p.append(float(p["shape"][:, world.ATTRIBUTES["shape"].index(shape)].mean()))
            context_p.append(float(p["context"][:, world.ATTRIBUTES["context"].index(context)].mean()))
    named = {f"named_{part}": [] for part in world.APPEARANCE_PARTS}
    for concept in concepts:
        meta = json.loads((concept / "concept.json").read_text())
        body, mark = meta["appearance"]
        for phrase in world.CONTEXTS.values():
            p = truth.probabilities(sample(shape_word(meta["class"]),
                                           f"a photo of a {world.object_phrase('{}', body, mark)} {phrase}"))
            for name, attribute, value in zip(named, world.APPEARANCE_PARTS, meta["appearance"]):
                named[name].append(float(p[attribute][:, world.ATTRIBUTES[attribute].index(value)].mean()))
    named_means = {name: float(np.mean(values)) for name, values in named.items()}
    return (identity | {"prompt_shape": float(np.mean(shape_p)), "prompt_context": float(np.mean(context_p)),
                        "prompt_identity": float(np.mean(list(named_means.values())))} | named_means
            | ceilings(backend, truth, concepts, sample, oracle_steps))


def ceilings(backend, truth: WorldTruth, concepts: list[Path], sample,
             steps: int = ORACLE_TUNING.steps) -> dict[str, float]:
    """``oracle_identity``, ``oracle_editability`` and ``v_star_alone_identity`` (module docstring), the mean over
    ``concepts`` and the world's contexts, tuned ``steps`` steps with ``ORACLE_TUNING`` and ``TEXTUAL_INVERSION``;
    ``sample(concept, template, alpha)`` draws the images."""
    tuning = dataclasses.replace(ORACLE_TUNING, steps=steps)
    inversion = dataclasses.replace(TEXTUAL_INVERSION, steps=steps)
    figures = {"oracle_identity": [], "oracle_editability": [], "v_star_alone_identity": []}
    for concept in concepts:
        meta = json.loads((concept / "concept.json").read_text())
        photo = load_photo(sorted(concept.glob("*.png"))[0])[None]
        with torch.enable_grad():
            oracle = personalize_from_word(backend, meta["class"], LoRAConfig(), photo, tuning)
            v_start, lora = word_start(backend, meta["class"], LoRAConfig(), tuning.seed)
            zero = LoRAFactors({k: torch.zeros_like(v) for k, v in lora.down.items()},
                               {k: torch.zeros_like(v) for k, v in lora.up.items()}, lora.scale)
            alone = tune(backend, backend.encode_latents(photo), v_start, zero, NO_ENCODER, LoRAConfig().targets,
                         inversion, torch.Generator().manual_seed(inversion.seed))
        for phrase in world.CONTEXTS.values():
            text = "a photo of a {} " + phrase
            figures["oracle_identity"].append(truth.score(sample(oracle, text, 1.0), concept, text)["truth_identity"])
            figures["oracle_editability"].append(
                truth.score(sample(oracle, text, TuningConfig().alpha_blend), concept, text)["truth_editability"])
            figures["v_star_alone_identity"].append(
                truth.score(sample(alone, text, 1.0), concept, text)["truth_identity"])
    return {name: float(np.mean(values)) for name, values in figures.items()}
