"""The toy world's data on disk, in the formats the project's own tools read.

* ``write_pretraining_images``: an image folder for ``python -m training.pretrain --data DIR`` (one
  sub-folder per shape, so each image's class word is its shape), of appearances that are NOT held out.
* ``write_concepts``: a ``--concepts`` folder for ``python -m training.evaluate`` (``training.evaluate.concepts``):
  one folder per held-out concept, its photos (the first is the input, in a random context) and its
  ``concept.json`` with the ground truth ``truth.WorldTruth`` scores against.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from training.toyworld import world


def _save(image: np.ndarray, path: Path) -> None:
    Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)).save(path)


def write_pretraining_images(folder: Path, count: int, seed: int) -> None:
    """``count`` scenes of the pretraining appearances (every appearance but ``world.HELDOUT_APPEARANCES``)."""
    appearances = [a for a in world.APPEARANCES if a not in world.HELDOUT_APPEARANCES]
    rng = np.random.default_rng(seed)
    for shape in world.SHAPES:
        (folder / shape).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        scene = world.random_scene(rng, appearances)
        _save(world.render(scene, rng), folder / scene.shape / f"{i:06d}.png")


def write_concepts(folder: Path, count: int, photos: int, seed: int) -> None:
    """``count`` concepts, each a held-out appearance on a random shape, with ``photos`` photos (random
    position, scale and context; photo 0 is the single input image)."""
    rng = np.random.default_rng(seed)
    chosen = rng.permutation(len(world.HELDOUT_APPEARANCES))[:count]
    for number, index in enumerate(chosen):
        appearance = world.HELDOUT_APPEARANCES[index]
        shape = world.SHAPES[rng.integers(len(world.SHAPES))]
        sub = folder / f"{number:02d}-{'-'.join(appearance)}-{shape}"
        sub.mkdir(parents=True, exist_ok=True)
        scenes = [world.random_scene(rng, shape=shape, appearance=appearance) for _ in range(photos)]
        for i, scene in enumerate(scenes):
            _save(world.render(scene, rng), sub / f"{i:02d}.png")
        (sub / "concept.json").write_text(json.dumps({"class": shape, "live": False, "appearance": list(appearance),
                                                      "input_context": scenes[0].context}))
