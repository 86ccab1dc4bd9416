"""Data-loading speed: samples/s of each pretraining source on this machine (CPU decode), per worker count.

    python -m benchmarks.data                                    # a generated ImageNet-like set: folder and shards
    python -m benchmarks.data --data imagenet/train --data "shards/{00000..01280}.tar" --workers 0 4 8 16

Each source is read the way ``training.pretrain`` reads it (``training.data.streams.training_data``: a folder
takes the exact path, shards the streaming one), decoded, randomly cropped and resized to
``--image-size``, in batches of ``--batch`` on one process. The clock runs from the loader's start
(worker start-up included: timing from the first batch would count the batches the workers prefetched
meanwhile as free) to the last of ``--batches`` batches; the held-out images are read before it starts. Without ``--data``, ``--images`` JPEGs of 500x375
(ImageNet's typical size) are generated in a temporary folder and written as shards of 50 too.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import platform
import tempfile
import warnings
import time
from pathlib import Path

import numpy as np
from PIL import Image

from training.data import sources, streams
from training.make_shards import make_shards
from training.pretrain.config import resolve_config


def generated_images(root: Path, count: int) -> list[str]:
    """``count`` smooth random 500x375 JPEGs in 10 class folders, and the same as shards: two ``--data`` specs."""
    rng = np.random.default_rng(0)
    for i in range(count):
        small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)  # upscaled: JPEG sizes like photos', not noise's
        folder = root / "images" / f"n{i % 10:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(small).resize((500, 375), Image.BICUBIC).save(folder / f"{i}.jpg", quality=90)
    shards = make_shards(root / "images", root / "shards", None, per_shard=50, workers=1, seed=0)
    return [str(root / "images"), f"{root / 'shards'}/{{00000..{len(shards) - 1:05d}}}.tar"]


def samples_per_second(spec: str, workers: int, args: argparse.Namespace) -> float:
    training = dataclasses.replace(resolve_config("default").training, batch_size=args.batch, num_workers=workers,
                                   steps=args.batches, heldout_images=2, shuffle_buffer=100)
    loader, _, _ = streams.training_data(sources.open_sources([spec]), args.image_size, training, 0, 1, 0, None)
    start = time.perf_counter()
    count = sum(len(batch.images) for batch in loader)
    return count / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", action="append", default=[], help="a --data SPEC of training.pretrain (repeatable)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4])
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=16, help="timed batches per measurement")
    parser.add_argument("--images", type=int, default=400, help="generated images, without --data")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", message="This DataLoader will create")  # more workers than cores: measured
    with tempfile.TemporaryDirectory() as tmp:
        specs = args.data or generated_images(Path(tmp), args.images)
        print(f"{platform.machine()} CPU, {os.cpu_count()} cores; image size {args.image_size}, batch {args.batch}, "
              f"{args.batches} timed batches")
        print(f"{'source':60s} {'workers':>7s} {'samples/s':>10s}")
        for spec in specs:
            for workers in args.workers:
                print(f"{spec[-60:]:60s} {workers:7d} {samples_per_second(spec, workers, args):10.1f}", flush=True)


if __name__ == "__main__":
    main()
