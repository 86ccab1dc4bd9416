"""Pretraining data: image sources behind one small interface, and an exact, resumable, sharded order.

A source is a list of ``len(source)`` units, and ``read(unit)`` yields a unit's samples as (key, file
bytes or uint8 array, class word or caption or ""): an image folder or ImageNet's class folders (a unit
is one image), the photos scikit-image ships (the tiny preset), several of those concatenated, or
WebDataset shards (a unit is a shard: ``training.data.shards``). Images are decoded by
``training.data.decode``: bad ones are converted or skipped and counted, never fatal.

A file of a folder that cannot be read (``OSError``) is not a bad image. One such file is skipped,
counted apart (``skipped_unreadable``) and named in a warning; but when the folder itself is gone or
unreachable, or ``UNREADABLE_IN_A_ROW`` files in a row fail, the run stops at once (``DATEncoderError``
naming the folder and the last file): a dropped network mount or a dead disk fails every read, and
skipping would only tell the user after thousands of skipped files (the streaming path, which draws
until a batch is full, would never end). A shard that cannot be read stops the run (``training.data.shards``).

``--data SPEC[@WEIGHT]`` (repeatable) opens a source per SPEC: a folder, ``skimage``, or shards
(``DIR/{00000..00099}.tar``). Folders alone, without weights, take the exact path below; shards or
weights take the streaming path (``training.data.streams``), which mixes the sources by weight.

The order is a function of (seed, global position) only: epoch e = position // N reads the training
images in a permutation seeded by (seed, e), and the crop and flip of each sample are seeded by
(seed, position). Process r of W at step s reads positions s*G + r*G/W ... s*G + (r+1)*G/W - 1 (G is the
global batch). So the position is the step count, resume reads exactly the samples the stopped run
would have read next, and 1 process with batch G sees the same samples, augmented the same, as W
processes with G/W each. A bad image at a position is replaced by the next image of the epoch's
permutation that decodes (that image is then seen twice in the epoch), so the order stays exact.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from datencoder_core.errors import DATEncoderError
from datencoder_core.images import to_rgb
from training.data.decode import Decoded, Unreadable, decode_image
from training.data.shards import ShardSource, is_shard_spec

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# scikit-image's colour photos and the grey ones that look like objects or scenes; all ship in the wheel.
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
                  "retina", "colorwheel", "camera", "coins", "moon", "brick", "grass", "gravel", "clock", "logo")
MIN_CROP = 0.7  # random square crops of 70-100% of the short side (training.min_crop's default)
# Reads are in a seeded random order, so a few unreadable files (a bad sector, a wrong permission) almost
# never come 16 in a row, while a failed mount or disk fails every read: it stops within one batch or two.
UNREADABLE_IN_A_ROW = 16
UNREADABLE_WARNINGS = 20  # per process (and loader worker): later unreadable files are counted, not named
logger = logging.getLogger("datencoder.data")


Raw = tuple[str, "bytes | np.ndarray | Unreadable", str]  # (key, file bytes or uint8 pixels, class word or "")


class ImageSource(Protocol):
    name: str
    indexable: bool  # one sample per unit: the exact folder path can read it

    def __len__(self) -> int:
        """The number of units."""

    def read(self, unit: int) -> Iterator[Raw]:
        """Unit ``unit``'s samples, in order."""


class ImageFolder:
    """Every image under ``root``, in sorted path order. An image inside a sub-folder takes the first
    folder's name as its class word (ImageNet's class folders: the synset id, or its name where
    ``class_names`` maps it); one directly in ``root`` has none. A file that cannot be read is yielded
    as ``Unreadable`` (skipped and counted) with a warning naming it, unless the folder looks gone: then
    ``read`` raises (the module docstring says why)."""

    indexable = True

    def __init__(self, root: Path, class_names: dict[str, str] | None = None):
        self.name, self.root, self.class_names = str(root), root, class_names or {}
        if not root.is_dir():
            raise DATEncoderError(f"--data {root}: no such folder; expected a folder (any tree) of images "
                                  f"({', '.join(IMAGE_SUFFIXES)})")
        self.paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.paths:
            raise DATEncoderError(f"--data {root}: the folder holds no images ({', '.join(IMAGE_SUFFIXES)}, "
                                  f"searched recursively)")
        self.unreadable_in_a_row = self.warned = 0  # in this process (or loader worker)

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, unit: int) -> Iterator[Raw]:
        path = self.paths[unit]
        relative = path.relative_to(self.root)
        word = relative.parts[0] if len(relative.parts) > 1 else ""
        try:
            payload = path.read_bytes()
        except OSError as error:
            payload = self._unreadable(path, error)
        else:
            self.unreadable_in_a_row = 0
        yield relative.as_posix(), payload, self.class_names.get(word, word)

    def _unreadable(self, path: Path, error: OSError) -> Unreadable:
        """Skip one file that cannot be read, with a warning naming it; raise if the folder is gone or
        unreachable, or ``UNREADABLE_IN_A_ROW`` files in a row could not be read."""
        self.unreadable_in_a_row += 1
        try:
            gone = not self.root.is_dir()
        except OSError:  # a stale NFS handle, an I/O error on the folder itself
            gone = True
        if gone or self.unreadable_in_a_row >= UNREADABLE_IN_A_ROW:
            found = ("the folder itself is gone or unreachable" if gone else
                     f"{self.unreadable_in_a_row} files in a row could not be read")
            raise DATEncoderError(f"--data {self.root}: cannot read {path} ({error}), and {found}: is its disk or "
                                  f"network mount still there? Training stops rather than skip every image; "
                                  f"make the folder readable and resume (--resume auto)")
        self.warned += 1
        if self.warned <= UNREADABLE_WARNINGS:
            logger.warning("--data %s: cannot read %s (%s): skipped, counted as data/skipped_unreadable%s", self.root,
                           path, error, "; further unreadable files are counted, not named" if
                           self.warned == UNREADABLE_WARNINGS else "")
        return Unreadable(str(path), str(error))


class SkimagePhotos:
    """The photos scikit-image ships (offline): the tiny preset's data set. Class word: the photo's name."""

    name, indexable = "skimage", True

    def __len__(self) -> int:
        return len(SKIMAGE_PHOTOS)

    def read(self, unit: int) -> Iterator[Raw]:
        from skimage import data

        yield SKIMAGE_PHOTOS[unit], getattr(data, SKIMAGE_PHOTOS[unit])(), SKIMAGE_PHOTOS[unit]


class ConcatSource:
    def __init__(self, sources: Sequence[ImageSource]):
        self.sources = list(sources)
        self.name = " + ".join(s.name for s in self.sources)
        self.indexable = all(s.indexable for s in self.sources)
        self._starts = np.cumsum([0, *map(len, self.sources)])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def read(self, unit: int) -> Iterator[Raw]:
        which = int(np.searchsorted(self._starts, unit, side="right")) - 1
        return self.sources[which].read(unit - int(self._starts[which]))


def load(source: ImageSource, index: int, min_side: int) -> tuple[Decoded, str]:
    """Image ``index`` of an indexable source, decoded (``Decoded.pixels`` None: skipped), and its word."""
    _, payload, word = next(iter(source.read(index)))
    return decode_image(payload, min_side), word


@dataclass(frozen=True)
class Mix:
    """The ``--data`` sources and their weights; ``streaming``: shards or weights were given."""

    sources: list[ImageSource]
    weights: list[float]
    streaming: bool

    @property
    def name(self) -> str:
        return " + ".join(f"{s.name}@{w:g}" if self.streaming else s.name for s, w in zip(self.sources, self.weights))


def parse_spec(spec: str) -> tuple[str, float]:
    """'shards/{0..9}.tar@0.7' -> ('shards/{0..9}.tar', 0.7); no '@': weight 1."""
    path, at, weight = spec.rpartition("@")
    if not at:
        return spec, 1.0
    try:
        value = float(weight)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise DATEncoderError(f"--data {spec}: the weight after '@' must be a number > 0, e.g. {path}@0.7")
    return path, value


def open_source(path: str) -> ImageSource:
    if path == "skimage":
        return SkimagePhotos()
    return ShardSource(path) if is_shard_spec(path) else ImageFolder(Path(path))


def open_sources(specs: Sequence[str]) -> Mix:
    """``--data`` values (``SPEC[@WEIGHT]``): folders, "skimage" for the built-in photos, or shards.
    Missing folders or shards and empty folders are refused here, before training."""
    if not specs:
        raise DATEncoderError("no --data given: pass an image folder or shards (--data DIR, repeatable)")
    parsed = [parse_spec(spec) for spec in specs]
    sources = [open_source(path) for path, _ in parsed]
    streaming = any("@" in spec for spec in specs) or not all(s.indexable for s in sources)
    return Mix(sources, [w for _, w in parsed], streaming)


def check_sources(mix: Mix, min_side: int) -> None:
    """Refuse, before training, a source none of whose files decodes to a usable image (read in order up
    to the first that does: one file for a healthy source)."""
    for source in mix.sources:
        events = Counter()
        for unit in range(len(source)):
            for _, payload, _ in source.read(unit):
                decoded = decode_image(payload, min_side)
                if decoded.pixels is not None:
                    break
                events[decoded.event] += 1
            else:
                continue
            break
        else:
            found = ", ".join(f"{k}: {v}" for k, v in sorted(events.items())) or "no samples"
            raise DATEncoderError(f"--data {source.name}: no usable image in it ({found}; training.min_image_side = "
                                  f"{min_side})")


def split_heldout(source: ImageSource, heldout: int, seed: int) -> tuple[list[int], list[int]]:
    """(training indices, held-out indices): ``heldout`` images of a seeded permutation are never trained on."""
    if len(source) <= heldout:
        raise DATEncoderError(f"--data {source.name}: {len(source)} images, but training.heldout_images = "
                              f"{heldout} are held out for the encoder gain; add images or lower it")
    order = torch.randperm(len(source), generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[heldout:]), sorted(order[:heldout])


def sample_seed(seed: int, position: int, stream: int) -> int:
    """An independent 63-bit seed for one sample's ``stream`` (0: augmentation, 1: noise and timestep)."""
    return int(np.random.SeedSequence([seed, position, stream]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def square_crop(pixels: np.ndarray, size: int, generator: torch.Generator | None,
                min_crop: float = MIN_CROP) -> torch.Tensor:
    """(H, W, C) -> (size, size, 3) in [0, 1]: a square crop (random, ``min_crop`` to all of the short side; or
    the centre one without a ``generator``), randomly flipped, resized (bicubic, antialiased)."""
    image = to_rgb(torch.from_numpy(np.ascontiguousarray(pixels))[None])[0].movedim(-1, 0)  # (3, H, W)
    h, w = image.shape[-2:]
    if generator is None:
        side = min(h, w)
        top, left, flip = (h - side) // 2, (w - side) // 2, False
    else:
        u = torch.rand(4, generator=generator).tolist()
        side = max(1, round(min(h, w) * (min_crop + (1 - min_crop) * u[0])))
        top, left, flip = int(u[1] * (h - side + 1)), int(u[2] * (w - side + 1)), u[3] < 0.5
    crop = image[:, top:top + side, left:left + side]
    crop = crop.flip(-1) if flip else crop
    crop = F.interpolate(crop[None], size=(size, size), mode="bicubic", antialias=True)[0]
    return crop.clamp(0, 1).movedim(0, -1)


class Batch(NamedTuple):
    """What the loaders yield: one process's rows of one step."""

    images: torch.Tensor  # (b, S, S, 3) in [0, 1]
    positions: torch.Tensor  # (b,) global positions: the seeds of each row's noise and timestep
    words: list[str]
    events: Counter  # this batch's decode events ("converted_cmyk": 1, "skipped_corrupt": 2, ...)
    worker: int = 0
    state: dict | None = None  # streaming: the worker's read position after this batch
    latents: torch.Tensor | None = None  # (b, 4, h, w) from the latent cache (training.cache_latents), or None


class ProcessShard(Dataset):
    """This process's samples from ``start_step`` to ``steps``: item k is (image (S, S, 3), position, class word)."""

    def __init__(self, source: ImageSource, indices: list[int], image_size: int, seed: int, global_batch: int,
                 rank: int, world: int, start_step: int, steps: int, min_side: int = 1, min_crop: float = MIN_CROP):
        if global_batch % world:
            raise DATEncoderError(f"training.batch_size {global_batch} is not divisible by the {world} processes")
        self.source, self.indices, self.image_size, self.seed = source, indices, image_size, seed
        self.global_batch, self.local_batch, self.rank = global_batch, global_batch // world, rank
        self.start_step, self.steps, self.min_side, self.min_crop = start_step, steps, min_side, min_crop
        self._permutations: dict[int, list[int]] = {}
        self.events: Counter = Counter()

    def __len__(self) -> int:
        return (self.steps - self.start_step) * self.local_batch

    def __getitem__(self, k: int) -> tuple[torch.Tensor, int, str]:
        step, row = self.start_step + k // self.local_batch, k % self.local_batch
        position = step * self.global_batch + self.rank * self.local_batch + row
        return self.sample(position)

    def sample(self, position: int) -> tuple[torch.Tensor, int, str]:
        epoch, offset = divmod(position, len(self.indices))
        if epoch not in self._permutations:
            generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, 2))
            self._permutations = {epoch: torch.randperm(len(self.indices), generator=generator).tolist()}
        permutation = self._permutations[epoch]
        for tried in range(len(permutation)):  # a bad image: the next one of the permutation that decodes
            decoded, word = load(self.source, self.indices[permutation[(offset + tried) % len(permutation)]],
                                 self.min_side)
            if decoded.event:
                self.events[decoded.event] += 1
            if decoded.pixels is not None:
                generator = torch.Generator().manual_seed(sample_seed(self.seed, position, 0))
                return square_crop(decoded.pixels, self.image_size, generator, self.min_crop), position, word
        raise DATEncoderError(f"--data {self.source.name}: none of the {len(permutation)} training images decodes "
                              f"({', '.join(sorted(self.events))})")

    def __getitems__(self, ks: list[int]) -> Batch:
        """One batch (the DataLoader's batched fetch), with the decode events met while reading it."""
        self.events = Counter()
        images, positions, words = zip(*(self[k] for k in ks))
        return Batch(torch.stack(images), torch.tensor(positions), list(words), self.events)


def _as_is(batch: Batch) -> Batch:
    return batch


def shard_loader(shard: ProcessShard, num_workers: int) -> DataLoader:
    """Batches (``Batch``) of this process's shard in order."""
    return DataLoader(shard, batch_size=shard.local_batch, shuffle=False, num_workers=num_workers,
                      collate_fn=_as_is, persistent_workers=num_workers > 0, drop_last=False,
                      pin_memory=torch.cuda.is_available())


def heldout_images(source: ImageSource, indices: list[int], image_size: int,
                   min_side: int = 1) -> tuple[torch.Tensor, list[str]]:
    """The held-out images that decode, centre-cropped: (n, S, S, 3), and their class words."""
    loaded = [load(source, i, min_side) for i in indices]
    kept = [(d.pixels, w) for d, w in loaded if d.pixels is not None]
    if not kept:
        raise DATEncoderError(f"--data {source.name}: none of the held-out images decodes")
    return torch.stack([square_crop(p, image_size, None) for p, _ in kept]), [w for _, w in kept]

