"""Config values have their fields' declared types, from --set, a TOML or YAML file, or a stored JSON header;
a wrong one is refused naming the field, the value and the type. The encoder trunk's GroupNorm keeps colour."""

import pytest

from datencoder_core import DATEncoderError, EncoderConfig, LoRAConfig, TuningConfig
from datencoder_core.config import LossConfig
from training.models.reference import TINY_ENCODER
from training.pretrain.config import PRESETS, TrainingConfig, resolve_config


@pytest.mark.parametrize("text, expected", [("no", False), ("NO", False), ("0", False), ("False", False),
                                            ("yes", True), ("True", True), ("1", True)])
def test_set_reads_a_bool_in_any_usual_spelling(text, expected):
    """'no' was kept as the string 'no', which is truthy: the no-dual-path ablation ran with the dual path on."""
    assert resolve_config("tiny", None, (f"training.dual_path={text}",)).training.dual_path is expected


REFUSED = [
    ("training.dual_path=maybe", "--set training.dual_path: expected bool, got 'maybe' (str)"),
    ("training.steps=1e3", "--set training.steps: expected int, got 1000.0 (float)"),
    ("training.steps=12.5", "--set training.steps: expected int, got 12.5 (float)"),
    ("training.lr=3e-4x", "--set training.lr: expected float, got '3e-4x' (str)"),
    ("training.lr=true", "--set training.lr: expected float, got True (bool)"),
    ("training.templates=3", "--set training.templates: expected tuple[str, ...], got 3 (int)"),
    ("encoder.trunk_channels=128.0", "--set encoder.trunk_channels: expected int, got 128.0 (float)"),
]


@pytest.mark.parametrize("override, message", REFUSED, ids=[override for override, _ in REFUSED])
def test_set_refuses_a_value_of_the_wrong_type(override, message):
    with pytest.raises(DATEncoderError) as error:
        resolve_config("tiny", None, (override,))
    assert str(error.value) == message


def test_set_converts_to_the_declared_type():
    config = resolve_config("tiny", None, ("training.lr=1", "training.steps=1_000", "training.mixed_precision=bf16",
                                           'training.models="tiny"', 'training.templates=["a {}", "the {}"]'))
    assert type(config.training.lr) is float and config.training.lr == 1.0
    assert config.training.steps == 1000 and config.training.mixed_precision == "bf16"
    assert config.training.templates == ("a {}", "the {}")


@pytest.mark.parametrize("name, text", [("run.toml", '[training]\ndual_path = "no"\n'),
                                        ("run.yaml", 'training:\n  dual_path: "no"\n'),
                                        ("run.toml", "[training]\ndual_path = 0\n")],
                         ids=["toml-str", "yaml-str", "toml-int"])
def test_config_files_are_checked_the_same_way(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    with pytest.raises(DATEncoderError, match=rf"{name}: training.dual_path: expected bool, got .* \((str|int)\)"):
        resolve_config("tiny", tmp_path / name)


def test_config_file_ints_widen_to_floats_and_lists_become_tuples(tmp_path):
    (tmp_path / "run.toml").write_text('[training]\nlr = 1\ntemplates = ["a {}"]\n[lora]\nalpha = 8\n')
    config = resolve_config("tiny", tmp_path / "run.toml")
    assert (config.training.lr, config.training.templates, config.lora.alpha) == (1.0, ("a {}",), 8.0)
    assert type(config.lora.alpha) is float


def test_from_dict_checks_types_and_round_trips_every_config():
    """Checkpoints store configs as JSON headers: every field's type survives the trip, a wrong one is refused."""
    for config in (LoRAConfig(), LossConfig(), TuningConfig(), EncoderConfig(), TINY_ENCODER, TrainingConfig(),
                   PRESETS["tiny"].training):
        assert type(config).from_dict(config.to_dict()) == config
    with pytest.raises(DATEncoderError, match=r"LoRAConfig.rank: expected int, got '4' \(str\)"):
        LoRAConfig.from_dict({"rank": "4"})
    with pytest.raises(DATEncoderError, match=r"LoRAConfig.targets: expected str, got 1 \(int\)"):
        LoRAConfig.from_dict({"targets": ["attn1.to_q", 1]})


@pytest.mark.parametrize("trunk_channels", [32, 64, 96])
def test_encoder_refuses_fewer_than_4_channels_per_groupnorm_group(trunk_channels):
    """With 1 channel per group the trunk's GroupNorm cancels each channel's mean, an image's colour."""
    with pytest.raises(DATEncoderError, match=rf"trunk_channels must be .*>= 128 .*4 channels.*colour.*"
                                              rf"got {trunk_channels}"):
        EncoderConfig(trunk_channels=trunk_channels)
    assert EncoderConfig(trunk_channels=128).trunk_channels == 128
    assert TINY_ENCODER.trunk_channels // 32 >= 4
