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
    both = _attention(*(torch.cat(pair) for pair in zip(soft, hard, strict=True)), heads)
    out_soft, out_hard = both.chunk(2)
    return torch.lerp(out_hard, out_soft, alpha)


@dataclass
class DualPathState:
    """What one UNet call needs to run Eq. 5: the LoRA factors, the blend and the hard context (N, S, D)."""

    lora: LoRAFactors
    alpha: float
    hard_context: Tensor


def dual_path_forward(attn, x: Tensor, context: Tensor | None, state: DualPathState | None,
                      sites: dict[str, str], is_cross: bool) -> Tensor:
    """One attention module's forward with Eq. 5, for any host module with ``to_q``, ``to_k``, ``to_v``,
    ``to_out`` (linear + dropout) and ``heads``: diffusers' ``Attention`` and ComfyUI's ``CrossAttention``.

    ``x`` is (N, T, C). ``context`` (N, S, D) is the text for cross-attention (``is_cross``), whose hard
    path uses ``state.hard_context`` instead; for self-attention it is None (keys from ``x``) or what a
    host patch passes in its place, used by both paths. ``sites`` maps a projection ("to_q", "to_k",
    "to_v") to its canonical site name in ``state.lora``. Without a ``state`` it is plain attention.
    """
    context = x if context is None else context
    if state is None:
        out = _attention(attn.to_q(x), attn.to_k(context), attn.to_v(context), attn.heads)
        return attn.to_out[1](attn.to_out[0](out))

    def soft(projection: str, inputs: Tensor, base: Tensor) -> Tensor:
        site = sites.get(projection)
        return base if site is None else base + state.lora.delta(site, inputs)

    q_base = attn.to_q(x)
    if is_cross:
        both = torch.cat([context, state.hard_context.to(context)])
        k_soft, k_hard = attn.to_k(both).chunk(2)
        v_soft, v_hard = attn.to_v(both).chunk(2)
        k_soft, v_soft = soft("to_k", context, k_soft), soft("to_v", context, v_soft)
    else:
        k_hard, v_hard = attn.to_k(context), attn.to_v(context)
        k_soft, v_soft = soft("to_k", context, k_hard), soft("to_v", context, v_hard)
    out = dual_path_attention((soft("to_q", x, q_base), k_soft, v_soft), (q_base, k_hard, v_hard), attn.heads,
                              state.alpha)
    return attn.to_out[1](attn.to_out[0](out))


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
        return dual_path_forward(attn, hidden_states, encoder_hidden_states, datencoder, self.sites,
                                 attn.is_cross_attention)


def sites_by_attention(sites: tuple[LoRASite, ...]) -> dict[str, dict[str, str]]:
    """Group sites by attention module path: {"...attn2": {"to_k": "...attn2.to_k", ...}}."""
    grouped: dict[str, dict[str, str]] = {}
    for site in sites:
        grouped.setdefault(site.attention, {})[site.name[len(site.attention) + 1:]] = site.name
    return grouped


def dual_path_processors(attn_processor_names: list[str], sites: tuple[LoRASite, ...]) -> dict[str, DualPathAttnProcessor]:
    """One ``DualPathAttnProcessor`` per attention module, keyed as ``unet.attn_processors`` is
    (``<module path>.processor``), ready for ``unet.set_attn_processor``."""
    by_attention = sites_by_attention(sites)
    return {key: DualPathAttnProcessor(by_attention.get(key.removesuffix(".processor"), {}))
            for key in attn_processor_names}
