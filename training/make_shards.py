"""Write an image folder (ImageNet's class folders, or any tree of images) as WebDataset shards.

    python -m training.make_shards --data imagenet/train --out shards/imagenet \\
        [--class-names LOC_synset_mapping.txt] [--per-shard 1000] [--workers 8] [--seed 0]

Reading a few thousand large tar files instead of 1.28 M small ones is what network storage needs. The
images go into the shards as they are (their bytes, not decoded again: bad ones are skipped at training,
``training.data.decode``), in a seeded random order, so each shard holds many classes. Each sample:
``KEY.jpg`` (or the file's own extension), ``KEY.txt`` the class word (the first folder's name, or its
name in ``--class-names``), ``KEY.json`` {"path", "class"}. Interrupted, the same command writes only the
missing shards. Then: ``python -m training.pretrain --data "shards/imagenet/{00000..01280}.tar" ...``.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
from pathlib import Path

import torch

from datencoder_core.errors import DATEncoderError
from training.data.shards import read_class_names, sample_key, write_shards
from training.data.sources import ImageFolder

logger = logging.getLogger("datencoder.make_shards")


def folder_sample(item: tuple[str, str, str], root: Path) -> tuple[dict, None]:
    relative, suffix, word = item
    payload = (root / relative).read_bytes()
    return {"__key__": sample_key(relative[: -len(suffix)]), suffix[1:].lower(): payload, "txt": word.encode(),
            "json": json.dumps({"path": relative, "class": word}).encode()}, None


def make_shards(data: Path, out: Path, class_names: Path | None, per_shard: int, workers: int, seed: int) -> list[Path]:
    """Shards of every image under ``data``; returns their paths (the complete set, kept ones included)."""
    if per_shard < 1:
        raise DATEncoderError(f"--per-shard {per_shard}: must be >= 1")
    folder = ImageFolder(data, read_class_names(class_names) if class_names else None)
    items = []
    for path in folder.paths:
        relative = path.relative_to(data)
        word = relative.parts[0] if len(relative.parts) > 1 else ""
        items.append((relative.as_posix(), path.suffix, folder.class_names.get(word, word)))
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    items = [items[i] for i in order]
    jobs = [items[i:i + per_shard] for i in range(0, len(items), per_shard)]
    counts = write_shards(out, jobs, functools.partial(folder_sample, root=data), workers, "make_shards")
    logger.info("%s: %d shards (%d kept), %d images written now", out, len(jobs), counts["kept_shards"], counts["written"])
    return [out / f"{i:05d}.tar" for i in range(len(jobs))]


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(prog="python -m training.make_shards", description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="image folder (class sub-folders give the class word)")
    parser.add_argument("--out", type=Path, required=True, help="folder for 00000.tar, 00001.tar, ...")
    parser.add_argument("--class-names", type=Path, help="synset -> name file (ImageNet's LOC_synset_mapping.txt)")
    parser.add_argument("--per-shard", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    shards = make_shards(args.data, args.out, args.class_names, args.per_shard, args.workers, args.seed)
    logger.info("train on them with --data \"%s/{00000..%05d}.tar\"", args.out, len(shards) - 1)
    return shards


if __name__ == "__main__":
    try:
        main()
    except DATEncoderError as error:
        sys.exit(f"error: {error}")
