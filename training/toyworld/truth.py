"""Ground-truth metrics of the toy world: an attribute classifier trained on the world's own renders.

``AttributeNet`` reads a (32 px) image and predicts, each as a softmax: the shape, the context, the body
colour and the stripe colour. It is trained on freshly rendered scenes of every appearance
(it is a measuring instrument, not part of the method), blurred and noised as generations are. Per
generated image of a concept and a prompt (``WorldTruth.score``, mean over the images):

* ``truth_identity``: the mean of the probabilities it gives the concept's body colour and stripe colour (the
  object's appearance, ``world.APPEARANCE_PARTS``, which no caption names for a held-out concept; chance 1/6);
* ``truth_editability``: the probability of the prompt's context (chance 0.25);
* ``truth_shape``: the probability of the concept's shape (its class word; chance 1/6).

``WorldTruth``, a ``training.evaluate.metrics.Scorer``, adds these beside CLIP and DINO (the toy world's
experiment passes it to ``training.evaluate.run.main``); the concept's attributes come from its ``concept.json`` (``"appearance": [body colour, stripe colour]``) and the prompt's context from
the context phrase in its text (``world.CONTEXTS``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from datencoder_core import DATEncoderError
from training.toyworld import world

log = logging.getLogger(__name__)
METRICS = ("truth_identity", "truth_editability", "truth_shape")
IDENTITY_CHANCE = float(np.mean([1 / len(world.ATTRIBUTES[part]) for part in world.APPEARANCE_PARTS]))


class AttributeNet(nn.Module):
    def __init__(self):
        super().__init__()
        layers, width = [], 3
        for out in (32, 64, 64):
            layers += [nn.Conv2d(width, out, 3, padding=1), nn.GroupNorm(8, out), nn.SiLU(), nn.MaxPool2d(2)]
            width = out
        self.trunk = nn.Sequential(*layers, nn.Flatten())
        self.heads = nn.ModuleDict({name: nn.Linear(width * (world.SIZE // 8) ** 2, len(labels))
                                    for name, labels in world.ATTRIBUTES.items()})

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """``images`` (B, S, S, 3) in [0, 1] -> logits per head."""
        features = self.trunk(images.permute(0, 3, 1, 2) * 2 - 1)
        return {name: head(features) for name, head in self.heads.items()}


def _degrade(images: Tensor, generator: torch.Generator) -> Tensor:
    """Random blur (a 3x3 box mixed in with a random weight) and pixel noise: how generations look."""
    pixels = images.permute(0, 3, 1, 2)
    weight = torch.rand(len(images), 1, 1, 1, generator=generator) * 0.7
    blurred = F.avg_pool2d(F.pad(pixels, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    noise = torch.randn(pixels.shape, generator=generator) * 0.04
    return ((1 - weight) * pixels + weight * blurred + noise).clamp(0, 1).permute(0, 2, 3, 1)


Renders = tuple[np.ndarray, list[world.Scene]]  # images (N, S, S, 3) in [0, 1] and their scenes


def fit_attributes(model: nn.Module, data: Renders, test: Renders, steps: int, batch_size: int, seed: int,
                   description: str,
                   transform: Callable[[Tensor, torch.Generator], Tensor] | None = None) -> dict[str, float]:
    """Train ``model`` (images (B, S, S, 3) in [0, 1] -> logits per ``world.ATTRIBUTES``) on the summed
    cross-entropy of every attribute of ``data``'s scenes (AdamW, lr 3e-3, cosine decay over ``steps``), with
    ``transform`` applied to every training and test batch; leaves it in eval mode and returns its accuracy per
    attribute on ``test``."""
    transform = transform or (lambda images, _generator: images)
    pixels = torch.from_numpy(data[0])
    labels = {name: torch.from_numpy(column) for name, column in world.attribute_labels(data[1]).items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in (bar := tqdm(range(steps), desc=description, unit="step")):
        rows = torch.randint(len(pixels), (batch_size,), generator=generator)
        logits = model(transform(pixels[rows], generator))
        loss = sum(F.cross_entropy(logits[name], labels[name][rows]) for name in world.ATTRIBUTES)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    with torch.no_grad():
        logits = model(transform(torch.from_numpy(test[0]), generator))
    return {name: float((logits[name].argmax(-1) == torch.from_numpy(column)).float().mean())
            for name, column in world.attribute_labels(test[1]).items()}


def train_truth(path: Path, steps: int, seed: int, batch_size: int = 64) -> dict[str, float]:
    """Train ``AttributeNet`` on fresh renders, blurred and noised (``_degrade``), and save it to ``path``; returns
    its held-out accuracy per head."""
    torch.manual_seed(seed)
    net = AttributeNet()
    data = world.render_dataset(steps * batch_size // 4, seed + 7)[:2]  # each image seen about 4 times
    test = world.render_dataset(1000, seed + 8)[:2]
    accuracy = fit_attributes(net, data, test, steps, batch_size, seed, "ground-truth classifier", _degrade)
    save_file(net.state_dict(), path)
    log.info("ground-truth classifier: held-out accuracy %s", accuracy)
    return accuracy


def prompt_context(text: str) -> str:
    """The world context a prompt names; raises if it names none."""
    found = [name for name, phrase in world.CONTEXTS.items() if phrase in text]
    if len(found) != 1:
        raise DATEncoderError(f"prompt {text!r}: expected exactly one of the world's context phrases "
                              f"{list(world.CONTEXTS.values())}, found {found}")
    return found[0]


class WorldTruth:
    """The toy world's ``training.evaluate.metrics.Scorer``: its ground truth beside CLIP and DINO (module docstring)."""

    def __init__(self, path: Path):
        self.net = AttributeNet()
        try:
            self.net.load_state_dict(load_file(str(path)))
        except (OSError, RuntimeError) as error:
            raise DATEncoderError(f"{path}: expected the toy world's attribute classifier "
                                  f"(training/toyworld/truth.py, written by python -m training.toyworld): {error}") from None
        self.net.eval()

    @torch.no_grad()
    def probabilities(self, images: Tensor) -> dict[str, Tensor]:
        """Per head, (N, classes) probabilities of ``images`` (N, H, W, 3) in [0, 1] at the world's size."""
        pixels = images.float()
        if pixels.shape[1] != world.SIZE:
            pixels = F.interpolate(pixels.permute(0, 3, 1, 2), size=world.SIZE, mode="area").permute(0, 2, 3, 1)
        return {k: v.softmax(-1) for k, v in self.net(pixels).items()}

    def score(self, generated: Tensor, concept_folder: Path, prompt_text: str) -> dict[str, float]:
        meta = json.loads((Path(concept_folder) / "concept.json").read_text())
        if "appearance" not in meta:
            raise DATEncoderError(f"{concept_folder}/concept.json: no \"appearance\"; the world's ground truth "
                                  f"scores toy-world concepts only (python -m training.toyworld writes them)")
        p = self.probabilities(generated)
        identity = sum(p[name][:, world.ATTRIBUTES[name].index(value)]
                       for name, value in zip(world.APPEARANCE_PARTS, meta["appearance"])) / len(world.APPEARANCE_PARTS)
        context = p["context"][:, world.ATTRIBUTES["context"].index(prompt_context(prompt_text))]
        shape = p["shape"][:, world.ATTRIBUTES["shape"].index(meta["class"])]
        return {"truth_identity": float(identity.mean()), "truth_editability": float(context.mean()),
                "truth_shape": float(shape.mean())}

