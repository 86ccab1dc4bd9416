"""The dual-path attention of Eq. 5 and its diffusers host adapter (the reference backend).

Eq. 5, at the granularity of each attention module:

    out = a * Attn(f, C, W + dW) + (1 - a) * Attn(f, C_h, W)

The soft path uses the LoRA-offset projections and the context C whose concept token is v*; the hard
path uses the base projections and the context C_h where v* is replaced by its nearest real token.
Self-attention has no text, so there only the weights differ. Base projections are shared between the
paths (soft = base + LoRA delta), both attentions run as one batched SDPA call, and since ``to_out``
carries no offset, the blend happens before it (exact, by linearity).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import DATEncoderError
from .lora import LoRAFactors
from .sites import LoRASite


def _attention(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    """Multi-head SDPA on (N, T, C) tensors; returns (N, T, C)."""
    n, t, c = q.shape
    q, k, v = (x.unflatten(-1, (heads, c // heads)).transpose(1, 2) for x in (q, k, v))  # (N, heads, T, d)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, c)


def dual_path_attention(
    soft: tuple[Tensor, Tensor, Tensor], hard: tuple[Tensor, Tensor, Tensor], heads: int, alpha: float
) -> Tensor:
    """Eq. 5 on projected tensors: ``alpha * Attn(*soft) + (1 - alpha) * Attn(*hard)``.

    ``soft`` and ``hard`` are (q, k, v), q (N, T, C) and k, v (N, S, C). Both attentions run in one
    SDPA call over a 2N batch. alpha = 1 (0) runs only the soft (hard) path. Returns (N, T, C),
    before the output projection.
    """
    if alpha == 1.0:
        return _attention(*soft, heads)
    if alpha == 0.0:
        return _attention(*hard, heads)
    both = _attention(*(torch.cat(pair) for pair in zip(soft, hard)), heads)
    out_soft, out_hard = both.chunk(2)
    return torch.lerp(out_hard, out_soft, alpha)


@dataclass
class DualPathState:
    """What one UNet call needs to run Eq. 5: the LoRA factors, the blend and the hard context (N, S, D)."""

    lora: LoRAFactors
    alpha: float
    hard_context: Tensor


class DualPathAttnProcessor:
    """diffusers attention processor for one SD1.x attention module (hook: ``Attention.processor``).

    Without a ``datencoder`` state in ``cross_attention_kwargs`` it is plain attention, so it can stay
    installed. With one, it runs Eq. 5 with the state's LoRA on the projections listed in ``sites``.
    """

    def __init__(self, sites: dict[str, str]):
        self.sites = sites  # projection ("to_q", "to_k" or "to_v") -> canonical site name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 datencoder: DualPathState | None = None):
        if attention_mask is not None or hidden_states.ndim != 3:
            raise DATEncoderError("DualPathAttnProcessor supports SD1.x attention only: 3-D input, no mask")
        x = hidden_states
        is_cross = encoder_hidden_states is not None
        context = encoder_hidden_states if is_cross else x
        if datencoder is None:
            out = _attention(attn.to_q(x), attn.to_k(context), attn.to_v(context), attn.heads)
            return attn.to_out[1](attn.to_out[0](out))

        lora, alpha = datencoder.lora, datencoder.alpha

        def soft(projection: str, inputs: Tensor, base: Tensor) -> Tensor:
            site = self.sites.get(projection)
            return base if site is None else base + lora.delta(site, inputs)

        q_base = attn.to_q(x)
        q = (soft("to_q", x, q_base), q_base)
        if is_cross:
            hard_context = datencoder.hard_context
            k_soft_base, k_hard = attn.to_k(torch.cat([context, hard_context])).chunk(2)
            v_soft_base, v_hard = attn.to_v(torch.cat([context, hard_context])).chunk(2)
            k = (soft("to_k", context, k_soft_base), k_hard)
            v = (soft("to_v", context, v_soft_base), v_hard)
        else:
            k_base, v_base = attn.to_k(x), attn.to_v(x)
            k = (soft("to_k", x, k_base), k_base)
            v = (soft("to_v", x, v_base), v_base)
        out = dual_path_attention((q[0], k[0], v[0]), (q[1], k[1], v[1]), attn.heads, alpha)
        return attn.to_out[1](attn.to_out[0](out))


def dual_path_processors(attn_processor_names: list[str], sites: tuple[LoRASite, ...]) -> dict[str, DualPathAttnProcessor]:
    """One ``DualPathAttnProcessor`` per attention module, keyed as ``unet.attn_processors`` is
    (``<module path>.processor``), ready for ``unet.set_attn_processor``."""
    by_attention: dict[str, dict[str, str]] = {}
    for site in sites:
        by_attention.setdefault(site.attention, {})[site.name[len(site.attention) + 1:]] = site.name
    return {key: DualPathAttnProcessor(by_attention.get(key.removesuffix(".processor"), {}))
            for key in attn_processor_names}
