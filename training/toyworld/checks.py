"""What the world's own models can do, measured with the ground truth before any encoder exists.

``world_checks`` (written into ``build.json`` and the report) separates "the world cannot show it" from
"the method does not do it":

* ``photo_identity`` / ``vae_identity``: ``truth_identity`` of the concept photos, and of the same photos
  through the world VAE (encode, decode): how much appearance the latent space keeps;
* ``prompt_shape`` / ``prompt_context``: the probability of the prompted shape and context on the world
  UNet's own generations of "a photo of a {shape} {context}" (every shape x context, DDIM, guidance 4):
  whether the base model follows its prompts;
* ``prompt_identity``: ``truth_identity`` of its generations of each concept described in words ("a photo
  of a red circle with blue dots {context}", every context): no caption ever described these appearances,
  so this is how far the base model composes the colour and pattern words it learnt apart.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from datencoder_core import LoRAConfig, LoRAFactors, word_start
from training.evaluate.concepts import load_photo
from training.evaluate.sampling import ConceptPrediction, generate
from training.toyworld import world
from training.toyworld.models import load_world_models
from training.toyworld.truth import WorldTruth


@torch.no_grad()
def world_checks(folder: Path, images_per_prompt: int = 2, sampling_steps: int = 20) -> dict[str, float]:
    """The module docstring's five numbers for the world in ``folder`` (its ``sd/``, ``truth.safetensors``
    and ``concepts/``)."""
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

    def sample(word: ConceptPrediction, text: str) -> torch.Tensor:
        return generate(backend, word, text, list(range(images_per_prompt)), alpha=0.0, steps=sampling_steps,
                        guidance=4.0)

    shape_p, context_p = [], []
    for shape in world.SHAPES:
        word = shape_word(shape)
        for context, phrase in world.CONTEXTS.items():
            p = truth.probabilities(sample(word, "a photo of a {} " + phrase))
            shape_p.append(float(p["shape"][:, world.ATTRIBUTES["shape"].index(shape)].mean()))
            context_p.append(float(p["context"][:, world.ATTRIBUTES["context"].index(context)].mean()))
    described = []
    for concept in concepts:
        meta = json.loads((concept / "concept.json").read_text())
        body, mark, pattern = meta["appearance"]
        for phrase in world.CONTEXTS.values():
            text = f"a photo of a {world.object_phrase('{}', body, (mark, pattern))} {phrase}"
            described.append(truth.score(sample(shape_word(meta["class"]), text), concept, text)["truth_identity"])
    return identity | {"prompt_shape": float(np.mean(shape_p)), "prompt_context": float(np.mean(context_p)),
                       "prompt_identity": float(np.mean(described))}
