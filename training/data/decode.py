"""Decoding training images from any source without ever stopping a run on a bad file.

``decode_image`` turns the bytes of one file into (H, W, 3) float32 pixels in [0, 1], or says why it
cannot. Converted (the pixels are kept): CMYK (PIL's conversion), 16-bit (scaled by 1/65535, not
clipped at 255 as ``convert("RGB")`` would), grey and bilevel (repeated), palette and RGBA / grey+alpha
(composited on white, as ``datencoder_core.images.to_rgb`` does for the nodes). Skipped: files PIL does
not recognise (``not_an_image``), files that fail to decode, truncated ones included (``corrupt``),
images whose short side is below the minimum (``too_small``) and modes without a sensible RGB form
(``unsupported_mode``, e.g. 32-bit float). Every event is named ``converted_<kind>`` or
``skipped_<reason>`` and counted by the loaders; training logs the counts (``data/...``).

A file that could not be read at all (an ``OSError``: a dropped network mount, a disk error, a
permission) is not a bad image: its source hands over ``Unreadable`` instead of bytes, it is counted as
``skipped_unreadable`` and ``describe`` reports it apart, first. Whether the run goes on is the source's
decision (``training.data.sources.ImageFolder``: skip one, stop when its folder is gone).
"""

from __future__ import annotations

import io
import warnings
from collections import Counter
from typing import NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from training.data.shards import Cached

EVENTS = ("converted_cmyk", "converted_16bit", "converted_grey", "converted_palette", "converted_rgba",
          "skipped_not_an_image", "skipped_corrupt", "skipped_too_small", "skipped_unsupported_mode",
          "skipped_no_latent",  # training on a latent cache, an image the cache has no latent for
          "skipped_unreadable")  # the file could not be read (OSError): not a bad image, reported apart
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I")
WITH_ALPHA = ("RGBA", "LA", "PA")


class Unreadable(NamedTuple):
    """What a source yields instead of a file's bytes when reading the file raised ``OSError``."""

    path: str
    error: str  # the OSError, as str() gives it: "[Errno 5] Input/output error: '...'"


class Decoded(NamedTuple):
    pixels: np.ndarray | None  # (H, W, 3) float32 in [0, 1]; None: skipped
    event: str | None  # "converted_<kind>", "skipped_<reason>", or None for a plain RGB image


def decode_image(payload: bytes | np.ndarray | Cached | Unreadable, min_side: int) -> Decoded:
    """The pixels of one image file's bytes (or of an already decoded (H, W, C) uint8 array, or of a
    cached shard sample's image), or the reason it is skipped. Never raises for bad data."""
    if isinstance(payload, Unreadable):
        return Decoded(None, "skipped_unreadable")
    if isinstance(payload, Cached):
        payload = payload.image
    if isinstance(payload, np.ndarray):
        return _to_rgb(Image.fromarray(payload), min_side)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's DecompressionBombWarning, EXIF warnings: not our business
            with Image.open(io.BytesIO(payload)) as image:
                image.load()  # truncated files raise here
                return _to_rgb(image, min_side)
    except UnidentifiedImageError:
        return Decoded(None, "skipped_not_an_image")
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError):
        return Decoded(None, "skipped_corrupt")


def _to_rgb(image: Image.Image, min_side: int) -> Decoded:
    mode = image.mode
    if mode == "RGB":
        return _sized(np.asarray(image), None, min_side)
    if mode == "CMYK" or mode == "YCbCr":
        return _sized(np.asarray(image.convert("RGB")), "converted_cmyk" if mode == "CMYK" else None, min_side)
    if mode in SIXTEEN_BIT:
        grey = np.clip(np.asarray(image, dtype=np.float32) / 65535.0, 0.0, 1.0)
        return _sized(np.repeat(grey[..., None], 3, axis=-1), "converted_16bit", min_side, scaled=True)
    if mode in ("L", "1"):
        return _sized(np.asarray(image.convert("RGB")), "converted_grey", min_side)
    if mode == "P":
        with_alpha = "transparency" in image.info
        rgb = _on_white(image.convert("RGBA")) if with_alpha else np.asarray(image.convert("RGB"))
        return _sized(rgb, "converted_palette", min_side, scaled=with_alpha)
    if mode in WITH_ALPHA:
        return _sized(_on_white(image.convert("RGBA")), "converted_rgba", min_side, scaled=True)
    return Decoded(None, "skipped_unsupported_mode")


def _on_white(rgba: Image.Image) -> np.ndarray:
    pixels = np.asarray(rgba, dtype=np.float32) / 255.0
    return pixels[..., :3] * pixels[..., 3:] + (1.0 - pixels[..., 3:])


def _sized(pixels: np.ndarray, event: str | None, min_side: int, scaled: bool = False) -> Decoded:
    if min(pixels.shape[:2]) < min_side:
        return Decoded(None, "skipped_too_small")
    pixels = pixels.astype(np.float32) if scaled else pixels.astype(np.float32) / 255.0
    return Decoded(np.ascontiguousarray(pixels), event)


def describe(counts: Counter) -> str:
    """'unreadable 1 (I/O errors, ...); skipped 3 (corrupt 2, too_small 1); converted 1 (cmyk 1)' for the
    console: files that could not be read come first and apart from the bad images."""
    parts = []
    if counts.get("skipped_unreadable"):
        parts.append(f"unreadable {counts['skipped_unreadable']} (files that could not be read: I/O errors, "
                     f"the warnings name them)")
    for kind in ("skipped", "converted"):
        mine = {k.split("_", 1)[1]: v for k, v in sorted(counts.items())
                if k.startswith(kind + "_") and k != "skipped_unreadable" and v}
        if mine:
            parts.append(f"{kind} {sum(mine.values())} ({', '.join(f'{k} {v}' for k, v in mine.items())})")
    return "; ".join(parts) or "no bad images"
