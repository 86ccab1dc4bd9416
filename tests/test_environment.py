"""The pinned environment: the core stays pure, and each ComfyUI release the tests run starts beside it."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_core_imports_neither_comfyui_nor_diffusers():
    code = ("import sys, datencoder_core; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'comfy', 'diffusers', 'transformers', "
            "'open_clip', 'accelerate'}); print(bad); sys.exit(bool(bad))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_comfyui_starts_with_the_pinned_torch(tmp_path, comfyui_release):
    (tmp_path / "custom_nodes").mkdir()  # a base directory of our own keeps the cached ComfyUI pristine
    result = subprocess.run(
        [sys.executable, "main.py", "--cpu", "--quick-test-for-ci", "--base-directory", str(tmp_path)],
        cwd=comfyui_release, capture_output=True, text=True, timeout=300)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "IMPORT FAILED" not in log and "Cannot import" not in log, log[-3000:]
