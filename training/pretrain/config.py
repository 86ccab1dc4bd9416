"""The pretraining configuration: the core's dataclasses plus ``TrainingConfig``, presets, files and overrides.

A run is configured by a preset (``default``: the paper's final model, ``ablation``: its 50,000-step
ablations, ``tiny``: the CPU quick check), then ``--config FILE`` (TOML or YAML, one table per section:
``[training]``, ``[loss]``, ``[encoder]``, ``[lora]``), then each ``--set section.field=value`` (the value
is read for the field's declared type, see ``_parse_value``: ``--set training.lr=3e-4``, ``--set
training.dual_path=no``). Every value, from a file or ``--set``, must have its field's type: an int field
refuses ``1e3`` (a float), a bool field refuses the string ``"no"`` in a file. The resolved config is written
to the output folder and into the exported encoder file.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from datencoder_core.config import EncoderConfig, LoRAConfig, LossConfig, _require, _Serializable, _typed
from datencoder_core.errors import DATEncoderError
from training.data.sources import MIN_CROP
from training.models.reference import TINY_ENCODER

# "a photo of S*" and a small set of ImageNet-style templates (CLIP's ImageNet prompts, the object ones).
TEMPLATES = ("a photo of {}", "a photo of a {}", "a close-up photo of a {}", "a bright photo of a {}",
             "a cropped photo of a {}", "a good photo of a {}", "a photo of the small {}", "a rendition of a {}")
EMBEDDING_REGULARIZATIONS = ("none", "l2", "nearest", "contrastive")  # paper Fig. 4
MIXED_PRECISION = ("no", "bf16")


@dataclass(frozen=True)
class TrainingConfig(_Serializable):
    """The pretraining loop (Sec. 5: AdamW, lr 1e-4, linear warm-up then cosine decay, 150,000 steps)."""

    models: str = field(default="files", metadata={
        "help": "'files': --base and --clip-vision; 'tiny': random tiny backbones built in code (quick check)."})
    steps: int = 150_000  # the paper's final model; the ablation preset has 50,000
    batch_size: int = 32  # GLOBAL batch, over all processes; the paper gives none
    lr: float = 1e-4  # per global batch (the paper's)
    warmup_steps: int = 2_000  # the paper gives the schedule's shape, not its length
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    mixed_precision: str = "bf16"  # frozen models cast to bf16, encoder fp32 under autocast
    gradient_checkpointing: bool = False  # of the frozen UNet: less memory, ~30% slower
    allow_tf32: bool = True
    alpha_blend: float = 0.25  # a of Eq. 5 (the paper's inference value)
    dual_path: bool = field(default=True, metadata={"help": "Eq. 5 on; off = the soft path alone (a = 1)."})
    hypernetwork: bool = field(default=True, metadata={"help": "Off: the hypernetwork head stays at its "
                                                               "zero-B init, so dW = 0 (paper Sec. 5.4)."})
    embedding_regularization: str = field(default="contrastive", metadata={
        "help": "none | l2 (Eq. 4) | nearest (Eq. 4 + cosine to the nearest token) | contrastive (Eq. 4 + Eq. 3)."})
    templates: tuple[str, ...] = TEMPLATES
    heldout_images: int = 16  # images of the data set never trained on: the encoder gain is measured there
    heldout_timesteps: int = 4  # fixed (t, noise) draws per held-out image
    checkpoint_every: int = 5_000
    checkpoints_total_limit: int = 3
    log_every: int = 50
    validation_every: int = 2_500  # encoder gain
    sample_every: int = 10_000  # image grids
    sample_images: int = 2  # held-out concept photos per grid
    sample_steps: int = 25  # DDIM steps per generated image
    num_workers: int = 4  # data-loading workers per process
    min_image_side: int = 128  # smaller images are skipped (upscaled 4x to 512 px they are mostly blur)
    min_crop: float = field(default=MIN_CROP, metadata={
        "help": "random square crops of min_crop to all of an image's short side; 1 = the whole image (flips only)"})
    shuffle_buffer: int = 1_000  # shards and mixes: samples per shuffled block of each reader (training.data.streams)
    seed: int = 0

    def __post_init__(self):
        _require(self.models in ("files", "tiny"), f"training.models must be 'files' or 'tiny', got {self.models!r}")
        for name in ("steps", "batch_size", "checkpoint_every", "checkpoints_total_limit", "log_every",
                     "validation_every", "sample_every", "heldout_images", "heldout_timesteps", "sample_steps", "shuffle_buffer"):
            _require(getattr(self, name) >= 1, f"training.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "num_workers", "sample_images"):
            _require(getattr(self, name) >= 0, f"training.{name} must be >= 0, got {getattr(self, name)}")
        _require(self.min_image_side >= 8, f"training.min_image_side must be >= 8, got {self.min_image_side}")
        _require(0 < self.min_crop <= 1, f"training.min_crop must be in (0, 1], got {self.min_crop}")
        _require(self.lr > 0, f"training.lr must be > 0, got {self.lr}")
        _require(self.max_grad_norm > 0, f"training.max_grad_norm must be > 0, got {self.max_grad_norm}")
        _require(0.0 <= self.alpha_blend <= 1.0, f"training.alpha_blend must be in [0, 1], got {self.alpha_blend}")
        _require(self.mixed_precision in MIXED_PRECISION,
                 f"training.mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")
        _require(self.embedding_regularization in EMBEDDING_REGULARIZATIONS,
                 f"training.embedding_regularization must be one of {EMBEDDING_REGULARIZATIONS}, "
                 f"got {self.embedding_regularization!r}")
        bad = [t for t in self.templates if t.count("{}") != 1]
        _require(self.templates and not bad, f"training.templates must each contain '{{}}' once; bad: {bad}")


@dataclass(frozen=True)
class PretrainConfig:
    """Everything a pretraining run is: the encoder and LoRA shapes, the loss weights, the loop."""

    encoder: EncoderConfig = EncoderConfig()
    lora: LoRAConfig = LoRAConfig()
    loss: LossConfig = LossConfig()
    training: TrainingConfig = TrainingConfig()

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name).to_dict() for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PretrainConfig:
        unknown = sorted(set(data) - set(_SECTIONS))
        _require(not unknown, f"config: unknown sections {unknown}; expected {sorted(_SECTIONS)}")
        return cls(**{name: _SECTIONS[name].from_dict(values) for name, values in data.items()})


_SECTIONS = {"encoder": EncoderConfig, "lora": LoRAConfig, "loss": LossConfig, "training": TrainingConfig}

# The tiny preset: SD1.5's structure at small widths (training.models), on the photos scikit-image ships.
PRESETS = {
    "default": PretrainConfig(),
    "ablation": PretrainConfig(training=TrainingConfig(steps=50_000)),
    "tiny": PretrainConfig(
        encoder=TINY_ENCODER,
        loss=LossConfig(contrastive_weight=0.1),  # a visible share of a tiny run's loss
        training=TrainingConfig(models="tiny", steps=60, batch_size=4, lr=1e-3, warmup_steps=5,
                                mixed_precision="no", heldout_images=4, heldout_timesteps=4,
                                checkpoint_every=20, checkpoints_total_limit=2, log_every=5, validation_every=20,
                                sample_every=60, sample_images=1, sample_steps=4, num_workers=0)),
}


def resolve_config(preset: str, config_file: Path | None = None, overrides: tuple[str, ...] = ()) -> PretrainConfig:
    """``preset``, then the sections of ``config_file`` (.toml, .yaml or .yml), then ``section.field=value``
    overrides. Raises ``DATEncoderError`` naming the file or override that is wrong."""
    if preset not in PRESETS:
        raise DATEncoderError(f"--preset {preset!r}: unknown; choose one of {sorted(PRESETS)}")
    data = PRESETS[preset].to_dict()
    if config_file is not None:
        for section, values in _read_config_file(config_file).items():
            if section not in data or not isinstance(values, dict):
                raise DATEncoderError(f"{config_file}: unknown section {section!r}; expected tables "
                                      f"{sorted(data)} (e.g. [training] with steps = 1000)")
            hints = typing.get_type_hints(_SECTIONS[section])
            for name, value in values.items():
                if name in hints:  # an unknown name is left for from_dict to refuse
                    value = _typed(f"{config_file}: {section}.{name}", hints[name], value)
                data[section][name] = value
    for override in overrides:
        key, sep, text = override.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or section not in data or name not in data[section]:
            raise DATEncoderError(f"--set {override!r}: expected section.field=value with section in "
                                  f"{sorted(data)} and a field of it, e.g. --set training.lr=3e-4")
        hint = typing.get_type_hints(_SECTIONS[section])[name]
        data[section][name] = _typed(f"--set {section}.{name}", hint, _parse_value(text.strip(), hint))
    return PretrainConfig.from_dict(data)


def _read_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DATEncoderError(f"--config {path}: no such file")
    try:
        if path.suffix == ".toml":
            return tomllib.loads(path.read_text())
        if path.suffix in (".yaml", ".yml"):
            return yaml.safe_load(path.read_text()) or {}
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as error:
        raise DATEncoderError(f"--config {path}: not valid {path.suffix[1:].upper()}: {error}") from None
    raise DATEncoderError(f"--config {path}: expected a .toml, .yaml or .yml file")


_BOOLS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def _parse_value(text: str, hint: Any) -> Any:
    """The ``--set`` text for a field declared ``hint``: for a bool, true/false/yes/no/1/0 in any case; for a
    str, the text itself (or a quoted TOML string); else a TOML value (numbers, ["lists"]). Text that is none of
    these is returned as is, for ``_typed`` to refuse with the field's name and type."""
    if hint is bool:
        return _BOOLS.get(text.lower(), text)
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    return text if hint is str and not isinstance(value, str) else value
