"""The latent cache: each shard image's VAE latent, computed once, so pretraining skips the VAE encoder.

    python -m training.cache_latents --data "shards/imagenet/{00000..01281}.tar" --base v1-5-pruned-emaonly.safetensors \\
        [--device cuda] [--dtype bf16] [--batch 32]
    python -m training.cache_latents --data "SHARDS/{00000..00007}.tar" --models tiny   # the CPU check's models

Beside each shard ``NAME.tar`` it writes ``NAME.latents.safetensors``: per sample key, the latent of the
image's centre square crop at the base model's resolution (what ``DiffusersReferenceBackend.encode_latents``
computes: the posterior mean times the scaling factor), in float16; its metadata holds the resolution
and each crop's (top, left, side) in the decoded image. Images that do not decode (``training.data.decode``)
get none. Written under a temporary name, renamed when complete; run again, it writes only the missing
files. Training reads either: when every ``--data`` source has a complete cache it takes the latents and
the same centre crops (no random crops or flips then), else it encodes as usual.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from datencoder_core.atomic import atomic_write
from datencoder_core.errors import DATEncoderError
from datencoder_core.reference import vae_latents
from training.data.decode import decode_image
from training.data.shards import ShardSource, cache_path
from training.data.sources import square_crop
from training.models.loading import DTYPES, load_vae

logger = logging.getLogger("datencoder.cache_latents")


@torch.no_grad()
def cache_shard(shard: Path, vae, image_size: int, min_side: int, batch: int) -> int:
    """Write ``shard``'s cache; returns the number of latents written."""
    latents, crops, pending = {}, {}, []

    def flush():
        images = torch.stack([image for _, image in pending])
        encoded = vae_latents(vae, images, image_size)
        latents.update({key: row.to("cpu", torch.float16).contiguous() for (key, _), row in zip(pending, encoded)})
        pending.clear()

    source = ShardSource(str(shard))
    for key, payload, _ in source.read(0):
        decoded = decode_image(payload, min_side)
        if decoded.pixels is None:
            continue
        height, width = decoded.pixels.shape[:2]
        side = min(height, width)
        crops[key] = [(height - side) // 2, (width - side) // 2, side]
        pending.append((key, square_crop(decoded.pixels, image_size, None)))
        if len(pending) == batch:
            flush()
    if pending:
        flush()
    final = cache_path(shard)
    with atomic_write(final) as tmp:
        save_file(latents, str(tmp), metadata={"image_size": str(image_size), "crops": json.dumps(crops)})
    return len(latents)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.cache_latents", description=__doc__.split("\n")[0])
    parser.add_argument("--data", action="append", required=True, help="shards, as --data of training.pretrain")
    parser.add_argument("--base", type=Path, help="SD1.5 single-file checkpoint (.safetensors) or diffusers folder")
    parser.add_argument("--models", choices=("files", "tiny"), default="files")
    parser.add_argument("--min-image-side", type=int, default=128, help="as training.min_image_side")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    shards = [shard for spec in args.data for shard in ShardSource(spec).shards]
    todo = [shard for shard in shards if not cache_path(shard).is_file()]
    logger.info("%d shards, %d cached already", len(shards), len(shards) - len(todo))
    vae, image_size = load_vae(args.base, tiny=args.models == "tiny", dtype=DTYPES[args.dtype], device=args.device)
    written = sum(cache_shard(shard, vae, image_size, args.min_image_side, args.batch)
                  for shard in tqdm(todo, unit="shard", desc="latents"))
    logger.info("%d latents written", written)
    return written


if __name__ == "__main__":
    try:
        main()
    except DATEncoderError as error:
        sys.exit(f"error: {error}")
