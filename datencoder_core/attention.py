"""The dual-path attention of Eq. 5 and its diffusers host adapter (the reference backend).

Eq. 5, at the granularity of each attention module:

    out = a * Attn(f, C, W + dW) + (1 - a) * Attn(f, C_h, W)

The soft path uses the LoRA-offset projections and the context C whose concept token is v*; the hard
path uses the base projections and the context C_h where v* is replaced by its nearest real token.
Self-attention has no text, so there only the weights differ. Base projections are shared between the
paths (soft = base + LoRA delta), both attentions run as one batched SDPA call, and since ``to_out``
carries no offset, the blend happens before it (exact, by linearity).

Several concepts in one prompt (C has every placeholder as its concept's v*, C_h every placeholder as
its concept's nearest word):

    out = a * Attn(f, C, W + sum_i s_i dW_i) + (1 - a) * Attn(f, C_h, W)

where concept i's offsets ``s_i dW_i`` (its strength in the factors' scale) act on every query, or with
a mask m_i only on the attention queries inside it: the soft path of query p is

    sum_S w_S(p) * Attn(f_p, C, W + sum_{unmasked i} s_i dW_i + sum_{i in S} s_i dW_i),
    w_S(p) = prod_{i in S} m_i(p) * prod_{masked i not in S} (1 - m_i(p)),

over the subsets S of the masked concepts: for binary masks, exactly the offsets of the concepts whose
mask holds p (on q, and on k and v as this query sees them); a soft mask interpolates. Subsets with
zero weight at every query are not computed (two complementary sharp masks: one attention each).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import DATEncoderError
from .lora import LoRAFactors, LoRASum
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


def regional_dual_path_attention(variants: list[tuple[Tensor, tuple[Tensor, Tensor, Tensor]]],
                                  hard: tuple[Tensor, Tensor, Tensor], heads: int, alpha: float) -> Tensor:
    """Eq. 5 with a soft path made of weighted variants: ``alpha * sum_S w_S * Attn(*soft_S) + (1 - alpha) *
    Attn(*hard)``. ``variants`` holds (w_S (N, T, 1), (q, k, v)); all attentions run in one SDPA call
    (alpha = 0 runs only the hard path, alpha = 1 only the soft ones). Returns (N, T, C)."""
    paths = [qkv for _, qkv in variants] if alpha != 0.0 else []
    if alpha != 1.0:
        paths.append(hard)
    outs = _attention(*(torch.cat(group) for group in zip(*paths, strict=True)), heads).chunk(len(paths))
    if alpha == 0.0:
        return outs[0]
    out_soft = sum(weight * out for (weight, _), out in zip(variants, outs))
    return out_soft if alpha == 1.0 else torch.lerp(outs[-1], out_soft, alpha)


def mask_at(mask: Tensor, tokens: int) -> Tensor:
    """A latent mask (N, 1, H, W) at the attention resolution of ``tokens`` = h * w, flattened (N, T, 1).
    The UNet halves each side (rounding up) per level, so h = ceil(H / 2^k); area interpolation averages
    the latent pixels each token covers."""
    height, width = mask.shape[-2:]
    factor = 1
    while math.ceil(height / factor) * math.ceil(width / factor) > tokens:
        factor *= 2
    size = (math.ceil(height / factor), math.ceil(width / factor))
    if size[0] * size[1] != tokens:
        raise DATEncoderError(f"a concept mask of latent size {height}x{width} matches no attention resolution of "
                              f"{tokens} tokens: the mask must cover the whole latent image")
    resized = mask if size == (height, width) else F.interpolate(mask, size=size, mode="area")
    return resized.flatten(1).unsqueeze(-1)


@dataclass
class Region:
    """A concept whose LoRA acts only on the attention queries inside ``mask``, (N, 1, H, W) in [0, 1] at
    the latent resolution, one row per row of the model call's batch."""

    lora: LoRAFactors
    mask: Tensor
    _at: dict = field(default_factory=dict, repr=False, compare=False)  # tokens -> mask_at(mask, tokens)

    def at(self, tokens: int) -> Tensor:
        if tokens not in self._at:
            self._at[tokens] = mask_at(self.mask, tokens)
        return self._at[tokens]


@dataclass
class DualPathState:
    """What one UNet call needs to run Eq. 5: the offsets that act everywhere (one concept's factors, a
    ``LoRASum`` of several, or None), the blend, the hard context (N, S, D), and the masked concepts."""

    lora: LoRAFactors | LoRASum | None
    alpha: float
    hard_context: Tensor
    regions: tuple[Region, ...] = ()


def dual_path_forward(attn, x: Tensor, context: Tensor | None, state: DualPathState | None,
                      sites: dict[str, str], is_cross: bool) -> Tensor:
    """One attention module's forward with Eq. 5, for any host module with ``to_q``, ``to_k``, ``to_v``,
    ``to_out`` (linear + dropout) and ``heads``: diffusers' ``Attention`` and ComfyUI's ``CrossAttention``.

    ``x`` is (N, T, C). ``context`` (N, S, D) is the text for cross-attention (``is_cross``), whose hard
    path uses ``state.hard_context`` instead; for self-attention it is None (keys from ``x``) or what a
    host patch passes in its place, used by both paths. ``sites`` maps a projection ("to_q", "to_k",
    "to_v") to its canonical site name in ``state.lora`` and the regions' factors. Without a ``state`` it
    is plain attention; without regions, exactly the one-concept Eq. 5 (the module docstring has both).
    """
    context = x if context is None else context
    if state is None:
        out = _attention(attn.to_q(x), attn.to_k(context), attn.to_v(context), attn.heads)
        return attn.to_out[1](attn.to_out[0](out))

    def soft(projection: str, inputs: Tensor, base: Tensor, lora=state.lora) -> Tensor:
        site = sites.get(projection)
        return base if site is None or lora is None else base + lora.delta(site, inputs)

    q_base = attn.to_q(x)
    if is_cross:
        both = torch.cat([context, state.hard_context.to(context)])
        k_soft, k_hard = attn.to_k(both).chunk(2)
        v_soft, v_hard = attn.to_v(both).chunk(2)
        k_soft, v_soft = soft("to_k", context, k_soft), soft("to_v", context, v_soft)
    else:
        k_hard, v_hard = attn.to_k(context), attn.to_v(context)
        k_soft, v_soft = soft("to_k", context, k_hard), soft("to_v", context, v_hard)
    soft_qkv, hard_qkv = (soft("to_q", x, q_base), k_soft, v_soft), (q_base, k_hard, v_hard)
    if not state.regions:
        out = dual_path_attention(soft_qkv, hard_qkv, attn.heads, state.alpha)
    else:
        projections = (("to_q", x), ("to_k", context), ("to_v", context))
        offsets = [[soft(name, inputs, 0.0, region.lora) for name, inputs in projections] for region in state.regions]
        masks = [region.at(x.shape[1]).to(x) for region in state.regions]  # (N, T, 1) each
        variants = []
        for chosen in itertools.product((False, True), repeat=len(masks)):  # the subsets S of masked concepts
            weight = math.prod(m if on else 1.0 - m for on, m in zip(chosen, masks))
            if weight.any():
                qkv = [sum((o[j] for on, o in zip(chosen, offsets) if on), base) for j, base in enumerate(soft_qkv)]
                variants.append((weight, qkv))
        out = regional_dual_path_attention(variants, hard_qkv, attn.heads, state.alpha)
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
