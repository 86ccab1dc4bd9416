"""LoRA target sites: which projections of a UNet get a predicted offset.

Sites are named by their canonical diffusers module path
(``down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k``). They are discovered from a model's
modules, never typed in by hand, so any UNet with SD1.5's transformer blocks works, at any width.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Iterable

from torch import nn

from .errors import DATEncoderError

_SITE_PATTERN = re.compile(r"\.transformer_blocks\.\d+\.(attn[12]\.to_[qkv])$")


@dataclass(frozen=True)
class LoRASite:
    """One target projection: its canonical name and its ``nn.Linear`` shape (D_in -> D_out)."""

    name: str
    in_features: int
    out_features: int

    @property
    def attention(self) -> str:
        """Module path of the attention block the projection belongs to (``...attn2``)."""
        return self.name.rsplit(".", 1)[0]


def discover_sites(named_modules: Iterable[tuple[str, nn.Module]], targets: Iterable[str]) -> tuple[LoRASite, ...]:
    """Return the ``nn.Linear`` modules whose path ends in ``transformer_blocks.<i>.<target>``.

    ``named_modules`` is ``unet.named_modules()`` of a model with diffusers module names. Order follows
    the model (down, mid, up). Raises ``DATEncoderError`` if no module matches.
    """
    targets = set(targets)
    sites = []
    for name, module in named_modules:
        match = _SITE_PATTERN.search(name)
        if match and match.group(1) in targets and isinstance(module, nn.Linear):
            sites.append(LoRASite(name, module.in_features, module.out_features))
    if not sites:
        raise DATEncoderError(
            f"no LoRA target found: expected nn.Linear modules named '*.transformer_blocks.<i>.<target>' "
            f"for targets {sorted(targets)}; is this an SD1.x UNet with diffusers module names?"
        )
    return tuple(sites)


def site_target(name: str) -> str:
    """The LoRA target a site name ends in: ``...transformer_blocks.0.attn2.to_k`` -> ``attn2.to_k``."""
    match = _SITE_PATTERN.search(name)
    if match is None:
        raise DATEncoderError(f"LoRA site {name!r}: expected a name ending in "
                              f"'transformer_blocks.<i>.<attn1|attn2>.<to_q|to_k|to_v>'")
    return match.group(1)


def architecture_fingerprint(sites: Iterable[LoRASite], token_dim: int) -> str:
    """A short hash of the base model's architecture: every site's name and shape, and the token width.

    Concepts and encoders are tied to an architecture (SD1.x), not to one checkpoint, so a concept made
    on SD1.5 also loads on SD1.5 fine-tunes, as LoRA files do; one made for another architecture
    does not. The order of ``sites`` does not matter.
    """
    payload = json.dumps(sorted([s.name, s.in_features, s.out_features] for s in sites) + [token_dim])
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
