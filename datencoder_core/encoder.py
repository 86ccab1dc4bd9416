"""The DATEncoder (Sec. 4.1): image features -> soft token v* and LoRA factors for the UNet.

Feature contract (DESIGN.md), both maps kept spatial:
* ``clip_tokens``: CLIP ViT-H-14 last-layer tokens BEFORE the final LayerNorm, (B, 1 + g*g, clip_dim)
  with the class token first (ComfyUI's ``encode_image(...)["last_hidden_state"]``; g = 16 at 224 px);
* ``unet_features``: SD UNet mid-block output on the noised concept latent with an empty prompt,
  (B, unet_dim, h, w) (8x8 at 512 px).

The CLIP grid is pooled to the UNet grid, both are projected and concatenated, a convolutional trunk
fuses them, and a global average gives one feature h per image, shared by the token head (v*) and
the hypernetwork head (A, B per site).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import EncoderConfig, LoRAConfig
from .errors import DATEncoderError
from .hypernet import HyperLoRAHead
from .lora import LoRAFactors
from .sites import LoRASite


@dataclass
class EncoderOutput:
    v_star: Tensor  # (B, token_dim)
    lora: LoRAFactors  # batched factors, one concept per row


class _ResidualConvBlock(nn.Sequential):
    def __init__(self, channels: int):
        super().__init__(nn.GroupNorm(32, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
                         nn.GroupNorm(32, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return x + super().forward(x)


class DATEncoder(nn.Module):
    def __init__(self, config: EncoderConfig, lora_config: LoRAConfig, sites: tuple[LoRASite, ...]):
        super().__init__()
        self.config, self.lora_config, self.sites = config, lora_config, sites
        c = config.trunk_channels
        self.clip_norm = nn.LayerNorm(config.clip_dim)  # pre-LN tokens have large, uneven scales
        self.clip_proj = nn.Conv2d(config.clip_dim, c, 1)
        self.unet_proj = nn.Sequential(nn.GroupNorm(32, config.unet_dim), nn.Conv2d(config.unet_dim, c, 1))
        self.trunk = nn.Sequential(nn.Conv2d(2 * c, c, 3, padding=1),
                                   *(_ResidualConvBlock(c) for _ in range(config.trunk_blocks)),
                                   nn.GroupNorm(32, c), nn.SiLU())
        self.pool_proj = nn.Linear(c, config.feature_dim)
        self.token_head = nn.Sequential(nn.SiLU(), nn.Linear(config.feature_dim, config.feature_dim), nn.SiLU(),
                                        nn.Linear(config.feature_dim, config.token_dim))
        self.hyper_head = HyperLoRAHead(config.feature_dim, sites, lora_config.rank, config.hyper_bottleneck)

    def features(self, clip_tokens: Tensor, unet_features: Tensor) -> Tensor:
        """Fuse both backbones' maps into one feature per image: (B, feature_dim)."""
        self._check_inputs(clip_tokens, unet_features)
        grid = math.isqrt(clip_tokens.shape[1] - 1)
        tokens = self.clip_norm(clip_tokens[:, 1:])  # drop the class token: (B, g*g, clip_dim)
        clip_map = tokens.transpose(1, 2).unflatten(-1, (grid, grid))  # (B, clip_dim, g, g)
        clip_map = F.adaptive_avg_pool2d(clip_map, unet_features.shape[-2:])
        fused = self.trunk(torch.cat([self.clip_proj(clip_map), self.unet_proj(unet_features)], dim=1))
        return self.pool_proj(fused.mean(dim=(-2, -1)))

    def heads(self, features: Tensor) -> EncoderOutput:
        """(B, feature_dim) -> v* (B, token_dim) and LoRA factors (B, ...) per site."""
        down, up = self.hyper_head(features)
        return EncoderOutput(self.token_head(features), LoRAFactors(down, up, self.lora_config.scale))

    def forward(self, clip_tokens: Tensor, unet_features: Tensor) -> EncoderOutput:
        return self.heads(self.features(clip_tokens, unet_features))

    def _check_inputs(self, clip_tokens: Tensor, unet_features: Tensor) -> None:
        cfg = self.config
        if clip_tokens.ndim != 3 or clip_tokens.shape[-1] != cfg.clip_dim:
            raise DATEncoderError(f"clip_tokens: expected (B, 1 + g*g, {cfg.clip_dim}) CLIP last-layer tokens, "
                                  f"got {tuple(clip_tokens.shape)}; is the CLIP vision model ViT-H-14?")
        grid = math.isqrt(max(clip_tokens.shape[1] - 1, 0))
        if grid == 0 or grid * grid + 1 != clip_tokens.shape[1]:
            raise DATEncoderError(f"clip_tokens: expected 1 class token + a square grid of patch tokens, "
                                  f"got {clip_tokens.shape[1]} tokens")
        if unet_features.ndim != 4 or unet_features.shape[1] != cfg.unet_dim:
            raise DATEncoderError(f"unet_features: expected (B, {cfg.unet_dim}, h, w) UNet mid-block features, "
                                  f"got {tuple(unet_features.shape)}")
        if unet_features.shape[0] != clip_tokens.shape[0]:
            raise DATEncoderError(f"clip_tokens and unet_features disagree on batch size: "
                                  f"{clip_tokens.shape[0]} vs {unet_features.shape[0]}")

