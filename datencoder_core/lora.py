"""Low-rank weight offsets per site: dW = scale * B @ A (Eq. 2, LoRA convention)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class LoRAFactors:
    """A and B for every site, keyed by canonical site name.

    ``down[name]`` is A, shaped (r, D_in), or (N, r, D_in) with one factor per batch row (pretraining,
    where every image in the batch is its own concept). ``up[name]`` is B, (D_out, r) or (N, D_out, r).
    """

    down: dict[str, Tensor]
    up: dict[str, Tensor]
    scale: float

    def delta(self, site: str, x: Tensor) -> Tensor:
        """Return x @ dW^T for ``x`` of shape (N, T, D_in), without forming dW: (N, T, D_out), in x's dtype
        (the factors stay in their own, usually float32, dtype for the optimiser)."""
        a, b = self.down[site].to(x.dtype), self.up[site].to(x.dtype)
        return self.scale * ((x @ a.transpose(-1, -2)) @ b.transpose(-1, -2))

    def squared_norms(self, reference: LoRAFactors | None = None) -> Tensor:
        """Sum over sites of ||dW - dW_ref||_F^2, per batch row if the factors are batched.

        Uses ||B A||_F^2 = sum((B^T B) * (A A^T)), so no D_out x D_in matrix is formed. With a
        ``reference``, dW - dW_ref = [B, -B_ref] @ [A; A_ref] is a rank-2r product.
        """
        total = 0.0
        for site, a in self.down.items():
            b = self.up[site]
            if reference is not None:
                a = torch.cat([a, reference.down[site].expand_as(a)], dim=-2)
                b = torch.cat([b, -reference.up[site].expand_as(b)], dim=-1)
            gram_b = b.transpose(-1, -2) @ b  # (..., 2r, 2r)
            gram_a = a @ a.transpose(-1, -2)
            total = total + (gram_b * gram_a).sum(dim=(-1, -2))
        return total * self.scale**2

    def row(self, index: int) -> LoRAFactors:
        """The unbatched factors of one batch row of batched factors."""
        return LoRAFactors({k: v[index] for k, v in self.down.items()},
                           {k: v[index] for k, v in self.up.items()}, self.scale)

    def detached_clone(self) -> LoRAFactors:
        return LoRAFactors(
            {k: v.detach().clone() for k, v in self.down.items()},
            {k: v.detach().clone() for k, v in self.up.items()},
            self.scale,
        )

    def parameters(self) -> list[Tensor]:
        return [*self.down.values(), *self.up.values()]


@dataclass
class LoRASum:
    """Several concepts' offsets at once, as stacked LoRAs add: x @ (sum_i dW_i)^T, each part with its own
    scale (a concept's strength times alpha / r)."""

    parts: tuple[LoRAFactors, ...]

    def delta(self, site: str, x: Tensor) -> Tensor:
        """sum_i x @ dW_i^T, (N, T, D_out) in x's dtype; every part must have ``site``."""
        first, *rest = (part.delta(site, x) for part in self.parts)
        return sum(rest, first)
