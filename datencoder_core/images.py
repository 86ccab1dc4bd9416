"""Image preprocessing shared by every backend, so the encoder sees the same pixels everywhere.

Images are ComfyUI ``IMAGE`` tensors: (B, H, W, C) float in [0, 1], C in {1, 3, 4}.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import DATEncoderError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_rgb(images: Tensor) -> Tensor:
    """(B, H, W, C) -> (B, H, W, 3): grey is repeated, an alpha channel is composited on white."""
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise DATEncoderError(f"expected an IMAGE tensor (B, H, W, C) with C in 1, 3 or 4, got {tuple(images.shape)}")
    if min(images.shape[1:3]) < 8:
        raise DATEncoderError(f"image is too small: {images.shape[2]}x{images.shape[1]} px")
    if images.shape[-1] == 1:
        return images.expand(-1, -1, -1, 3)
    if images.shape[-1] == 4:
        rgb, alpha = images[..., :3], images[..., 3:]
        return rgb * alpha + (1.0 - alpha)
    return images


def _center_square(images: Tensor, size: int) -> Tensor:
    """(B, 3, H, W) -> (B, 3, size, size): resize the short side to ``size`` (bicubic, antialiased), crop the centre."""
    h, w = images.shape[-2:]
    if (h, w) != (size, size):
        scale = size / min(h, w)
        images = F.interpolate(images, size=(round(scale * h), round(scale * w)), mode="bicubic", antialias=True)
        top, left = (images.shape[-2] - size) // 2, (images.shape[-1] - size) // 2
        images = images[..., top:top + size, left:left + size]
    return images


def clip_preprocess(images: Tensor, size: int = 224) -> Tensor:
    """IMAGE -> normalised CLIP pixels (B, 3, size, size), identical to ComfyUI's ``clip_preprocess``
    (short side to ``size``, centre crop, 8-bit quantisation, CLIP mean/std)."""
    pixels = _center_square(to_rgb(images).movedim(-1, 1), size)
    pixels = torch.clip(255.0 * pixels, 0, 255).round() / 255.0
    mean = torch.tensor(CLIP_MEAN, device=pixels.device, dtype=pixels.dtype).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, device=pixels.device, dtype=pixels.dtype).view(3, 1, 1)
    return (pixels - mean) / std


def vae_preprocess(images: Tensor, size: int) -> Tensor:
    """IMAGE -> VAE pixels (B, 3, size, size) in [-1, 1], short side resized and centre-cropped."""
    return _center_square(to_rgb(images).movedim(-1, 1), size).clamp(0, 1) * 2.0 - 1.0
