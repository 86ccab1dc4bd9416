"""Bad input gets one clear DATEncoderError that says what was expected, never a torch traceback."""

import re

import pytest
import torch
from safetensors.torch import save_file

from datencoder_core import (Concept, DATEncoderError, LoRAConfig, LoRAFactors, TuningConfig, load_encoder,
                             personalize, save_encoder)
from datencoder_core.images import clip_preprocess


SITE = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


@pytest.fixture
def concept_file(backend, tmp_path):
    g = torch.Generator().manual_seed(0)
    lora = LoRAFactors({s.name: torch.randn(4, s.in_features, generator=g) for s in backend.sites},
                       {s.name: torch.randn(s.out_features, 4, generator=g) for s in backend.sites}, 1.0)
    path = tmp_path / "cat.safetensors"
    Concept(torch.randn(32), lora, 70, "f</w>", "tinyfingerprint0", "enc@1", TuningConfig(),
            LoRAConfig().targets).save(path)
    return path


def test_wrong_encoder_input_shapes(encoder):
    with pytest.raises(DATEncoderError, match=r"expected \(B, 1 \+ g\*g, 32\).*ViT-H-14"):
        encoder(torch.randn(1, 257, 1024), torch.randn(1, 64, 2, 2))
    with pytest.raises(DATEncoderError, match="square grid"):
        encoder(torch.randn(1, 200, 32), torch.randn(1, 64, 2, 2))
    with pytest.raises(DATEncoderError, match=r"expected \(B, 64, h, w\)"):
        encoder(torch.randn(1, 257, 32), torch.randn(1, 1280, 2, 2))
    with pytest.raises(DATEncoderError, match="batch size: 2 vs 1"):
        encoder(torch.randn(2, 257, 32), torch.randn(1, 64, 2, 2))


def test_wrong_concept_shapes():
    with pytest.raises(DATEncoderError, match=r"expected a \(D,\) vector"):
        Concept(torch.randn(1, 32), LoRAFactors({SITE: torch.zeros(4, 8)}, {SITE: torch.zeros(8, 4)}, 1.0),
                1, "a", "f", "e", None, ("attn1.to_q",))
    with pytest.raises(DATEncoderError, match=r"Concept.lora\['down.*attn1.to_q'\]: expected A \(r=4, D_in\)"):
        Concept(torch.randn(32), LoRAFactors({SITE: torch.zeros(4, 8)}, {SITE: torch.zeros(8, 3)}, 1.0),
                1, "a", "f", "e", None, ("attn1.to_q",))
    with pytest.raises(DATEncoderError, match=r"sites of the targets \['attn1.to_q'\], which lora_targets "
                                              r"\['attn2.to_k'\] does not list"):
        Concept(torch.randn(32), LoRAFactors({SITE: torch.zeros(4, 8)}, {SITE: torch.zeros(8, 4)}, 1.0),
                1, "a", "f", "e", None, ("attn2.to_k",))


def test_corrupt_and_truncated_files(concept_file, tmp_path):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(concept_file.read_bytes()[:-100])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    for path in (truncated, garbage):
        with pytest.raises(DATEncoderError, match=rf"{path.name}: not a readable .safetensors file"):
            Concept.load(path)
    with pytest.raises(DATEncoderError, match="missing.safetensors: no such file"):
        Concept.load(tmp_path / "missing.safetensors")


def test_unknown_format_version_and_wrong_kind_of_file(concept_file, encoder, tmp_path):
    future = tmp_path / "future.safetensors"
    save_file({"v_star": torch.zeros(32)}, str(future), metadata={"format": "datencoder.concept", "format_version": "9"})
    with pytest.raises(DATEncoderError, match=r"format_version '9' is not supported .*supported: \[1, 2\]"):
        Concept.load(future)
    save_encoder(encoder, tmp_path / "enc.safetensors")
    with pytest.raises(DATEncoderError, match="expected a 'datencoder.concept' file, found a 'datencoder.encoder' file"):
        Concept.load(tmp_path / "enc.safetensors")
    with pytest.raises(DATEncoderError, match="expected a 'datencoder.encoder' file, found a 'datencoder.concept'"):
        load_encoder(concept_file)
    plain = tmp_path / "some_lora.safetensors"
    save_file({"x": torch.zeros(1)}, str(plain))
    with pytest.raises(DATEncoderError, match="found a safetensors file without DATEncoder metadata"):
        load_encoder(plain)


def test_concept_file_missing_tensors(tmp_path):
    path = tmp_path / "partial.safetensors"
    save_file({"lora.s.down": torch.zeros(4, 8)}, str(path), metadata={"format": "datencoder.concept",
                                                                         "format_version": "1"})
    with pytest.raises(DATEncoderError, match="partial.safetensors: damaged concept file"):
        Concept.load(path)


def test_failed_save_leaves_no_partial_file(concept_file, tmp_path):
    """The target is a directory: writing completes, the final rename fails, nothing is left over."""
    concept = Concept.load(concept_file)
    (tmp_path / "blocked.safetensors").mkdir()
    with pytest.raises(DATEncoderError, match="blocked.safetensors: could not write the file"):
        concept.save(tmp_path / "blocked.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocked.safetensors", "cat.safetensors"]


def test_encoder_for_another_unet(backend, cat_image):
    from training.models.reference import build_random_models

    sd_like = build_random_models("tiny", seed=0)
    other = sd_like.random_encoder(LoRAConfig(targets=("attn2.to_k",)))
    with pytest.raises(DATEncoderError, match="the encoder enc@x was made for another base model"):
        personalize(backend, other, "enc@x", cat_image, TuningConfig(steps=0))


@pytest.mark.parametrize("shape", [(1, 64, 64), (1, 64, 64, 2), (1, 4, 64, 3)])
def test_bad_images(shape):
    with pytest.raises(DATEncoderError, match="IMAGE|too small"):
        clip_preprocess(torch.rand(shape))


@pytest.mark.parametrize("kwargs,message", [
    ({"steps": -1}, "steps must be in"), ({"alpha_blend": 1.5}, "alpha_blend must be in"),
    ({"prompt": "a photo"}, "must contain '{}' once"), ({"lr": 0}, "lr must be > 0"),
])
def test_bad_tuning_config(kwargs, message):
    with pytest.raises(DATEncoderError, match=message):
        TuningConfig(**kwargs)


def test_bad_lora_config():
    with pytest.raises(DATEncoderError, match=r"unknown \['attn1.to_out.0'\]"):
        LoRAConfig(targets=("attn1.to_out.0",))


def test_prompt_too_long(backend):
    with pytest.raises(DATEncoderError, match="tokens long; the text encoder takes 77"):
        backend.encode_prompt("a very long prompt " * 10 + "{}", 70)


def test_encoder_header_whose_fingerprint_is_not_its_own(encoder, tmp_path):
    """The stored base fingerprint is checked against the header's sites, so it can be trusted."""
    from safetensors import safe_open

    path = tmp_path / "enc.safetensors"
    save_encoder(encoder, path)
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(path), metadata={**metadata, "base_fingerprint": "0123456789abcdef"})
    with pytest.raises(DATEncoderError, match="damaged encoder header: its base_fingerprint 0123456789abcdef does not"):
        load_encoder(path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["v_star", "lora"])
def test_a_concept_file_with_nan_or_inf_is_refused_naming_it(concept_file, tmp_path, where, bad):
    concept = Concept.load(concept_file)
    if where == "v_star":
        concept.v_star[3] = bad
        name = "v_star"
    else:
        site = next(iter(concept.lora.up))
        concept.lora.up[site][0, 0] = bad
        name = f"lora.{site}.up"
    path = tmp_path / "diverged.safetensors"
    concept.save(path)
    with pytest.raises(DATEncoderError, match=rf"^the concept {re.escape(str(path))} holds NaN or inf values "
                                              rf"\(in {re.escape(name)}\); it cannot be used"):
        Concept.load(path)


def test_an_empty_start_word_is_refused(backend, cat_image):
    from datencoder_core import personalize_from_word, word_start

    for word in ("", "   "):
        with pytest.raises(DATEncoderError, match=r"the start word .* has no tokens: name the concept's class word"):
            word_start(backend, word, LoRAConfig(), 0)
    with pytest.raises(DATEncoderError, match="has no tokens"):
        personalize_from_word(backend, " ", LoRAConfig(), cat_image, TuningConfig(steps=1))


def test_steps_up_to_2000():
    assert TuningConfig(steps=2000).steps == 2000
    with pytest.raises(DATEncoderError, match=r"steps must be in \[0, 2000\]"):
        TuningConfig(steps=2001)
