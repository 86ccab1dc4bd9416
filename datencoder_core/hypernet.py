"""Hypernetwork head: predicts A and B for every LoRA site from one pooled image feature (Sec. 4.1).

For site l with a learned embedding e_l, a shared bottleneck gives z_l = MLP(h + e_l); then
A_l = head_A[D_in](z_l) (r x D_in) and B_l = head_B[D_out](z_l) (D_out x r), with one linear head per
distinct width, shared by every site of that width. The B heads start at zero, so a fresh encoder's
dW is exactly zero (Sec. 4.1: "we initialize the prediction layer of the matrix B to zero").

Parameters for SD1.5 (96 sites, widths 320/640/768/1280, r = 4) with the default ``EncoderConfig``
(feature 1024, bottleneck 256): 5,823,488 in this head, 23,665,920 in the whole encoder (trunk
16,005,632, token head 1,836,800). ``tests/test_encoder.py`` checks both numbers.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor, nn

from .sites import LoRASite


class HyperLoRAHead(nn.Module):
    def __init__(self, feature_dim: int, sites: tuple[LoRASite, ...], rank: int, bottleneck: int):
        super().__init__()
        self.sites, self.rank = sites, rank
        self.site_embedding = nn.Parameter(torch.randn(len(sites), feature_dim) * 0.02)
        self.bottleneck = nn.Sequential(nn.LayerNorm(feature_dim), nn.Linear(feature_dim, bottleneck), nn.SiLU(),
                                        nn.Linear(bottleneck, bottleneck))
        self._by_in, self._by_out = defaultdict(list), defaultdict(list)  # width -> site indices
        for i, site in enumerate(sites):
            self._by_in[site.in_features].append(i)
            self._by_out[site.out_features].append(i)
        self.down_heads = nn.ModuleDict({str(d): nn.Linear(bottleneck, rank * d) for d in sorted(self._by_in)})
        self.up_heads = nn.ModuleDict({str(d): nn.Linear(bottleneck, d * rank) for d in sorted(self._by_out)})
        for head in self.up_heads.values():
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def forward(self, features: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(B, feature_dim) -> (down, up): A per site (B, r, D_in), B per site (B, D_out, r)."""
        z = self.bottleneck(features[:, None, :] + self.site_embedding)  # (B, sites, bottleneck)
        down, up = {}, {}
        for width, indices in self._by_in.items():
            a = self.down_heads[str(width)](z[:, indices]).unflatten(-1, (self.rank, width))  # (B, n, r, D_in)
            down.update({self.sites[i].name: a[:, j] for j, i in enumerate(indices)})
        for width, indices in self._by_out.items():
            b = self.up_heads[str(width)](z[:, indices]).unflatten(-1, (width, self.rank))  # (B, n, D_out, r)
            up.update({self.sites[i].name: b[:, j] for j, i in enumerate(indices)})
        return down, up
