"""The output folder of a pretraining run: its config, its checkpoints, and the exported encoder.

    DIR/config.json                      the resolved config and the run's inputs, written before step 1
    DIR/checkpoints/step-0005000/        accelerate's save_state: optimizer, scheduler, RNG states, the
                                         run's step, and encoder.safetensors (the DATEncoder Loader's file)
    DIR/checkpoints/.step-0010000.tmp/   a checkpoint being written: renamed when complete, else ignored
    DIR/logs/                            TensorBoard
    DIR/samples/step-0010000.png         image grids
    DIR/datencoder.safetensors           the exported encoder, at the end

A checkpoint is written under a temporary name and renamed when every process has finished writing,
so a kill at any moment leaves the previous checkpoints whole; ``--resume auto`` takes the newest
complete one. The last ``checkpoints_total_limit`` are kept.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from datencoder_core.atomic import atomic_write_text
from datencoder_core.checkpoint import (ENCODER_FORMAT, ENCODER_FORMAT_VERSION, load_encoder, read_safetensors,
                                        save_encoder)
from datencoder_core.encoder import DATEncoder
from datencoder_core.errors import DATEncoderError

CHECKPOINT = re.compile(r"^step-(\d{7})$")
ENCODER_FILE = "encoder.safetensors"
EXPORTED = "datencoder.safetensors"


class TrainState:
    """The run's position, saved with every checkpoint (``accelerator.register_for_checkpointing``): the
    step, from which the folder path's data position follows (``training.data``), and the streaming
    path's read positions, one list of worker positions per process (``training.data.streams``)."""

    def __init__(self):
        self.step = 0
        self.data: list | None = None

    def state_dict(self) -> dict:
        return {"step": self.step, "data": self.data}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.data = int(state["step"]), state.get("data")


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return output_dir / "checkpoints" / f"step-{step:07d}"


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """The complete checkpoints, oldest first (temporary folders of interrupted writes are skipped)."""
    folder = output_dir / "checkpoints"
    found = [p for p in folder.iterdir() if CHECKPOINT.match(p.name) and p.is_dir()] if folder.is_dir() else []
    return sorted(found, key=lambda p: p.name)


def check_output_dir(output_dir: Path, run: dict[str, Any], resume: str | None) -> Path | None:
    """Before anything starts: refuse a folder holding another run, or a run's checkpoints without
    ``--resume``; return the checkpoint to resume from (None: start at step 0)."""
    if output_dir.exists() and not output_dir.is_dir():
        raise DATEncoderError(f"--output-dir {output_dir}: is a file; pass a folder")
    saved = output_dir / "config.json"
    if saved.is_file():
        previous = json.loads(saved.read_text())
        differences = _differences(previous, json.loads(json.dumps(run)))  # tuples as JSON lists
        if differences:
            shown = "; ".join(f"{key}: {old!r} there, {new!r} now" for key, old, new in differences[:5])
            raise DATEncoderError(f"--output-dir {output_dir} holds a run with another configuration ({shown}); "
                                  f"it cannot be resumed with this one: pass the same config, or a new "
                                  f"--output-dir")
    checkpoints = complete_checkpoints(output_dir)
    if resume is None:
        if checkpoints:
            raise DATEncoderError(f"--output-dir {output_dir} holds checkpoints (newest {checkpoints[-1].name}); "
                                  f"pass --resume auto to continue that run, or a new --output-dir")
        return None
    if resume == "auto":
        return checkpoints[-1] if checkpoints else None
    path = Path(resume)
    if not (path.is_dir() and CHECKPOINT.match(path.name) and (path / ENCODER_FILE).is_file()):
        listed = ", ".join(p.name for p in checkpoints) or "none"
        raise DATEncoderError(f"--resume {resume}: not a complete checkpoint folder (step-XXXXXXX holding "
                              f"{ENCODER_FILE}); complete checkpoints in {output_dir}: {listed}")
    return path


def _differences(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for key in sorted(set(old) | set(new))
                for d in _differences(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else key)]
    return [] if old == new else [(prefix, old, new)]


def write_run(output_dir: Path, run: dict[str, Any]) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output_dir / "config.json", json.dumps(run, indent=2, sort_keys=True))


def save_checkpoint(accelerator, output_dir: Path, step: int, limit: int) -> Path:
    """``accelerator.save_state`` into ``.step-XXXXXXX.tmp``, renamed to ``step-XXXXXXX`` once every
    process has written its part; then all but the newest ``limit`` are removed. Call on every process."""
    final = checkpoint_dir(output_dir, step)
    tmp = final.with_name(f".{final.name}.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        os.replace(tmp, final)
        for old in complete_checkpoints(output_dir)[:-limit]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def write_encoder(encoder: DATEncoder, path: Path, run: dict[str, Any], step: int) -> str:
    """The DATEncoder Loader's file, with the run's config and step in its metadata."""
    return save_encoder(encoder, path, name="datencoder-pretrained",
                        extra_metadata={"pretrain_config": json.dumps(run, sort_keys=True), "pretrain_step": str(step)})


def export_checkpoint(checkpoint: Path, out: Path) -> str:
    """Copy a checkpoint's encoder file (validated, metadata kept) to ``out``; return its encoder_id."""
    source = checkpoint / ENCODER_FILE
    if not source.is_file():
        raise DATEncoderError(f"{checkpoint}: not a pretraining checkpoint (no {ENCODER_FILE}); pass a "
                              f"DIR/checkpoints/step-XXXXXXX folder")
    encoder, _ = load_encoder(source)
    _, metadata = read_safetensors(source, ENCODER_FORMAT, (ENCODER_FORMAT_VERSION,))
    return write_encoder(encoder, out, json.loads(metadata["pretrain_config"]), int(metadata["pretrain_step"]))
