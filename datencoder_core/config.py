"""Configuration dataclasses, one per component. Defaults are the paper's where it gives one.

Each config is frozen, validates itself in ``__post_init__`` and round-trips through ``to_dict`` /
``from_dict`` so it can be stored in a safetensors header (see ``checkpoint.py``). ``from_dict`` checks
each value against its field's declared type, so a JSON, TOML or YAML file cannot pass a string where a
bool belongs.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .errors import DATEncoderError

# The paper's 96 attention matrices (Sec. 4.1): to_q, to_k, to_v of self- and cross-attention
# in every one of SD1.5's 16 transformer blocks.
SD15_LORA_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_q", "attn2.to_k", "attn2.to_v")

_C = TypeVar("_C")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise DATEncoderError(message)


def _typed(where: str, hint: Any, value: Any) -> Any:
    """``value`` as the field ``where`` declared ``hint`` (a resolved annotation) holds it, or a
    ``DATEncoderError`` naming the field, the value and the type. Only lossless widenings are made: an int
    to a float, a list to a tuple (JSON, TOML and YAML have no tuples). An int field refuses every float,
    integral ones too (TOML reads ``1e3`` as a float): write ``1000`` or ``1_000``."""
    if typing.get_origin(hint) is tuple:  # tuple[X, ...], the only generic the configs declare
        if isinstance(value, (list, tuple)):
            return tuple(_typed(where, typing.get_args(hint)[0], item) for item in value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint in (bool, int, str):
        if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
            return value
    else:
        raise TypeError(f"{where}: fields annotated {hint} are not supported by config.from_dict")
    expected = hint.__name__ if isinstance(hint, type) else str(hint)
    raise DATEncoderError(f"{where}: expected {expected}, got {value!r} ({type(value).__name__})")


class _Serializable:
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[_C], data: dict[str, Any]) -> _C:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        _require(not unknown, f"{cls.__name__}: unknown fields {unknown}; expected a subset of {sorted(known)}")
        hints = typing.get_type_hints(cls)
        return cls(**{k: _typed(f"{cls.__name__}.{k}", hints[k], v) for k, v in data.items()})


@dataclass(frozen=True)
class LoRAConfig(_Serializable):
    """Which UNet projections get a predicted low-rank offset dW = scale * B @ A (Eq. 2)."""

    rank: int = field(default=4, metadata={"help": "r of A (r x D_in) and B (D_out x r)."})
    alpha: float = field(default=4.0, metadata={"help": "LoRA alpha; scale = alpha / rank (Hu et al.)."})
    targets: tuple[str, ...] = field(
        default=SD15_LORA_TARGETS,
        metadata={"help": "Suffixes '<attn1|attn2>.<to_q|to_k|to_v>' inside transformer blocks."},
    )

    def __post_init__(self):
        _require(self.rank >= 1, f"LoRAConfig.rank must be >= 1, got {self.rank}")
        _require(self.alpha > 0, f"LoRAConfig.alpha must be > 0, got {self.alpha}")
        allowed = {f"{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v")}
        bad = sorted(set(self.targets) - allowed)
        _require(self.targets and not bad, f"LoRAConfig.targets: unknown {bad}; allowed: {sorted(allowed)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class EncoderConfig(_Serializable):
    """Shapes of the encoder (Sec. 4.1). Defaults are SD1.5 + CLIP ViT-H-14."""

    clip_dim: int = 1280  # ViT-H-14 width; its last-layer tokens are 16x16 patches at 224 px
    unet_dim: int = 1280  # SD1.5 mid-block channels; 8x8 at 512 px
    token_dim: int = 768  # CLIP ViT-L/14 text embedding width of SD1.x
    trunk_channels: int = 512
    trunk_blocks: int = 2  # residual 3x3 conv blocks after fusing the two maps
    feature_dim: int = 1024  # pooled trunk feature shared by both heads
    hyper_bottleneck: int = 256  # shared bottleneck of the hypernetwork, per target layer

    def __post_init__(self):
        for name in ("clip_dim", "unet_dim", "token_dim", "trunk_channels", "feature_dim", "hyper_bottleneck"):
            _require(getattr(self, name) >= 1, f"EncoderConfig.{name} must be >= 1, got {getattr(self, name)}")
        _require(self.trunk_blocks >= 0, f"EncoderConfig.trunk_blocks must be >= 0, got {self.trunk_blocks}")
        # The trunk's GroupNorms have 32 groups (encoder.py). With fewer than 4 channels per group the norm is
        # nearly per channel, and the global mean after the trunk cancels each channel's level over the image,
        # which is what a colour is: in the toy world a linear probe on a random encoder's pooled feature read a
        # scene's colour near chance (0.22) with 1 channel per group, and at 0.85 with 4 (tests/test_toyworld.py).
        _require(self.trunk_channels % 32 == 0 and self.trunk_channels >= 4 * 32,
                 f"EncoderConfig.trunk_channels must be a multiple of 32 and >= 128 (32 GroupNorm groups of at "
                 f"least 4 channels; with fewer each group normalizes away its channels' mean, e.g. an image's "
                 f"colour), got {self.trunk_channels}")


SIMILARITIES = ("cosine", "dot")  # s of Eq. 3 (losses.nearest_neighbor_contrastive_loss)


@dataclass(frozen=True)
class LossConfig(_Serializable):
    """Pretraining objective: diffusion + contrastive (Eq. 3) + L2 on v* (Eq. 4) + L2 on dW (Sec. 4.1)."""

    contrastive_k: int = 5  # |N(v*)|: nearest vocabulary tokens used as positives; the paper gives no value
    temperature: float = 0.07  # tau of Eq. 3 (CLIP's initial temperature); the paper gives no value
    contrastive_similarity: str = "cosine"  # s of Eq. 3: "cosine", or "dot" as the paper writes it
    contrastive_weight: float = 1e-2
    embedding_l2_weight: float = 1e-4
    lora_l2_weight: float = 1e-4

    def __post_init__(self):
        _require(self.contrastive_k >= 1, f"LossConfig.contrastive_k must be >= 1, got {self.contrastive_k}")
        _require(self.temperature > 0, f"LossConfig.temperature must be > 0, got {self.temperature}")
        _require(self.contrastive_similarity in SIMILARITIES,
                 f"LossConfig.contrastive_similarity must be one of {SIMILARITIES}, got {self.contrastive_similarity!r}")


@dataclass(frozen=True)
class TuningConfig(_Serializable):
    """Inference-time tuning (Sec. 4.4 and 5.1)."""

    steps: int = field(default=12, metadata={"help": "AdamW steps after the start (the encoder's prediction, or a "
                                                     "word's embedding); 0 = the start only."})
    lr: float = 2e-3
    alpha_blend: float = 0.25  # a of Eq. 5
    timesteps_per_step: int = 4  # mini-batch of timesteps of the one concept image
    encoder_timestep: int = 500  # the fixed mid timestep the concept latent is noised at for the encoder forward
    embedding_anchor_weight: float = 1e-2  # L2 pulling v* toward the encoder's prediction; paper gives no value
    lora_anchor_weight: float = 1e-2  # L2 pulling dW toward the encoder's prediction; paper gives no value
    prompt: str = "a photo of {}"  # the tuning prompt; {} is the concept token
    seed: int = 0

    def __post_init__(self):
        _require(0 <= self.steps <= 2000, f"TuningConfig.steps must be in [0, 2000], got {self.steps}")
        _require(self.lr > 0, f"TuningConfig.lr must be > 0, got {self.lr}")
        _require(0.0 <= self.alpha_blend <= 1.0, f"TuningConfig.alpha_blend must be in [0, 1], got {self.alpha_blend}")
        _require(self.timesteps_per_step >= 1, "TuningConfig.timesteps_per_step must be >= 1")
        _require(0 <= self.encoder_timestep < 1000, "TuningConfig.encoder_timestep must be in [0, 1000)")
        _require(self.prompt.count("{}") == 1, f"TuningConfig.prompt must contain '{{}}' once, got {self.prompt!r}")


# The encoder-free path (``tuning.personalize_from_word``): v* from a class word, LoRA from dW = 0, so many more
# steps than the encoder's 12, at a lower lr than the paper's 2e-3 (meant for <= 12 steps from a good start).
# Practice on few images, in our steps of 4 (image, timestep) samples: diffusers' DreamBooth-LoRA README runs 500
# steps at lr 1e-4, batch 1 (about 125 of ours), Custom Diffusion 250 at batch 2 (about 125), textual inversion
# (diffusers' README) 3000 at batch 1 x 4 accumulated, effective lr 2e-3; one image needs the low end, and 200
# leaves headroom for a class-word start. diffusers' LoRA A ~ N(0, 1/r) has about 10x the rms of our peft-style
# A ~ U(+-1/sqrt(D_in)), and under Adam dW grows with lr * rms(A), so 1e-3 restores its rate; for v*, 1e-3 is
# half of textual inversion's effective 2e-3 (docs/design.md, "The encoder-free path").
WORD_START_TUNING = TuningConfig(steps=200, lr=1e-3)
