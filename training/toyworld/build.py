"""Build the toy world once, or reuse it: models, ground-truth classifier, pretraining images, concepts.

A world folder (``world_folder``: under the cache, named by the budget and this module's ``VERSION``)::

    sd/                        the world's "SD1.5" (diffusers folder, training.toyworld.models)
    clip_vision.safetensors    its vision tower (open_clip keys)
    truth.safetensors          the ground-truth classifier (training.toyworld.truth)
    metrics_models/            random tiny DINO/CLIP files (training.evaluate.metrics.TINY): evaluate computes
                               those metrics too, but on this world only truth_* mean anything
    pretraining_images/        --data for training.pretrain (held-out appearances left out)
    concepts/                  --concepts for training.evaluate (held-out appearances)
    build.json                 the budget, the seconds each part took, the held-out accuracy of the vision
                               tower and of the classifier, what the world's models can do (``checks``)

It is built in a temporary sibling folder renamed when complete, so an interrupted build leaves no
half-written world; a later run reuses a complete one. ``shipped_world`` makes the same folder from the models
the repository ships (``training.toyworld.shipped``): links to them, and the data drawn from the same seeds.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path

from training.evaluate.metrics import TINY, write_random_metric_models
from training.toyworld import checks, files, shipped
from training.toyworld.checks import world_checks
from training.toyworld.models import WorldBudget, WorldShapes, train_world_models
from training.toyworld.truth import train_truth

log = logging.getLogger(__name__)
VERSION = 7  # bump when the world or its training changes, so caches rebuild (5: sd/loader.json; 6: the world that can
# draw; 7: appearance words)
DEFAULT_CACHE = Path.home() / ".cache" / "datencoder"


@dataclasses.dataclass(frozen=True)
class WorldPlan:
    """What one world is: model budget, classifier steps, how many pretraining images and concepts."""

    budget: WorldBudget = WorldBudget()
    truth_steps: int = 800
    pretraining_images: int = 3000
    concepts: int = 6
    photos_per_concept: int = 3
    oracle_steps: int = checks.ORACLE_TUNING.steps  # the ceilings' per-concept tuning (checks.ceilings)

    @property
    def name(self) -> str:
        b = self.budget
        return (f"toyworld-v{VERSION}-i{b.images}-v{b.vae_steps}-u{b.unet_steps}-b{b.batch_size}-lr{b.unet_lr:g}"
                f"-vt{b.vision_steps}-s{b.seed}-t{self.truth_steps}-p{self.pretraining_images}"
                f"-c{self.concepts}x{self.photos_per_concept}-o{self.oracle_steps}")


FULL = WorldPlan()
# The test's world: the pipeline end to end in a few minutes; too short for the UNet to follow prompts.
REDUCED = WorldPlan(WorldBudget(images=2000, vae_steps=200, unet_steps=400, batch_size=16, vision_steps=1000),
                    truth_steps=500, pretraining_images=600, concepts=3, oracle_steps=10)


def world_folder(plan: WorldPlan, cache: Path = DEFAULT_CACHE) -> Path:
    """The world of ``plan`` under ``cache``, built first if it is not there (module docstring)."""
    folder = Path(cache) / plan.name
    if (folder / "build.json").is_file():
        log.info("reusing the toy world %s", folder)
        return folder
    staging = _staging(folder)
    seconds = {}
    start = time.perf_counter()
    vision_accuracy = train_world_models(staging, WorldShapes(), plan.budget)
    seconds["models"] = time.perf_counter() - start
    start = time.perf_counter()
    accuracy = train_truth(staging / "truth.safetensors", plan.truth_steps, plan.budget.seed)
    seconds["truth"] = time.perf_counter() - start
    write_world_data(staging, plan)
    start = time.perf_counter()
    checks = world_checks(staging, plan.oracle_steps)
    seconds["checks"] = time.perf_counter() - start
    build = {"plan": dataclasses.asdict(plan), "seconds": seconds, "vision_accuracy": vision_accuracy,
             "truth_accuracy": accuracy, "checks": checks}
    (staging / "build.json").write_text(json.dumps(build, indent=2))
    staging.rename(folder)
    log.info("built the toy world %s in %.0f s", folder, sum(seconds.values()))
    return folder


def write_world_data(folder: Path, plan: WorldPlan) -> None:
    """The world's data, drawn from ``plan``'s seeds: tiny metric models, pretraining images, concepts."""
    write_random_metric_models(folder / "metrics_models", TINY)
    files.write_pretraining_images(folder / "pretraining_images", plan.pretraining_images, plan.budget.seed + 2)
    files.write_concepts(folder / "concepts", plan.concepts, plan.photos_per_concept, plan.budget.seed + 3)


def plan_from_dict(values: dict) -> WorldPlan:
    """The ``WorldPlan`` that ``dataclasses.asdict`` wrote (a build.json's or a manifest's "plan")."""
    return WorldPlan(**{**values, "budget": WorldBudget(**values["budget"])})


def shipped_world(cache: Path = DEFAULT_CACHE, source: Path = shipped.SHIPPED) -> Path:
    """The world folder of the shipped models (``shipped.read_manifest`` checks them first) under ``cache``:
    links to the models in ``source``, its data drawn from the seeds of the plan they were built with, and the
    build's ``build.json``."""
    manifest = shipped.read_manifest(source)
    folder = Path(cache) / f"toyworld-shipped-v{VERSION}-{shipped.sha256(source / shipped.MANIFEST)[:12]}"
    if (folder / "build.json").is_file():
        return folder
    staging = _staging(folder)
    for name in shipped.WORLD_MODELS:
        (staging / name).symlink_to((source / "world" / name).resolve())
    write_world_data(staging, plan_from_dict(manifest["build"]["plan"]))
    (staging / "build.json").write_text(json.dumps(manifest["build"], indent=2))
    staging.rename(folder)
    return folder


def _staging(folder: Path) -> Path:
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging
