"""The pinned environment: the core stays pure, and each ComfyUI release the tests run starts beside it."""

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

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


def test_comfyui_starts_with_the_pinned_torch(tmp_path, comfyui_release):
    (tmp_path / "custom_nodes").mkdir()  # a base directory of our own keeps the cached ComfyUI pristine
    result = subprocess.run(
        [sys.executable, "main.py", "--cpu", "--quick-test-for-ci", "--base-directory", str(tmp_path)],
        cwd=comfyui_release, capture_output=True, text=True, timeout=300)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "IMPORT FAILED" not in log and "Cannot import" not in log, log[-3000:]
    # ComfyUI ran with this interpreter: its torch and torchvision are the pinned ones
    started_with = re.search(r"pytorch version: (\S+)", log)
    assert started_with is not None, log[-3000:]
    assert (_public(started_with.group(1)), _public(metadata.version("torch"))) == (_pinned("torch"),) * 2
    assert _public(metadata.version("torchvision")) == _pinned("torchvision")


def _lock() -> dict:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    pins = [Requirement(line) for line in (REPO / "requirements.lock").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    lock = {canonicalize_name(pin.name): Version(next(iter(pin.specifier)).version) for pin in pins}
    assert "torchaudio==2.11.0" in (REPO / "Makefile").read_text()  # installed beside the lock, see its header
    return lock | {"torchaudio": Version("2.11.0")}


def test_the_lock_meets_the_requirements_of_each_comfyui(comfyui_release):
    """Every package in the release's requirements.txt is pinned in requirements.lock at a version its
    specifier admits. One exception: ComfyUI pins its own front-end packages (``comfyui-*==``) exactly,
    and two releases pin different ones; the lock holds 0.30.0's, which must not be older."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    lock = _lock()
    lines = (comfyui_release / "requirements.txt").read_text().splitlines()
    requirements = [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]
    assert len(requirements) > 20
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        assert name in lock, f"{comfyui_release}/requirements.txt needs {requirement}; requirements.lock lacks it"
        front_end_pin = name.startswith("comfyui-") and all(s.operator == "==" for s in requirement.specifier)
        if front_end_pin:
            assert lock[name] >= Version(next(iter(requirement.specifier)).version), (requirement, lock[name])
        else:
            assert requirement.specifier.contains(lock[name], prereleases=True), (requirement, lock[name])
