"""The pinned environment: the core stays pure, and the real ComfyUI 0.30.0 starts beside it."""

import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_core_imports_neither_comfyui_nor_diffusers():
    code = ("import sys, datencoder_core; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'comfy', 'diffusers', 'transformers', "
            "'open_clip', 'accelerate'}); print(bad); sys.exit(bool(bad))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _pinned(package: str) -> str:
    """The version requirements.lock pins for ``package``."""
    pins = dict(line.split("==") for line in (REPO / "requirements.lock").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    return pins[package]


def _public(version: str) -> str:
    """A version without its local build tag: 2.14.1+cu130 -> 2.14.1."""
    return version.split("+")[0]


def test_comfyui_starts_with_the_pinned_torch(tmp_path):
    comfyui = Path(os.environ.get("COMFYUI_PATH", ""))
    if not (comfyui / "main.py").is_file():
        pytest.fail(f"COMFYUI_PATH={comfyui!s} has no main.py: run the tests with 'make test', which fetches ComfyUI")
    (tmp_path / "custom_nodes").mkdir()  # a base directory of our own keeps the cached ComfyUI pristine
    result = subprocess.run(
        [sys.executable, "main.py", "--cpu", "--quick-test-for-ci", "--base-directory", str(tmp_path)],
        cwd=comfyui, capture_output=True, text=True, timeout=300)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "IMPORT FAILED" not in log and "Cannot import" not in log, log[-3000:]
    # ComfyUI ran with this interpreter: its torch and torchvision are the pinned ones
    started_with = re.search(r"pytorch version: (\S+)", log)
    assert started_with is not None, log[-3000:]
    assert (_public(started_with.group(1)), _public(metadata.version("torch"))) == (_pinned("torch"),) * 2
    assert _public(metadata.version("torchvision")) == _pinned("torchvision")
