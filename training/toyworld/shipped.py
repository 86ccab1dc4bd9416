"""The toy world and its pretrained encoders as the repository ships them, so that ``make toyworld`` and the tests
need no training (``python -m training.toyworld --rebuild`` makes them again).

``SHIPPED`` (``training/toyworld/shipped/``)::

    manifest.json                  the build command and plans (seeds included), the sha256 of every file below,
                                   the build's checks and ceilings (``checks.world_checks``) and seconds
    world/sd/                      the world's "SD1.5" (diffusers folder, ``models.load_world_models``)
    world/clip_vision.safetensors  its vision tower
    world/truth.safetensors        the ground-truth classifier
    encoders/<regularization>.safetensors   the pretrained encoders (``experiment.REGULARIZATIONS``)

Nothing else is shipped: the concept photos, the pretraining images and the tiny metric models are drawn from
seeds (``build.write_world_data``) into a folder under the cache, beside links to the shipped models.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

from datencoder_core import DATEncoderError
from datencoder_core.atomic import temporary_sibling

log = logging.getLogger(__name__)
SHIPPED = Path(__file__).parent / "shipped"
MANIFEST = "manifest.json"
WORLD_MODELS = ("sd", "clip_vision.safetensors", "truth.safetensors")  # what of a world folder is shipped


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: Path) -> dict[str, str]:
    """{path relative to ``folder``: sha256} of every file under it but the manifest, sorted."""
    return {p.relative_to(folder).as_posix(): sha256(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


def ship(world: Path, encoders: dict[str, Path], manifest: dict, target: Path = SHIPPED) -> Path:
    """Copy the models of ``world`` (``WORLD_MODELS``) and ``encoders`` ({regularization: exported file}) into
    ``target`` with a manifest (``manifest`` plus the files' sha256), replacing what was there only once all is
    written."""
    staging = temporary_sibling(target)
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "world").mkdir(parents=True)
    (staging / "encoders").mkdir()
    for name in WORLD_MODELS:
        source = world / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, staging / "world" / name)
    for regularization, path in encoders.items():
        shutil.copy(path, staging / "encoders" / f"{regularization}.safetensors")
    (staging / MANIFEST).write_text(json.dumps({**manifest, "files": _files(staging)}, indent=2) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    log.info("shipped the toy world to %s (%.1f MB)", target,
             sum(p.stat().st_size for p in target.rglob("*") if p.is_file()) / 1e6)
    return target


def read_manifest(source: Path = SHIPPED) -> dict:
    """The manifest of ``source``, after checking every file it lists against its sha256."""
    path = source / MANIFEST
    if not path.is_file():
        raise DATEncoderError(f"{path}: no shipped toy world here; make one with python -m training.toyworld "
                              f"--rebuild")
    manifest = json.loads(path.read_text())
    for name, expected in manifest["files"].items():
        file = source / name
        if not file.is_file():
            raise DATEncoderError(f"{file}: missing from the shipped toy world; restore it (git checkout) or run "
                                  f"python -m training.toyworld --rebuild")
        if sha256(file) != expected:
            raise DATEncoderError(f"{file}: its sha256 differs from {path}'s (a Git LFS pointer, or a changed "
                                  f"file?); restore it (git checkout) or run python -m training.toyworld --rebuild")
    return manifest


def shipped_encoders(source: Path = SHIPPED) -> dict[str, Path]:
    """{regularization: encoder file} of the shipped encoders."""
    return {p.stem: p for p in sorted((source / "encoders").glob("*.safetensors"))}
