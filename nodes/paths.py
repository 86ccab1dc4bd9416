"""Model folders of the pack, registered through ``folder_paths`` so extra_model_paths.yaml works, and
where Save Concept and Export put their files."""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

import folder_paths

from ..datencoder_core import DATEncoderError, holds

ENCODERS = "datencoder"  # models/datencoder/: encoder weights
CONCEPTS = "datencoder_concepts"  # models/datencoder_concepts/: saved concepts
SUFFIX = ".safetensors"


def register() -> None:
    """Add ``models/datencoder`` and ``models/datencoder_concepts`` (first in the search order; paths
    that extra_model_paths.yaml gave these keys stay, after them); list .safetensors only. Idempotent.
    Must run before any node schema is built: the Loader and Load Concept schemas list these keys."""
    for key in (ENCODERS, CONCEPTS):
        folder_paths.add_model_folder_path(key, os.path.join(folder_paths.models_dir, key), is_default=True)
        paths, _ = folder_paths.folder_names_and_paths[key]
        folder_paths.folder_names_and_paths[key] = (paths, {SUFFIX})


def name_problem(name: str) -> str | None:
    """None when ``name`` is a plain file name (``.safetensors`` optional); else what is wrong with it."""
    stem = name.strip()
    if stem.endswith(SUFFIX):
        stem = stem[:-len(SUFFIX)]
    if not stem or stem in (".", "..") or "/" in stem or "\\" in stem or os.path.basename(stem) != stem:
        return f"file name {name!r}: expected a plain name such as 'my_cat', without folders"
    return None


@dataclass(frozen=True)
class SaveTarget:
    """Where ``choose_paths`` put a save: the paths, and whether they already held the same content."""

    paths: list[str]
    unchanged: bool


def choose_paths(keys: list[str], name: str, overwrite: bool,
                 contents: list[tuple[dict, dict[str, str]]]) -> SaveTarget:
    """Where files that belong together go: one per folder key in ``keys`` (its first path), all named
    ``<name>.safetensors``, with ``contents[i]`` = (tensors, metadata) for ``keys[i]``.

    Never fails on an existing name, like ComfyUI's own save nodes: ``<name>`` when free (or
    ``overwrite``); when the files there already hold exactly ``contents``, those (``unchanged``: nothing
    needs writing, so re-running a workflow adds no file); else the first ``<name>_00001``,
    ``<name>_00002``, ... that is free or holds ``contents``. An existing file is never replaced unless
    ``overwrite``. Raises ``DATEncoderError`` for a name with folders (``name_problem``)."""
    problem = name_problem(name)
    if problem is not None:
        raise DATEncoderError(problem)
    stem = name.strip().removesuffix(SUFFIX)
    folders = [folder_paths.get_folder_paths(key)[0] for key in keys]
    for counter in itertools.count():
        file_name = (stem if counter == 0 else f"{stem}_{counter:05d}") + SUFFIX
        paths = [os.path.join(folder, file_name) for folder in folders]
        existing = [os.path.exists(path) for path in paths]
        if overwrite or not any(existing):
            for folder in folders:
                os.makedirs(folder, exist_ok=True)
            return SaveTarget(paths, unchanged=False)
        if all(existing) and all(holds(path, *content) for path, content in zip(paths, contents)):
            return SaveTarget(paths, unchanged=True)
