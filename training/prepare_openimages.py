"""OpenImages with its largest object cropped (paper Sec. 5: ImageNet-1K plus OpenImages crops), as shards.

    python -m training.prepare_openimages --images openimages/train --boxes oidv6-train-annotations-bbox.csv \\
        --out shards/openimages [--class-names oidv7-class-descriptions-boxable.csv] \\
        [--margin 0.0] [--min-size 128] [--per-shard 1000] [--workers 8] [--seed 0]

For each image (``--images/<ImageID>.jpg``) the box of largest area in the CSV (OpenImages' columns
ImageID, LabelName, XMin, XMax, YMin, YMax in [0, 1], IsGroupOf) is cropped once: group-of boxes (a
crowd, a shelf of bottles) are not one object and are passed over. The box grows by ``--margin`` of its
width and height on each side (clipped to the image); a box whose short side is below ``--min-size``
pixels skips the image. Each crop is written as JPEG (quality 95) with its class name (``--class-names``
maps the MID /m/... to a name; without it the MID is the class word) and {"image_id", "label", "box"} in
its json. Shards are written by a process pool with a progress bar; interrupted, the same command
writes only the missing shards. Skipped images are counted per reason.
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import logging
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from datencoder_core.errors import DATEncoderError
from training.data.decode import decode_image
from training.data.shards import read_class_names, write_shards

logger = logging.getLogger("datencoder.prepare_openimages")
COLUMNS = ("ImageID", "LabelName", "XMin", "XMax", "YMin", "YMax")


class Box(NamedTuple):
    image_id: str
    label: str
    x_min: float  # normalised to [0, 1], as in the CSV
    x_max: float
    y_min: float
    y_max: float

    @property
    def area(self) -> float:
        return (self.x_max - self.x_min) * (self.y_max - self.y_min)


def largest_boxes(csv_path: Path) -> dict[str, Box]:
    """ImageID -> its largest box that is not a group-of box (the first of equal ones), reading the CSV
    once as a stream (the training CSV has 14.6 M rows)."""
    if not csv_path.is_file():
        raise DATEncoderError(f"--boxes {csv_path}: no such file; expected OpenImages' box annotations "
                              f"(oidv6-train-annotations-bbox.csv)")
    best: dict[str, Box] = {}
    with open(csv_path, newline="", encoding="utf-8") as stream:
        reader = csv.DictReader(stream)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DATEncoderError(f"--boxes {csv_path}: columns {missing} missing; expected OpenImages' header "
                                  f"({', '.join(COLUMNS)}, IsGroupOf, ...), found {reader.fieldnames}")
        for row in tqdm(reader, unit="box", desc="boxes", mininterval=2):
            if row.get("IsGroupOf") == "1":
                continue
            box = Box(row["ImageID"], row["LabelName"], *(float(row[c]) for c in COLUMNS[2:]))
            if box.image_id not in best or box.area > best[box.image_id].area:
                best[box.image_id] = box
    return best


def crop_box(pixels: np.ndarray, box: Box, margin: float) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """(crop (h, w, 3), (left, top, right, bottom) in pixels) of ``box`` grown by ``margin`` per side."""
    height, width = pixels.shape[:2]
    grow_x, grow_y = margin * (box.x_max - box.x_min), margin * (box.y_max - box.y_min)
    left, right = max(0, round((box.x_min - grow_x) * width)), min(width, round((box.x_max + grow_x) * width))
    top, bottom = max(0, round((box.y_min - grow_y) * height)), min(height, round((box.y_max + grow_y) * height))
    return pixels[top:bottom, left:right], (left, top, right, bottom)


def crop_sample(box: Box, images: Path, names: dict[str, str], margin: float,
                min_size: int) -> tuple[dict | None, str | None]:
    path = images / f"{box.image_id}.jpg"
    if not path.is_file():
        return None, "skipped_missing_file"
    decoded = decode_image(path.read_bytes(), 1)
    if decoded.pixels is None:
        return None, decoded.event
    crop, pixel_box = crop_box(decoded.pixels, box, margin)
    if min(crop.shape[:2]) < min_size:
        return None, "skipped_small_box"
    encoded = io.BytesIO()
    Image.fromarray(np.round(crop * 255).astype(np.uint8)).save(encoded, format="JPEG", quality=95)
    name = names.get(box.label, box.label)
    return {"__key__": box.image_id, "jpg": encoded.getvalue(), "txt": name.encode(),
            "json": json.dumps({"image_id": box.image_id, "label": box.label, "class": name,
                                "box": pixel_box}).encode()}, decoded.event


def prepare(images: Path, boxes: Path, out: Path, class_names: Path | None, margin: float, min_size: int,
            per_shard: int, workers: int, seed: int) -> dict[str, int]:
    """Write the shards; returns the counts (written, kept_shards, skipped_<reason>, converted_<kind>)."""
    if not images.is_dir():
        raise DATEncoderError(f"--images {images}: no such folder; expected OpenImages' <ImageID>.jpg files")
    if margin < 0 or per_shard < 1:
        raise DATEncoderError(f"--margin {margin} must be >= 0 and --per-shard {per_shard} >= 1")
    names = read_class_names(class_names) if class_names else {}
    best = largest_boxes(boxes)
    if not best:
        raise DATEncoderError(f"--boxes {boxes}: no box (other than group-of boxes) in it")
    ids = sorted(best)
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed)).tolist()
    chosen = [best[ids[i]] for i in order]
    jobs = [chosen[i:i + per_shard] for i in range(0, len(chosen), per_shard)]
    make = functools.partial(crop_sample, images=images, names=names, margin=margin, min_size=min_size)
    counts = write_shards(out, jobs, make, workers, "crops")
    logger.info("%s: %d shards; %s", out, len(jobs), ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    logger.info("train on them with --data \"%s/{00000..%05d}.tar\"", out, len(jobs) - 1)
    return dict(counts)


def main(argv: list[str] | None = None) -> dict[str, int]:
    parser = argparse.ArgumentParser(prog="python -m training.prepare_openimages", description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=Path, required=True, help="folder of <ImageID>.jpg")
    parser.add_argument("--boxes", type=Path, required=True, help="oidv6-train-annotations-bbox.csv")
    parser.add_argument("--out", type=Path, required=True, help="folder for 00000.tar, 00001.tar, ...")
    parser.add_argument("--class-names", type=Path, help="oidv7-class-descriptions-boxable.csv (MID,name)")
    parser.add_argument("--margin", type=float, default=0.0, help="grow the box by this share of its size per side")
    parser.add_argument("--min-size", type=int, default=128, help="skip boxes whose short side is below (pixels)")
    parser.add_argument("--per-shard", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return prepare(args.images, args.boxes, args.out, args.class_names, args.margin, args.min_size,
                   args.per_shard, args.workers, args.seed)


if __name__ == "__main__":
    try:
        main()
    except DATEncoderError as error:
        sys.exit(f"error: {error}")
