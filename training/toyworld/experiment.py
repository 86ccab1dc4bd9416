"""The toy world's experiment: pretrain encoders and evaluate them with the project's own CLIs.

``pretrain`` runs ``training.pretrain.train.main`` on the world (``--base DIR/sd --clip-vision ... --data
DIR/pretraining_images --config FILE``), once per embedding regularization of claim 3 (the paper's
``contrastive``, and ``none``); ``evaluate`` runs ``training.evaluate.run.main`` per encoder and seed with the
world's concepts, prompts and ground-truth scorer (``WorldTruth``). Both are skipped where their results are on disk
(an exported encoder, a ``metrics.json``), so a rerun only does what is missing. ``pretrain_all`` does the two
pretrainings, ``evaluate_all`` every evaluation, each up to ``jobs`` at a time in processes of one torch thread each: on
two cores, two single-threaded runs finish sooner than one run with two threads (small batches use a
second thread poorly). Every run is seeded, so the results do not depend on ``jobs``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable

import torch
import yaml

from training.evaluate import run as evaluate
from training.pretrain import checkpoints
from training.pretrain import train as pretrain
from training.toyworld.checks import GUIDANCE
from training.toyworld.models import WorldShapes
from training.toyworld.truth import WorldTruth
from training.toyworld.world import SIZE as WORLD_SIZE

log = logging.getLogger(__name__)
PROMPTS = Path(__file__).parent / "prompts.txt"
REGULARIZATIONS = ("contrastive", "none")  # claim 3: the paper's Eq. 3 against no embedding regularization
# The pretraining prompts, in the world's own words: training.pretrain's default templates (CLIP's ImageNet ones)
# have words no world caption has ("close-up", "rendition"), whose embeddings are zeroed (models.forget_unused_words).
TEMPLATES = ("a photo of {}", "a photo of a {}", "a picture of a {}", "a {}")


@dataclasses.dataclass(frozen=True)
class ExperimentPlan:
    """Pretraining length, the seeds and the evaluation's size."""

    pretrain_steps: int = 4000
    pretrain_batch: int = 8
    seeds: tuple[int, ...] = (0, 1, 2)  # evaluation seeds: tuning noise/timesteps and sampling noise
    # Identity against tuning steps, for scratch and for the encoder's start (claim 4): 12 is ``scratch`` / ``full``,
    # 0 of the encoder is ``encoder_only``. Four points keep make toyworld near its 15 minutes on 2 cores.
    curve_steps: tuple[int, ...] = (0, 12, 48, 300)
    images_per_prompt: int = 2
    sampling_steps: int = 20
    guidance: float = GUIDANCE

    def variants(self, regularization: str) -> list[str]:
        """Every variant for the paper's encoder; only ``full`` for the claim-3 comparison encoder."""
        if regularization != "contrastive":
            return ["full"]
        return ["full", "encoder_only", "no_dual_path", "scratch", *[f"scratch:{n}" for n in self.curve_steps if n != 12],
                *[f"full:{n}" for n in self.curve_steps if n not in (0, 12)]]


FULL_EXPERIMENT = ExperimentPlan()
REDUCED_EXPERIMENT = ExperimentPlan(pretrain_steps=50, seeds=(0, 1), curve_steps=(0, 12, 24), images_per_prompt=1,
                                    sampling_steps=8)


def pretrain_config(plan: ExperimentPlan, regularization: str, shapes: WorldShapes) -> dict:
    """The ``--config`` of a world pretraining run: the world's encoder shapes, a CPU-sized loop."""
    steps = plan.pretrain_steps
    return {
        "encoder": dataclasses.asdict(shapes.encoder_config()),
        "loss": {"contrastive_weight": 0.1},  # as the tiny preset: a visible share of a short run's loss
        "training": {"steps": steps, "batch_size": plan.pretrain_batch, "lr": 1e-3, "warmup_steps": steps // 20,
                     "mixed_precision": "no", "allow_tf32": False, "heldout_images": 8, "heldout_timesteps": 2,
                     "checkpoint_every": steps // 4, "checkpoints_total_limit": 1, "log_every": 10,
                     "validation_every": steps, "sample_every": steps, "sample_images": 2, "sample_steps": 10,
                     "num_workers": 0, "embedding_regularization": regularization, "seed": 0,
                     "templates": list(TEMPLATES),
                     "min_image_side": WORLD_SIZE,  # the world's images are all this small
                     # no random crops: the world's models only ever saw whole images, and on zoomed crops the UNet's
                     # loss doubles, so the encoder learnt a dW for zooming: its dW raised the loss on whole images
                     # even for the 16 images it trained on for 200 epochs (docs/toyworld.md)
                     "min_crop": 1.0},
    }


def pretrain_encoder(world: Path, output: Path, plan: ExperimentPlan, regularization: str) -> Path:
    """The exported encoder of the world's pretraining run with ``regularization`` (run if missing)."""
    exported = output / checkpoints.EXPORTED
    if exported.is_file():
        log.info("reusing %s", exported)
        return exported
    output.mkdir(parents=True, exist_ok=True)
    config = output.parent / f"{output.name}.yaml"
    config.write_text(yaml.safe_dump(pretrain_config(plan, regularization, WorldShapes())))
    return pretrain.main(["--base", str(world / "sd"), "--clip-vision", str(world / "clip_vision.safetensors"),
                          "--data", str(world / "pretraining_images"), "--output-dir", str(output),
                          "--config", str(config), "--resume", "auto"])


def evaluate_encoder(world: Path, encoder: Path, output: Path, plan: ExperimentPlan, regularization: str,
                     seed: int) -> dict:
    """``training.evaluate``'s metrics.json content for one encoder and seed (run if missing)."""
    summary = output / "metrics.json"
    if summary.is_file():
        return json.loads(summary.read_text())
    return evaluate.main([
        "--encoder", str(encoder), "--base", str(world / "sd"), "--clip-vision", str(world / "clip_vision.safetensors"),
        "--concepts", str(world / "concepts"), "--metrics-models", str(world / "metrics_models"), "--tiny-metrics",
        "--prompts", str(PROMPTS), "--output", str(output),
        "--variants", *plan.variants(regularization), "--images-per-prompt", str(plan.images_per_prompt),
        "--sampling-steps", str(plan.sampling_steps), "--guidance", str(plan.guidance), "--seed", str(seed)],
        scorers=[WorldTruth(world / "truth.safetensors")])


def _map(jobs: int, function: Callable, calls: list[tuple]) -> list:
    """``[function(*call) for call in calls]``, in this process (``jobs`` = 1) or up to ``jobs`` at once in
    spawned processes of one torch thread each; an exception in any call is raised here."""
    if jobs == 1:
        return [function(*call) for call in calls]
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=torch.set_num_threads, initargs=(1,)) as pool:
        return list(pool.map(function, *zip(*calls)))


def pretrain_all(world: Path, output: Path, plan: ExperimentPlan, jobs: int = 1) -> dict[str, Path]:
    """{regularization: exported encoder} of the world's pretraining runs (``REGULARIZATIONS``), run if missing."""
    return dict(zip(REGULARIZATIONS, _map(jobs, pretrain_encoder, [
        (world, output / "pretrain" / regularization, plan, regularization) for regularization in REGULARIZATIONS])))


def evaluate_all(world: Path, encoders: dict[str, Path], output: Path, plan: ExperimentPlan,
                 jobs: int = 1) -> dict[str, dict[int, dict]]:
    """{regularization: {seed: metrics.json content}} of every evaluation of ``encoders``, run if missing."""
    units = [(regularization, seed) for regularization in REGULARIZATIONS for seed in plan.seeds]
    metrics = _map(jobs, evaluate_encoder, [
        (world, encoders[regularization], output / "evaluate" / f"{regularization}-seed{seed}", plan, regularization,
         seed) for regularization, seed in units])
    results: dict[str, dict[int, dict]] = {regularization: {} for regularization in REGULARIZATIONS}
    for (regularization, seed), summary in zip(units, metrics):
        results[regularization][seed] = summary
    return results
