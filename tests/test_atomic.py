"""Every file the project writes goes through ``datencoder_core.atomic``: whole, or not at all."""

import numpy as np
import pytest
from PIL import Image

from datencoder_core.atomic import atomic_write, atomic_write_text, temporary_sibling


def test_a_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("old")
    atomic_write_text(path, "new")
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "grid.png"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_write(path) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("disk full")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["grid.png"]


def test_the_temporary_keeps_the_suffix_so_writers_pick_the_format(tmp_path):
    """PIL, matplotlib and torchvision choose the format by the suffix: ``x.png`` is written as a PNG."""
    path = tmp_path / "grid.png"
    assert temporary_sibling(path).suffix == ".png" and temporary_sibling(path).name.startswith(".")
    with atomic_write(path) as tmp:
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp)
    assert Image.open(path).format == "PNG"
