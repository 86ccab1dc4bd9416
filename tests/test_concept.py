"""The concept file: round trip, and the export that standard SD1.5 tools load."""

import copy
import os
import stat

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from diffusers.models.attention_processor import AttnProcessor2_0
from safetensors.torch import load_file, save_file

from datencoder_core import (Concept, DATEncoderError, LoRAConfig, LoRAFactors, TuningConfig, architecture_fingerprint,
                             discover_sites, load_encoder, save_encoder)
from training.models.reference import build_random_models


def _concept(sites, token_dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    lora = LoRAFactors({s.name: torch.randn(4, s.in_features, generator=g) * 0.1 for s in sites},
                       {s.name: torch.randn(s.out_features, 4, generator=g) * 0.1 for s in sites}, 0.75)
    return Concept(torch.randn(token_dim, generator=g), lora, 70, "f</w>", architecture_fingerprint(sites, token_dim),
                   "enc@123", TuningConfig(steps=5, lr=1e-3, alpha_blend=0.4, seed=9), LoRAConfig().targets)


def test_concept_round_trip_is_bit_exact(backend, tmp_path):
    concept = _concept(backend.sites)
    concept.save(tmp_path / "cat.safetensors")
    loaded = Concept.load(tmp_path / "cat.safetensors")
    assert torch.equal(loaded.v_star, concept.v_star)
    assert loaded.lora.down.keys() == concept.lora.down.keys()
    assert all(torch.equal(loaded.lora.down[k], concept.lora.down[k]) and torch.equal(loaded.lora.up[k], concept.lora.up[k])
               for k in concept.lora.down)
    assert (loaded.token_id, loaded.token, loaded.lora.scale, loaded.rank, loaded.encoder_id) == (
        70, "f</w>", 0.75, 4, "enc@123")
    assert loaded.tuning == TuningConfig(steps=5, lr=1e-3, alpha_blend=0.4, seed=9)
    assert loaded.lora_targets == LoRAConfig().targets and loaded.base_fingerprint == concept.base_fingerprint
    assert loaded.source == str(tmp_path / "cat.safetensors") and concept.source is None  # what messages name
    assert [p.name for p in tmp_path.iterdir()] == ["cat.safetensors"]  # no temporary file left behind


def test_format_1_files_still_load(backend, tmp_path):
    """Files written before provenance was recorded: alpha_blend in the header, no tuning, no targets."""
    concept = _concept(backend.sites)
    tensors = {"v_star": concept.v_star}
    for site in concept.lora.down:
        tensors[f"lora.{site}.down"], tensors[f"lora.{site}.up"] = concept.lora.down[site], concept.lora.up[site]
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata={
        "format": "datencoder.concept", "format_version": "1", "token_id": "70", "token": "f</w>", "rank": "4",
        "scale": "0.75", "alpha_blend": "0.25", "base_fingerprint": concept.base_fingerprint, "encoder_id": "enc@123"})
    loaded = Concept.load(tmp_path / "old.safetensors")
    assert loaded.tuning is None and loaded.lora_targets == tuple(sorted(LoRAConfig().targets))
    assert torch.equal(loaded.v_star, concept.v_star) and (loaded.token_id, loaded.lora.scale) == (70, 0.75)
    loaded.save(tmp_path / "resaved.safetensors")  # a format 2 file that says the settings are unknown
    assert Concept.load(tmp_path / "resaved.safetensors").tuning is None


def test_written_files_have_the_usual_mode(backend, tmp_path):
    """0644 under umask 022, as ComfyUI's images (safetensors' own writer gives 0600)."""
    concept = _concept(backend.sites)
    previous = os.umask(0o022)
    try:
        concept.save(tmp_path / "c.safetensors")
        concept.export(tmp_path / "l.safetensors", tmp_path / "e.safetensors")
        os.umask(0o027)
        concept.save(tmp_path / "private.safetensors")
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {"c.safetensors": 0o644, "l.safetensors": 0o644, "e.safetensors": 0o644,
                     "private.safetensors": 0o640}


def _fail_on_call(monkeypatch, calls):
    """Make ``open`` in the checkpoint module fail on its ``calls``-th call (the ``calls``-th file written)."""
    import builtins

    from datencoder_core import checkpoint

    count = []

    def failing_open(path, *args, **kwargs):
        count.append(path)
        if len(count) == calls:
            raise OSError(28, "No space left on device")
        return builtins.open(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "open", failing_open, raising=False)


def test_export_writes_both_files_or_neither(backend, tmp_path, monkeypatch):
    concept = _concept(backend.sites)
    lora, embedding = tmp_path / "cat_lora.safetensors", tmp_path / "cat_embedding.safetensors"
    _fail_on_call(monkeypatch, 2)  # the embedding cannot be written
    with pytest.raises(DATEncoderError, match=r"cat_embedding.safetensors: could not write the file "
                                              r"\(No space left on device\) \(no file was changed\)"):
        concept.export(lora, embedding)
    assert list(tmp_path.iterdir()) == []

    embedding.mkdir()  # written in full, but the embedding's rename fails after the LoRA's succeeded
    with pytest.raises(DATEncoderError, match="cat_embedding.safetensors: could not write the file"):
        concept.export(lora, embedding)
    assert [p.name for p in tmp_path.iterdir()] == ["cat_embedding.safetensors"] and embedding.is_dir()


def test_failed_export_over_old_files_restores_them(backend, tmp_path, monkeypatch):
    old, new = _concept(backend.sites, seed=1), _concept(backend.sites, seed=2)
    lora, embedding = tmp_path / "cat_lora.safetensors", tmp_path / "cat_embedding.safetensors"
    old.export(lora, embedding)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    monkeypatch.setattr(os, "replace", _failing_on(os.replace, str(embedding)))  # the second move fails
    with pytest.raises(DATEncoderError, match="cat_embedding.safetensors: could not write the file"):
        new.export(lora, embedding)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    monkeypatch.undo()
    new.export(lora, embedding)  # and with nothing failing, both are replaced
    assert torch.equal(load_file(embedding)["emb_params"][0], new.v_star)
    site = next(iter(new.lora.up))
    assert torch.equal(load_file(lora)[f"lora_unet_{site.replace('.', '_')}.lora_up.weight"], new.lora.up[site])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat_embedding.safetensors", "cat_lora.safetensors"]


def _failing_on(replace, target):
    """``os.replace`` that fails when a temporary file is moved onto ``target``."""

    def failing(source, destination):
        if str(destination) == target and ".tmp." in str(source):
            raise OSError(13, "Permission denied")
        return replace(source, destination)

    return failing


def test_encoder_round_trip_is_bit_exact(tiny_models, encoder, tmp_path):
    encoder_id = save_encoder(encoder, tmp_path / "enc.safetensors", name="tiny")
    loaded, loaded_id = load_encoder(tmp_path / "enc.safetensors")
    assert loaded_id == encoder_id and encoder_id.startswith("tiny@")
    assert loaded.config == encoder.config and loaded.sites == encoder.sites
    for key, value in encoder.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    inputs = torch.randn(1, 257, 32), torch.randn(1, 64, 2, 2)
    assert torch.equal(loaded(*inputs).v_star, encoder(*inputs).v_star)


def test_export_loads_in_diffusers_and_equals_merged_weights(tmp_path):
    models = build_random_models("tiny", seed=3)
    concept = _concept(discover_sites(models.unet.named_modules(), LoRAConfig().targets))
    concept.export(tmp_path / "cat_lora.safetensors", tmp_path / "cat_embedding.safetensors")

    merged = copy.deepcopy(models.unet)
    modules = dict(merged.named_modules())
    with torch.no_grad():
        for site, a in concept.lora.down.items():
            modules[site].weight += concept.lora.scale * concept.lora.up[site] @ a
    pipe = StableDiffusionPipeline(vae=models.vae, text_encoder=models.text_encoder, tokenizer=models.tokenizer,
                                   unet=models.unet, scheduler=DDIMScheduler(steps_offset=1, clip_sample=False), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(tmp_path), weight_name="cat_lora.safetensors")
    pipe.load_textual_inversion(str(tmp_path / "cat_embedding.safetensors"), token="<cat>")

    g = torch.Generator().manual_seed(0)
    latents, context = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([100, 800])
    merged.set_attn_processor(AttnProcessor2_0())
    with torch.no_grad():
        theirs = pipe.unet(latents, t, encoder_hidden_states=context).sample
        ours = merged(latents, t, encoder_hidden_states=context).sample
        unpatched = build_random_models("tiny", seed=3).unet(latents, t, encoder_hidden_states=context).sample
    assert not torch.allclose(theirs, unpatched, atol=1e-4)  # the LoRA did load
    assert torch.allclose(theirs, ours, atol=1e-5), (theirs - ours).abs().max()
    token_id = pipe.tokenizer.convert_tokens_to_ids("<cat>")
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[token_id], concept.v_star)


def test_exported_alpha_reproduces_scale(backend, tmp_path):
    from safetensors.torch import load_file

    concept = _concept(backend.sites)
    concept.export(tmp_path / "l.safetensors", tmp_path / "e.safetensors")
    tensors = load_file(tmp_path / "l.safetensors")
    alphas = {float(v) for k, v in tensors.items() if k.endswith(".alpha")}
    assert alphas == {0.75 * 4}  # alpha / rank = scale, kohya's convention
    assert len(tensors) == 3 * len(backend.sites)


def test_a_concept_made_without_an_encoder_saves_loads_and_exports_as_any_other(backend, cat_image, tmp_path):
    """The encoder-free path's concept (encoder_id "none", its start word recorded) round-trips bit for bit
    and exports to the same two files; a concept from an encoder has no init_word key in its file."""
    from datencoder_core import personalize_from_word

    concept = personalize_from_word(backend, "cat", LoRAConfig(), cat_image,
                                    TuningConfig(steps=1, timesteps_per_step=1))
    assert (concept.encoder_id, concept.init_word) == ("none", "cat")
    assert concept.label == f"the concept with nearest word {concept.token!r} (no encoder, tuned from the word 'cat')"
    concept.save(tmp_path / "cat.safetensors")
    loaded = Concept.load(tmp_path / "cat.safetensors")
    assert (loaded.encoder_id, loaded.init_word, loaded.tuning) == ("none", "cat", concept.tuning)
    assert torch.equal(loaded.v_star, concept.v_star)
    assert all(torch.equal(loaded.lora.up[k], concept.lora.up[k]) for k in concept.lora.up)
    assert loaded.file_contents()[1] == concept.file_contents()[1]
    concept.export(tmp_path / "lora.safetensors", tmp_path / "emb.safetensors")
    assert torch.equal(load_file(tmp_path / "emb.safetensors")["emb_params"][0], concept.v_star)
    assert len(load_file(tmp_path / "lora.safetensors")) == 3 * len(concept.lora.down)
    assert "init_word" not in _concept(backend.sites).file_contents()[1]
    assert Concept.load(_saved(_concept(backend.sites), tmp_path / "enc.safetensors")).init_word is None


def _saved(concept, path):
    concept.save(path)
    return path
