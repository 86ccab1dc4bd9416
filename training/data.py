"""Pretraining data: image sources behind one small interface, and an exact, resumable, sharded order.

A source is anything with ``__len__`` and ``load(index) -> (image, class word or "")``, the image an
(H, W, C) float array in [0, 1]: an image folder, the photos scikit-image ships (the tiny preset), or
several of them concatenated. Streaming formats (WebDataset shards, OpenImages crops) plug in here.

The order is a function of (seed, global position) only: epoch e = position // N reads the training
images in a permutation seeded by (seed, e), and the crop and flip of each sample are seeded by
(seed, position). Process r of W at step s reads positions s*G + r*G/W ... s*G + (r+1)*G/W - 1 (G is the
global batch). So the position is the step count, resume reads exactly the samples the stopped run
would have read next, and 1 process with batch G sees the same samples, augmented the same, as W
processes with G/W each.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from datencoder_core.errors import DATEncoderError
from datencoder_core.images import to_rgb

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# scikit-image's colour photos and the grey ones that look like objects or scenes; all ship in the wheel.
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
                  "retina", "colorwheel", "camera", "coins", "moon", "brick", "grass", "gravel", "clock", "logo")
MIN_CROP = 0.7  # random square crops of 70-100% of the short side


class ImageSource(Protocol):
    name: str

    def __len__(self) -> int: ...

    def load(self, index: int) -> tuple[np.ndarray, str]:
        """Image ``index`` as (H, W, C) float32 in [0, 1], C in 1, 3, 4; and its class word, or ""."""


class ImageFolder:
    """Every image under ``root``, in sorted path order. An image inside a sub-folder takes the first
    folder's name as its class word (ImageNet's class folders); one directly in ``root`` has none."""

    def __init__(self, root: Path):
        self.name, self.root = str(root), root
        if not root.is_dir():
            raise DATEncoderError(f"--data {root}: no such folder; expected a folder (any tree) of images "
                                  f"({', '.join(IMAGE_SUFFIXES)})")
        self.paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.paths:
            raise DATEncoderError(f"--data {root}: the folder holds no images ({', '.join(IMAGE_SUFFIXES)}, "
                                  f"searched recursively)")

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> tuple[np.ndarray, str]:
        path = self.paths[index]
        try:
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        except (OSError, UnidentifiedImageError) as error:
            raise DATEncoderError(f"{path}: not a readable image ({error})") from None
        relative = path.relative_to(self.root).parts
        return pixels, relative[0] if len(relative) > 1 else ""


class SkimagePhotos:
    """The photos scikit-image ships (offline): the tiny preset's data set. Class word: the photo's name."""

    name = "skimage"

    def __len__(self) -> int:
        return len(SKIMAGE_PHOTOS)

    def load(self, index: int) -> tuple[np.ndarray, str]:
        from skimage import data

        pixels = getattr(data, SKIMAGE_PHOTOS[index])()
        pixels = pixels[..., None] if pixels.ndim == 2 else pixels
        return pixels.astype(np.float32) / 255.0, SKIMAGE_PHOTOS[index]


class ConcatSource:
    def __init__(self, sources: Sequence[ImageSource]):
        self.sources = list(sources)
        self.name = " + ".join(s.name for s in self.sources)
        self._starts = np.cumsum([0, *map(len, self.sources)])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def load(self, index: int) -> tuple[np.ndarray, str]:
        which = int(np.searchsorted(self._starts, index, side="right")) - 1
        return self.sources[which].load(index - int(self._starts[which]))


def open_sources(names: Sequence[str]) -> ImageSource:
    """``--data`` values: image folders, or "skimage" for the built-in photos. Checked before training."""
    if not names:
        raise DATEncoderError("no --data given: pass an image folder (--data DIR, repeatable)")
    return ConcatSource([SkimagePhotos() if name == "skimage" else ImageFolder(Path(name)) for name in names])


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


def square_crop(pixels: np.ndarray, size: int, generator: torch.Generator | None) -> torch.Tensor:
    """(H, W, C) -> (size, size, 3) in [0, 1]: a square crop (random, or the centre one without a
    ``generator``), randomly flipped, resized (bicubic, antialiased)."""
    image = to_rgb(torch.from_numpy(np.ascontiguousarray(pixels))[None])[0].movedim(-1, 0)  # (3, H, W)
    h, w = image.shape[-2:]
    if generator is None:
        side = min(h, w)
        top, left, flip = (h - side) // 2, (w - side) // 2, False
    else:
        u = torch.rand(4, generator=generator).tolist()
        side = max(1, round(min(h, w) * (MIN_CROP + (1 - MIN_CROP) * u[0])))
        top, left, flip = int(u[1] * (h - side + 1)), int(u[2] * (w - side + 1)), u[3] < 0.5
    crop = image[:, top:top + side, left:left + side]
    crop = crop.flip(-1) if flip else crop
    crop = F.interpolate(crop[None], size=(size, size), mode="bicubic", antialias=True)[0]
    return crop.clamp(0, 1).movedim(0, -1)


class ProcessShard(Dataset):
    """This process's samples from ``start_step`` to ``steps``: item k is (image (S, S, 3), position, class word)."""

    def __init__(self, source: ImageSource, indices: list[int], image_size: int, seed: int, global_batch: int,
                 rank: int, world: int, start_step: int, steps: int):
        if global_batch % world:
            raise DATEncoderError(f"training.batch_size {global_batch} is not divisible by the {world} processes")
        self.source, self.indices, self.image_size, self.seed = source, indices, image_size, seed
        self.global_batch, self.local_batch, self.rank = global_batch, global_batch // world, rank
        self.start_step, self.steps = start_step, steps
        self._permutations: dict[int, list[int]] = {}

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
        pixels, word = self.source.load(self.indices[self._permutations[epoch][offset]])
        generator = torch.Generator().manual_seed(sample_seed(self.seed, position, 0))
        return square_crop(pixels, self.image_size, generator), position, word


def _collate(samples):
    images, positions, words = zip(*samples)
    return torch.stack(images), torch.tensor(positions), list(words)


def shard_loader(shard: ProcessShard, num_workers: int) -> DataLoader:
    """Batches of this process's shard in order (images (b, S, S, 3), positions (b,), words)."""
    return DataLoader(shard, batch_size=shard.local_batch, shuffle=False, num_workers=num_workers,
                      collate_fn=_collate, persistent_workers=num_workers > 0, drop_last=False)


def heldout_images(source: ImageSource, indices: list[int], image_size: int) -> tuple[torch.Tensor, list[str]]:
    """The held-out images, centre-cropped: (n, S, S, 3), and their class words."""
    loaded = [source.load(i) for i in indices]
    return torch.stack([square_crop(p, image_size, None) for p, _ in loaded]), [w for _, w in loaded]

