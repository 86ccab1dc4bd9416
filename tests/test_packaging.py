"""The wheel holds every module and data file of ``datencoder_core`` and ``training`` (package discovery, not a
hand-kept list: a new room or data file cannot be left out)."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _tracked(*roots: str) -> set[str]:
    files = subprocess.run(["git", "ls-files", *roots], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return set(files.split())


def test_the_wheel_holds_every_module_and_data_file(tmp_path):
    source = tmp_path / "source"  # the committed files only, so no stale build/ of the checkout can fill gaps
    for name in _tracked():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, source / name)
    # The project's own setuptools, no download: the build runs offline like everything else in the tests.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "--wheel-dir", str(tmp_path), str(source)], check=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("comfyui_datencoder-*.whl")
    inside = set(zipfile.ZipFile(wheel).namelist())
    expected = _tracked("datencoder_core", "training")
    missing = sorted(expected - inside)
    assert not missing, f"not in the wheel: {missing}"
    assert "training/models/configs/sd15/tokenizer/vocab.json" in inside  # a data file, not a module
