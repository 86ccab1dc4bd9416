"""The toy world's images and captions: a named shape with an unnamed appearance in a named context.

An image (``SIZE`` px, RGB in [0, 1]) is drawn from a ``Scene``:
* ``shape`` (``SHAPES``, each one token of SD1.x's CLIP vocabulary): the object's outline, at a random
  centre and radius (position and scale vary);
* ``appearance`` = (body colour, stripe colour) from ``COLOURS`` x ``COLOURS``, the two different: the object
  in its body colour with a broad stripe across its middle (``APPEARANCE_PARTS``);
* ``context`` (``CONTEXTS``): the background, named in captions ("in the snow", "at night").

Captions name the shape and usually the context; they name an appearance's parts as web captions do, some
of the time ("a red circle", "a circle with a blue stripe"), so the world's text pathway knows colour words
as SD1.5's does; and sometimes they name a whole appearance in one word (``APPEARANCE_WORDS``: "a boston
circle", a circle in Boston's colours), as web captions name a breed or a team's colours, so that the world
has words which carry two colours in one token, as SD1.5's vocabulary has words which carry a whole look.
A concept is one shape with one of the ``HELDOUT_APPEARANCES``: those are in no caption and in none of the
encoder's pretraining images (the world's base models see their images, as SD1.5 has seen most things), so
the concept's appearance as a whole reaches the method only through its photo.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

SIZE = 32
SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
CONTEXTS = {"snow": "in the snow", "grass": "on the grass", "beach": "on the beach", "night": "at night"}
# Colour names are each one token of SD1.x's CLIP vocabulary, as the shapes' are.
COLOURS = {"red": (0.9, 0.1, 0.1), "orange": (1.0, 0.55, 0.0), "yellow": (1.0, 0.9, 0.1),
           "purple": (0.55, 0.15, 0.8), "turquoise": (0.0, 0.85, 0.85), "blue": (0.1, 0.25, 1.0)}
# What a scene is, attribute by attribute: what the ground-truth classifier and the vision tower learn to name.
ATTRIBUTES = {"shape": SHAPES, "context": tuple(CONTEXTS), "body": tuple(COLOURS), "mark": tuple(COLOURS)}
APPEARANCE_PARTS = ("body", "mark")  # an appearance's attributes, in its tuple's order: what identity measures
APPEARANCES = tuple(itertools.permutations(COLOURS, 2))
# 6 of the 30 are held out of captions and pretraining (the evaluated concepts have these): each colour once as
# body and once as stripe (the stripe two colours on), so every colour word is still learnt in both roles.
HELDOUT_APPEARANCES = tuple((body, tuple(COLOURS)[(i + 2) % len(COLOURS)]) for i, body in enumerate(COLOURS))
# A word per appearance that is not held out, like a team's name for its two colours (each one token of SD1.x's
# CLIP vocabulary; what a word means here is the world's, not the city's). v6's world had none: textual inversion
# reached identity 0.42 (its ceiling is 0.6), because no token of the world ever carried both colours.
APPEARANCE_WORDS = dict(zip(
    (a for a in APPEARANCES if a not in HELDOUT_APPEARANCES),
    ("paris", "london", "tokyo", "berlin", "rome", "madrid", "vienna", "prague", "dublin", "oslo", "cairo", "lima",
     "delhi", "seoul", "sydney", "boston", "denver", "austin", "dallas", "miami", "chicago", "milan", "naples",
     "geneva"), strict=True))
# The captions the base models learn (the object phrase, then the context phrase); a tenth are empty
# (classifier-free guidance) and a fifth name no context (the tuning prompt "a photo of {}" has none).
CAPTION_TEMPLATES = ("a photo of a {object} {context}", "a {object} {context}", "a picture of a {object} {context}")
NO_CONTEXT_TEMPLATES = ("a photo of a {object}", "a {object}")
# The stripe's half-height in object radii: broad, so that it spans several of the VAE's latent pixels (8x8 at
# 32 px). A world with stripes, checks and dots as a third part of the appearance (v6's first try) drew the
# colours it was told but never the pattern: the pattern stayed at chance after 5,000 steps.
STRIPE = 0.3
WORD_NAMED = 0.25  # how often a caption names a (not held-out) appearance by its word, not by its parts
PART_NAMED = 0.8  # otherwise, how often it names the body colour, and (independently) the stripe colour


@dataclass(frozen=True)
class Scene:
    shape: str
    appearance: tuple[str, str]
    context: str
    centre: tuple[float, float]  # (x, y) pixels
    radius: float  # pixels


def attribute_labels(scenes: list[Scene]) -> dict[str, np.ndarray]:
    """Per attribute (``ATTRIBUTES``), each scene's value as an index: {name: (N,) int64}."""
    values = {"shape": [s.shape for s in scenes], "context": [s.context for s in scenes],
              "body": [s.appearance[0] for s in scenes], "mark": [s.appearance[1] for s in scenes]}
    return {name: np.array([ATTRIBUTES[name].index(v) for v in column], np.int64) for name, column in values.items()}


def random_scene(rng: np.random.Generator, appearances=APPEARANCES, shape: str | None = None,
                 appearance: tuple[str, str] | None = None, context: str | None = None) -> Scene:
    """A scene with the given attributes and the others drawn from ``rng`` (appearance from ``appearances``)."""
    return Scene(shape or SHAPES[rng.integers(len(SHAPES))],
                 appearance or appearances[rng.integers(len(appearances))],
                 context or list(CONTEXTS)[rng.integers(len(CONTEXTS))],
                 (float(rng.uniform(14, SIZE - 14)), float(rng.uniform(14, SIZE - 14))), float(rng.uniform(10.5, 12.5)))


def render_dataset(count: int, seed: int, appearances=APPEARANCES) -> tuple[np.ndarray, list[Scene], list[str]]:
    """``count`` random scenes: images (N, SIZE, SIZE, 3), the scenes and a caption each."""
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng, appearances) for _ in range(count)]
    images = np.stack([render(scene, rng) for scene in scenes])
    return images, scenes, [caption(scene, rng) for scene in scenes]


def object_phrase(shape: str, body: str | None = None, stripe: str | None = None) -> str:
    """"circle", "red circle", "circle with a blue stripe", "red circle with a blue stripe"; ``body`` may also be
    an appearance's word ("boston circle")."""
    return " ".join([*([body] if body else []), shape, *(["with", "a", stripe, "stripe"] if stripe else [])])


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption naming the shape, (usually) the context and, unless the appearance is held out, the appearance:
    by its word with probability ``WORD_NAMED``, else each of its parts with probability ``PART_NAMED``."""
    u = rng.uniform()
    if u < 0.1:
        return ""
    body, mark = scene.appearance
    nameable = scene.appearance not in HELDOUT_APPEARANCES
    if nameable and rng.uniform() < WORD_NAMED:
        phrase = object_phrase(scene.shape, APPEARANCE_WORDS[scene.appearance])
    else:
        named_body = nameable and rng.uniform() < PART_NAMED
        named_mark = nameable and rng.uniform() < PART_NAMED
        phrase = object_phrase(scene.shape, body if named_body else None, mark if named_mark else None)
    if u < 0.3:
        return NO_CONTEXT_TEMPLATES[rng.integers(len(NO_CONTEXT_TEMPLATES))].format(object=phrase)
    template = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
    return template.format(object=phrase, context=CONTEXTS[scene.context])


def caption_words() -> list[str]:
    """Every word a caption can contain: the templates filled with every object phrase and context phrase."""
    objects = " ".join([*(object_phrase(shape, body, mark) for shape in SHAPES for body, mark in APPEARANCES),
                        *APPEARANCE_WORDS.values()])
    contexts = " ".join(CONTEXTS.values())
    text = " ".join(CAPTION_TEMPLATES + NO_CONTEXT_TEMPLATES).format(object=objects, context=contexts)
    return sorted(set(text.split()))


def render(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """(SIZE, SIZE, 3) float32 in [0, 1]; ``rng`` draws the background's texture."""
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5
    image = _background(scene.context, y, rng)
    mask = _shape_mask(scene.shape, (x - scene.centre[0]) / scene.radius, (y - scene.centre[1]) / scene.radius)
    body, mark = scene.appearance
    stripe = np.abs(y - scene.centre[1]) <= STRIPE * scene.radius
    paint = np.where(stripe[..., None], COLOURS[mark], COLOURS[body]).astype(np.float32)
    return np.where(mask[..., None], paint, image).clip(0, 1).astype(np.float32)


def _background(context: str, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A smooth field per context (a little pixel noise; the beach's horizon varies): nothing in it that a model
    could only memorise, so the object's appearance is most of what the diffusion loss can learn about an image."""
    noise = rng.normal(0, 0.015, (SIZE, SIZE, 1)).astype(np.float32)
    if context == "snow":
        return np.full((SIZE, SIZE, 3), (0.92, 0.94, 0.98), np.float32) + noise
    if context == "grass":
        return np.full((SIZE, SIZE, 3), (0.25, 0.6, 0.2), np.float32) + noise
    if context == "beach":
        horizon = SIZE * rng.uniform(0.3, 0.45)
        sky, sand = np.array((0.55, 0.78, 0.97), np.float32), np.array((0.93, 0.83, 0.58), np.float32)
        return np.where((y < horizon)[..., None], sky, sand) + noise
    if context == "night":
        return np.full((SIZE, SIZE, 3), (0.04, 0.05, 0.2), np.float32) + noise
    raise ValueError(f"unknown context {context!r}; expected one of {list(CONTEXTS)}")


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test in the object's unit coordinates (radius 1)."""
    r = np.hypot(u, v)
    if shape == "circle":
        return r <= 1
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.05
    if shape == "square":
        return (np.abs(u) <= 0.85) & (np.abs(v) <= 0.85)
    if shape == "triangle":
        return (v <= 0.8) & (v >= 1.9 * np.abs(u) - 1.0)
    if shape == "cross":
        return ((np.abs(u) <= 0.33) & (np.abs(v) <= 1)) | ((np.abs(v) <= 0.33) & (np.abs(u) <= 1))
    if shape == "star":
        angle = np.arctan2(v, u) + np.pi / 2
        return r <= 0.45 + 0.55 * np.abs(np.cos(2.5 * angle)) ** 3
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
