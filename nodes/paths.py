"""Model folders of the pack, registered through ``folder_paths`` so extra_model_paths.yaml works."""

from __future__ import annotations

import os

import folder_paths

from ..datencoder_core import DATEncoderError

ENCODERS = "datencoder"  # models/datencoder/: encoder weights
CONCEPTS = "datencoder_concepts"  # models/datencoder_concepts/: saved concepts


def register() -> None:
    """Add ``models/datencoder`` and ``models/datencoder_concepts`` (first in the search order; paths
    that extra_model_paths.yaml gave these keys stay, after them); list .safetensors only. Idempotent.
    Must run before any node schema is built: the Loader and Load Concept schemas list these keys."""
    for key in (ENCODERS, CONCEPTS):
        folder_paths.add_model_folder_path(key, os.path.join(folder_paths.models_dir, key), is_default=True)
        paths, _ = folder_paths.folder_names_and_paths[key]
        folder_paths.folder_names_and_paths[key] = (paths, {".safetensors"})


def output_path(key: str, name: str, overwrite: bool) -> str:
    """Where a new file ``name`` goes in folder ``key`` (its first path). ``name`` must be a plain file
    name; ``.safetensors`` is added if missing. Refuses to replace a file unless ``overwrite``."""
    name = name.strip()
    if not name or name in (".", "..") or os.path.basename(name) != name or "\\" in name or "/" in name:
        raise DATEncoderError(f"file name {name!r}: expected a plain name such as 'my_cat', without folders")
    if not name.endswith(".safetensors"):
        name += ".safetensors"
    folder = folder_paths.get_folder_paths(key)[0]
    path = os.path.join(folder, name)
    if os.path.exists(path) and not overwrite:
        raise DATEncoderError(f"{path} exists; choose another name or switch 'overwrite' on")
    os.makedirs(folder, exist_ok=True)
    return path
