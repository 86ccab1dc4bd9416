"""WebDataset shards: the img2dataset layout, read with ``webdataset``, written by the preparation commands.

    SHARDS/00000.tar   KEY.jpg (or .png, .webp, ...)   the image
                       KEY.txt                         caption or class name (optional)
                       KEY.json                        metadata (optional)

LAION, COYO and DataComp subsets as img2dataset downloads them are this layout; so are the shards that
``training.make_shards`` (image folders, ImageNet) and ``training.prepare_openimages`` write. ``--data``
names them with brace expansion: ``--data "SHARDS/{00000..01023}.tar"``. A unit of a ``ShardSource`` is
one shard (``training.data``). Where every shard has its latent cache (``NAME.latents.safetensors``,
``training.cache_latents``), a sample comes with its cached latent.

Shards are written under a temporary name and renamed when complete, one shard per job, by a process
pool: a command interrupted and run again writes only the missing shards.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import torch
from braceexpand import braceexpand
from safetensors import safe_open
from tqdm.auto import tqdm
from webdataset import TarWriter
from webdataset.tariterators import group_by_keys, tar_file_expander

from datencoder_core.atomic import atomic_write
from datencoder_core.errors import DATEncoderError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
logger = logging.getLogger("datencoder.shards")


def is_shard_spec(spec: str) -> bool:
    return spec.endswith(".tar") or (".tar" in spec and "{" in spec)


class Cached(NamedTuple):
    """A shard sample's image bytes and its cached latent (None: the cache has none for it)."""

    image: bytes
    latent: torch.Tensor | None  # (4, h, w) float16


def cache_path(shard: Path) -> Path:
    return shard.with_name(f"{shard.name.removesuffix('.tar')}.latents.safetensors")


class ShardSource:
    """The shards a brace pattern names, in its order; every one must exist. ``cache_size``: the
    resolution of the latent caches if every shard has one, else None."""

    indexable = False

    def __init__(self, spec: str):
        self.name = spec
        self.shards = [Path(p) for p in braceexpand(spec)]
        missing = [p for p in self.shards if not p.is_file()]
        if missing:
            raise DATEncoderError(f"--data {spec}: shard {missing[0]} does not exist ({len(missing)} of the "
                                  f"{len(self.shards)} shards the pattern names are missing); fix the pattern "
                                  f"(e.g. DIR/{{00000..00099}}.tar) or write the shards again")
        self.cache_size = None
        if all(cache_path(p).is_file() for p in self.shards):
            with safe_open(str(cache_path(self.shards[0])), "pt") as cache:
                self.cache_size = int(cache.metadata()["image_size"])

    def __len__(self) -> int:
        return len(self.shards)

    def read(self, unit: int) -> Iterator[tuple[str, bytes | Cached, str]]:
        """Shard ``unit``'s samples: (key, image bytes (b"" if the sample has none) or ``Cached``, caption or "")."""
        latents = None
        if self.cache_size is not None:
            with safe_open(str(cache_path(self.shards[unit])), "pt") as cache:
                latents = {key: cache.get_tensor(key) for key in cache.keys()}
        for sample in read_shard(self.shards[unit]):
            image = next((sample[e] for e in IMAGE_EXTENSIONS if e in sample), b"")
            key, word = sample["__key__"], sample.get("txt", b"").decode("utf-8", "replace").strip()
            yield key, image if latents is None else Cached(image, latents.get(key)), word


def read_shard(path: Path) -> Iterator[dict[str, Any]]:
    """The samples of one tar shard (webdataset's grouping by key); a missing or broken shard raises
    ``DATEncoderError`` naming it."""
    try:
        with open(path, "rb") as stream:
            yield from group_by_keys(tar_file_expander([{"url": str(path), "stream": stream}]))
    except FileNotFoundError:
        raise DATEncoderError(f"shard {path} does not exist (any more); restore it or drop it from --data") from None
    except (OSError, ValueError) as error:
        raise DATEncoderError(f"shard {path}: not a readable tar file ({error}); write it again") from None


def write_shards(out: Path, jobs: Sequence[Sequence[Any]], make_sample: Callable[[Any], tuple[dict | None, str | None]],
                 workers: int, what: str) -> Counter:
    """Write ``jobs[i]`` to ``out/{i:05d}.tar`` (``make_sample(item)`` -> (webdataset sample or None, event
    or None)), in ``workers`` processes, with a progress bar over items; shards already complete are kept.
    Returns the events counted over the shards written now, plus "written" and "kept_shards"."""
    out.mkdir(parents=True, exist_ok=True)
    todo = [i for i in range(len(jobs)) if not shard_path(out, i).is_file()]
    counts = Counter(kept_shards=len(jobs) - len(todo))
    if counts["kept_shards"]:
        logger.info("%s: %d of %d shards already complete, kept", out, counts["kept_shards"], len(jobs))
    tasks = [(out, i, jobs[i], make_sample) for i in todo]
    with tqdm(total=sum(len(jobs[i]) for i in todo), unit="img", desc=what) as progress:
        if workers > 1:
            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                for done in pool.imap_unordered(_write_shard, tasks):
                    counts.update(done)
                    progress.update(done["items"])
        else:
            for task in tasks:
                done = _write_shard(task)
                counts.update(done)
                progress.update(done["items"])
    counts.pop("items", None)
    return counts


def shard_path(out: Path, index: int) -> Path:
    return out / f"{index:05d}.tar"


def _write_shard(task) -> Counter:
    out, index, items, make_sample = task
    final = shard_path(out, index)
    counts = Counter(items=len(items))
    with atomic_write(final) as tmp, TarWriter(str(tmp), encoder=False, mtime=0) as writer:
        for item in items:
            sample, event = make_sample(item)
            if event:
                counts[event] += 1
            if sample is not None:
                writer.write(sample)
                counts["written"] += 1
    return counts


def read_class_names(path: Path) -> dict[str, str]:
    """A class-id -> name file: ImageNet's ``LOC_synset_mapping.txt`` / ``synset_words.txt`` lines
    ("n01440764 tench, Tinca tinca": the first name is kept) or OpenImages' class-description CSV
    ("/m/011k07,Tortoise")."""
    if not path.is_file():
        raise DATEncoderError(f"--class-names {path}: no such file; expected lines 'n01440764 tench, Tinca tinca' "
                              f"(ImageNet) or '/m/011k07,Tortoise' (OpenImages)")
    names = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        key, _, rest = line.partition(",") if "," in line.split(" ", 1)[0] else line.strip().partition(" ")
        names[key.strip()] = rest.split(",")[0].strip().strip('"')
    if not names:
        raise DATEncoderError(f"--class-names {path}: the file is empty")
    return names


def sample_key(text: str) -> str:
    """A webdataset key from a path: no dots (they split keys from extensions), no slashes."""
    return text.replace("/", "__").replace(".", "_")
