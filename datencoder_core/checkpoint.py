"""Safetensors files with JSON metadata: atomic writing, validated reading, and the encoder file.

Every file the project writes has ``format`` and ``format_version`` in its header, so a reader can
say precisely what a wrong file is. Writes go to a temporary file that replaces the target only
when complete, so a failure never leaves a half-written file; files that belong together (an
exported LoRA and its embedding) are written all or none. Files get the mode ``open()`` gives (0644
under the usual umask 022), as ComfyUI's own outputs do.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
import torch
from torch import Tensor

from .atomic import temporary_sibling
from .config import EncoderConfig, LoRAConfig
from .encoder import DATEncoder
from .errors import DATEncoderError
from .sites import LoRASite, architecture_fingerprint

ENCODER_FORMAT = "datencoder.encoder"
ENCODER_FORMAT_VERSION = 1


FileContents = tuple[dict[str, Tensor], str | os.PathLike, dict[str, str]]  # (tensors, path, metadata)


def atomic_save(tensors: dict[str, Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """Write one safetensors file atomically (see ``atomic_save_all``)."""
    atomic_save_all([(tensors, path, metadata)])


def atomic_save_all(files: Sequence[FileContents]) -> None:
    """Write several safetensors files as one: afterwards all of them are in place, or none changed.

    Each file is first written in full to a temporary sibling (``atomic.temporary_sibling``) with ``open()``'s
    default mode; only then are they moved onto their paths, one ``os.replace`` each. A file being replaced
    is moved aside first (another sibling, kind ``old``), so if a later move fails, the files already moved
    are taken back out and the replaced ones restored. Raises ``DATEncoderError`` naming the file that could
    not be written; no temporary file remains either way. (One file alone: ``atomic.atomic_write``.)
    """
    staged: list[tuple[Path, Path]] = []  # (temporary file, target)
    moved: list[tuple[Path, Path | None]] = []  # (target, its previous content moved aside, or None)
    path = None
    try:
        for tensors, path, metadata in files:
            path = Path(path)
            tmp = temporary_sibling(path, "tmp")
            staged.append((tmp, path))
            data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for tmp, path in staged:
            old = temporary_sibling(path, "old") if path.is_file() else None
            if old is not None:
                os.replace(path, old)
            try:
                os.replace(tmp, path)
            except OSError:
                if old is not None:
                    os.replace(old, path)
                raise
            moved.append((path, old))
    except OSError as error:
        for done, old in reversed(moved):
            if old is not None:
                os.replace(old, done)
            else:
                done.unlink()
        moved.clear()
        unchanged = " (no file was changed)" if len(staged) > 1 else ""
        raise DATEncoderError(f"{path}: could not write the file ({error.strerror or error}){unchanged}") from None
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        for _, old in moved:
            if old is not None:
                old.unlink()


def holds(path: str | os.PathLike, tensors: dict[str, Tensor], metadata: dict[str, str]) -> bool:
    """True when ``path`` is a safetensors file with exactly these tensors (names, dtypes, values) and this
    metadata: saving them there again would change nothing. False for a missing or unreadable file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}) != metadata or set(f.keys()) != set(tensors):
                return False
            return all(_same(f.get_tensor(key), tensor) for key, tensor in tensors.items())
    except (SafetensorError, OSError, ValueError):
        return False


def _same(stored: Tensor, tensor: Tensor) -> bool:
    return stored.dtype == tensor.dtype and torch.equal(stored, tensor.detach().cpu())


def read_safetensors(path: str | os.PathLike, expected_format: str,
                     supported_versions: tuple[int, ...]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Load tensors and header of a project file, checking its ``format`` and ``format_version``."""
    path = Path(path)
    if not path.is_file():
        raise DATEncoderError(f"{path}: no such file")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise DATEncoderError(f"{path}: not a readable .safetensors file (corrupt or truncated?): {error}") from None
    found = metadata.get("format")
    if found != expected_format:
        what = f"a '{found}' file" if found else "a safetensors file without DATEncoder metadata"
        raise DATEncoderError(f"{path}: expected a '{expected_format}' file, found {what}")
    version = metadata.get("format_version", "")
    if not version.isdigit() or int(version) not in supported_versions:
        raise DATEncoderError(f"{path}: format_version {version!r} is not supported by this DATEncoder "
                              f"(supported: {list(supported_versions)}); update the extension")
    return tensors, metadata


def save_encoder(encoder: DATEncoder, path: str | os.PathLike, name: str = "datencoder",
                 extra_metadata: dict[str, str] | None = None) -> str:
    """Write ``encoder`` with its configs, sites and base fingerprint; return its ``encoder_id``
    (``name`` plus a hash of the weights), which concepts made with it record. ``extra_metadata``
    (pretraining writes its config and step) is stored beside them; it cannot replace their keys."""
    state = encoder.state_dict()
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().float().cpu().numpy().tobytes())
    encoder_id = f"{name}@{digest.hexdigest()[:12]}"
    metadata = {
        "format": ENCODER_FORMAT,
        "format_version": str(ENCODER_FORMAT_VERSION),
        "encoder_id": encoder_id,
        "encoder_config": json.dumps(encoder.config.to_dict()),
        "lora_config": json.dumps(encoder.lora_config.to_dict()),
        "sites": json.dumps([[s.name, s.in_features, s.out_features] for s in encoder.sites]),
        "base_fingerprint": architecture_fingerprint(encoder.sites, encoder.config.token_dim),
    }
    clash = sorted(set(extra_metadata or {}) & set(metadata))
    if clash:
        raise DATEncoderError(f"save_encoder: extra_metadata may not set {clash}")
    atomic_save(state, path, {**(extra_metadata or {}), **metadata})
    return encoder_id


def load_encoder(path: str | os.PathLike) -> tuple[DATEncoder, str]:
    """Read an encoder file written by ``save_encoder``: (encoder in eval mode, encoder_id). The header's
    base fingerprint must be that of its sites; Personalize Concept compares it with the MODEL's."""
    tensors, metadata = read_safetensors(path, ENCODER_FORMAT, (ENCODER_FORMAT_VERSION,))
    try:
        config = EncoderConfig.from_dict(json.loads(metadata["encoder_config"]))
        lora_config = LoRAConfig.from_dict(json.loads(metadata["lora_config"]))
        sites = tuple(LoRASite(n, i, o) for n, i, o in json.loads(metadata["sites"]))
        stored_fingerprint = metadata["base_fingerprint"]
    except (KeyError, TypeError, ValueError) as error:
        raise DATEncoderError(f"{path}: damaged encoder header ({error})") from None
    if stored_fingerprint != architecture_fingerprint(sites, config.token_dim):
        raise DATEncoderError(f"{path}: damaged encoder header: its base_fingerprint {stored_fingerprint} does not "
                              f"match its own sites ({architecture_fingerprint(sites, config.token_dim)})")
    encoder = DATEncoder(config, lora_config, sites)
    try:
        encoder.load_state_dict(tensors)
    except RuntimeError as error:
        raise DATEncoderError(f"{path}: weights do not match the header's configuration: {error}") from None
    return encoder.eval(), metadata["encoder_id"]


# Set in the safetensors metadata of files with untrained weights (the demo model set's), to what the weights are
# (e.g. "random weights"): the nodes say so beside what such a file makes, so nobody takes it for a result.
DEMO_KEY = "datencoder_demo"


def demo_weights(path: str | os.PathLike) -> str | None:
    """The ``DEMO_KEY`` metadata of the (readable) safetensors file at ``path``: what its weights are when it is
    a demo file, else None."""
    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get(DEMO_KEY)


def check_base_model(what: str, made_for: str, target: str, used_with: str) -> None:
    """The pack's one base-model check: raise ``DATEncoderError`` when ``what`` (a concept or an encoder,
    named with its file, e.g. "the concept cat.safetensors") was made for another base model than
    ``target``, the model it is used with (e.g. "this MODEL"). ``made_for`` and ``used_with`` are
    ``architecture_fingerprint``s: equal for every checkpoint of one architecture (SD1.5 and its
    fine-tunes), so only a different architecture is refused."""
    if made_for != used_with:
        raise DATEncoderError(f"{what} was made for another base model (fingerprint {made_for}) than {target}, "
                              f"which it is used with (fingerprint {used_with}). Use it with the SD1.x checkpoint "
                              f"it was made for (or a fine-tune of it), or use one made for {target}")
