"""Personalize Concept and DATEncoder Loader, run as ComfyUI's executor runs nodes (inference mode)."""

import json
import re

import pytest
import torch
from training.headless.comfyui import pack_module
from training.headless.random_models import (comfy_model_from_diffusers, comfy_vae_from_diffusers, random_comfy_clip,
                                             random_comfy_clip_vision)

from training.models.reference import TINY_ENCODER


@pytest.fixture(scope="module")
def stack(tiny_models, tmp_path_factory):
    nodes = pack_module("nodes.nodes")
    core = pack_module("datencoder_core")
    with torch.inference_mode():  # as ComfyUI's loaders run
        patcher = comfy_model_from_diffusers(tiny_models.unet)
        clip = random_comfy_clip()
        clip_vision = random_comfy_clip_vision(tmp_path_factory.mktemp("clip_vision"))
        vae = comfy_vae_from_diffusers(tiny_models.vae)
    torch.manual_seed(0)
    sites = core.discover_sites(tiny_models.unet.named_modules(), core.LoRAConfig().targets)
    encoder = core.DATEncoder(core.EncoderConfig(**TINY_ENCODER.to_dict()), core.LoRAConfig(), sites).eval()
    return nodes, patcher, clip, vae, clip_vision, nodes.LoadedEncoder(encoder, "tiny@test")


def _personalize(stack, image, steps=2, seed=0):
    nodes, patcher, clip, vae, clip_vision, encoder = stack
    with torch.inference_mode():
        return nodes.DATEncoderPersonalize.execute(patcher, clip, vae, clip_vision, encoder, image, steps, 2e-3,
                                                   0.25, 1, seed)  # one timestep per step: 512 px is slow on CPU


def _fingerprints(stack):
    """Outputs of the input MODEL and CLIP, to show they are untouched."""
    _, patcher, clip, *_ = stack
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    with torch.inference_mode():
        unet = patcher.model.diffusion_model(x, torch.tensor([500.0]), context=context)
        text = clip.encode_from_tokens(clip.tokenize("a photo of a cat"))
    return unet, text


def test_personalize_makes_a_concept_and_leaves_inputs_untouched(stack, cat_image):
    before = _fingerprints(stack)
    output = _personalize(stack, cat_image)
    concept = output.result[0]
    assert concept.v_star.shape == (32,) and len(concept.lora.down) == 96
    [record] = output.ui["datencoder"]  # for code: scripts and the editor's extension read this, not the text
    assert output.ui == {"text": [f"nearest word: {concept.token}"], "datencoder": [record]}
    assert record == {"token": concept.token, "token_id": concept.token_id, "encoder_id": "tiny@test",
                      "losses": record["losses"]}
    assert len(record["losses"]) == 2 and all(isinstance(loss, float) and loss > 0 for loss in record["losses"])
    assert json.loads(json.dumps(output.ui)) == output.ui  # survives /history's JSON
    assert concept.token_id not in (49406, 49407) and concept.encoder_id == "tiny@test"
    assert any(b.abs().sum() > 0 for b in concept.lora.up.values())
    after = _fingerprints(stack)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert stack[1].object_patches == {} and stack[1].wrappers == {}


def test_same_inputs_and_seed_give_the_same_concept(stack, cat_image):
    first, second = (_personalize(stack, cat_image).result[0] for _ in range(2))
    other = _personalize(stack, cat_image, seed=1).result[0]
    assert torch.equal(first.v_star, second.v_star)
    assert not torch.equal(first.v_star, other.v_star)


def _steps_before_cancel(stack, run) -> list[int]:
    """Run ``run()`` with the user pressing Cancel after its first step; the steps the progress bar saw. It
    must raise ComfyUI's interrupt and leave the inputs untouched."""
    import comfy.model_management
    import comfy.utils

    before = _fingerprints(stack)
    steps_done = []

    def hook(value, total, preview, node_id=None):
        steps_done.append(value)
        comfy.model_management.interrupt_current_processing(True)  # the user presses Cancel after step 1

    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            run()
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        comfy.model_management.interrupt_current_processing(False)
    assert all(torch.equal(a, b) for a, b in zip(before, _fingerprints(stack), strict=True))
    return steps_done


def test_cancel_stops_within_one_step_and_leaves_inputs_untouched(stack, cat_image):
    assert _steps_before_cancel(stack, lambda: _personalize(stack, cat_image, steps=5)) == [1]


@pytest.mark.parametrize("make", [
    lambda cat: cat.mean(-1, keepdim=True),  # grayscale
    lambda cat: cat[:, :, :200],  # non-square (portrait)
], ids=["grayscale", "non_square"])
def test_image_kinds(stack, cat_image, make):
    concept = _personalize(stack, make(cat_image), steps=1).result[0]
    assert concept.v_star.shape == (32,) and torch.isfinite(concept.v_star).all()


def test_a_photo_with_alpha_is_composited_on_white(stack, cat_image):
    """Alpha from 0 (left) to 1 (right): the node's concept from the RGBA photo is its concept from the same
    photo composited on white by hand; from the photo with its alpha dropped it is another."""
    alpha = torch.linspace(0, 1, cat_image.shape[2])[None, None, :, None].expand(*cat_image.shape[:3], 1)
    rgba = _personalize(stack, torch.cat([cat_image, alpha], -1), steps=1).result[0]
    by_hand = _personalize(stack, cat_image * alpha + (1 - alpha), steps=1).result[0]
    dropped = _personalize(stack, cat_image, steps=1).result[0]
    assert torch.allclose(rgba.v_star, by_hand.v_star, atol=1e-5)
    assert (rgba.v_star - dropped.v_star).abs().max() > 1e-4


def test_a_batch_of_photos_gives_one_concept_from_all_of_them(stack, cat_image):
    """Same first photo and seed, only the second photo changed (the cat again -> its mirror image): the
    one concept changes, so the node used both (ignoring the second would give bit-identical results)."""
    same = _personalize(stack, torch.cat([cat_image, cat_image]), steps=1).result[0]
    mirrored = _personalize(stack, torch.cat([cat_image, cat_image.flip(2)]), steps=1).result[0]
    assert mirrored.v_star.shape == (32,) and all(a.ndim == 2 for a in mirrored.lora.down.values())
    assert (mirrored.v_star - same.v_star).abs().max() > 2e-4
    assert max((mirrored.lora.down[k] - same.lora.down[k]).abs().max() for k in same.lora.down) > 2e-4


def test_bad_image_is_a_clear_error_and_inputs_stay_untouched(stack):
    error = pack_module("datencoder_core").DATEncoderError
    before = _fingerprints(stack)
    with pytest.raises(error, match="expected an IMAGE tensor"):
        _personalize(stack, torch.rand(1, 64, 64, 2))
    assert all(torch.equal(a, b) for a, b in zip(before, _fingerprints(stack), strict=True))


def test_latents_match_the_reference_backend(stack, backend, cat_image):
    """Same VAE weights: ComfyUI's encoding (mean, scaled by the model's latent format) is the reference's."""
    _, patcher, clip, vae, clip_vision, _ = stack
    with torch.inference_mode(False):
        comfy_backend = pack_module("nodes.backend").ComfyUIBackend(patcher, clip, vae, clip_vision, image_size=128)
        ours = comfy_backend.encode_latents(cat_image)
    assert torch.allclose(ours, backend.encode_latents(cat_image), atol=1e-5)


def _nothing_loaded_since(loaded_before):
    import comfy.model_management

    return [m.model for m in comfy.model_management.current_loaded_models] == loaded_before


def test_a_v_prediction_model_is_refused(stack, cat_image):
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    nodes, patcher, *_ = stack
    (v_model,) = ModelSamplingDiscrete().patch(patcher, "v_prediction", False)
    with pytest.raises(pack_module("datencoder_core").DATEncoderError, match="samples as .* eps-prediction"):
        with torch.inference_mode():
            nodes.DATEncoderPersonalize.execute(v_model, *stack[2:], cat_image, 1, 2e-3, 0.25, 1, 0)


def test_an_sdxl_clip_is_refused_before_anything_is_loaded(stack, cat_image):
    """SDXL's CLIP has a CLIP-L too; its tokenizer (two encoders) gives it away."""
    import comfy.model_management
    import comfy.sdxl_clip

    nodes, patcher, clip, vae, clip_vision, encoder = stack
    sdxl_clip = clip.clone()
    sdxl_clip.tokenizer = comfy.sdxl_clip.SDXLTokenizer(embedding_directory=None, tokenizer_data={})
    loaded = [m.model for m in comfy.model_management.current_loaded_models]
    with pytest.raises(pack_module("datencoder_core").DATEncoderError, match=r"text encoders \['g', 'l'\].*SDXL"):
        with torch.inference_mode():
            nodes.DATEncoderPersonalize.execute(patcher, sdxl_clip, vae, clip_vision, encoder, cat_image, 1, 2e-3,
                                                0.25, 1, 0)
    assert _nothing_loaded_since(loaded)


def test_an_encoder_for_another_base_model_is_refused_first(stack, tiny_models, cat_image, tmp_path, monkeypatch):
    """An encoder file from the Loader made for other sites: refused before anything is loaded, naming
    the file, both fingerprints and the fix."""
    import comfy.model_management
    import folder_paths

    nodes, patcher, clip, vae, clip_vision, _ = stack
    core = pack_module("datencoder_core")
    lora_config = core.LoRAConfig(targets=("attn2.to_k", "attn2.to_v"))
    sites = core.discover_sites(tiny_models.unet.named_modules(), lora_config.targets)
    encoder = core.DATEncoder(core.EncoderConfig(**TINY_ENCODER.to_dict()), lora_config, sites)
    encoder_id = core.save_encoder(encoder, tmp_path / "other.safetensors", name="other")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "datencoder", ([str(tmp_path)], {".safetensors"}))
    other = nodes.DATEncoderLoader.execute("other.safetensors").result[0]
    loaded = [m.model for m in comfy.model_management.current_loaded_models]
    path = re.escape(str(tmp_path / "other.safetensors"))
    with pytest.raises(core.DATEncoderError, match=rf"^the encoder {path} \({encoder_id}\) was made for another base "
                                                   rf"model \(fingerprint \w+\) than this MODEL, which it is used "
                                                   rf"with \(fingerprint \w+\)\. Use it with the SD1.x checkpoint "
                                                   rf"it was made for"):
        with torch.inference_mode():
            nodes.DATEncoderPersonalize.execute(patcher, clip, vae, clip_vision, other, cat_image, 1, 2e-3, 0.25, 1, 0)
    assert _nothing_loaded_since(loaded)


def test_a_pretrained_encoder_loads_in_the_loader_and_personalizes(stack, tiny_pretraining, cat_image, monkeypatch):
    """The file ``python -m training.pretrain --preset tiny`` exports, served from models/datencoder/: the
    DATEncoder Loader reads it and Personalize Concept runs with it."""
    import shutil

    import folder_paths

    nodes, patcher, clip, vae, clip_vision, _ = stack
    folder = tiny_pretraining.parent / "datencoder"
    folder.mkdir(exist_ok=True)
    shutil.copy(tiny_pretraining / "datencoder.safetensors", folder / "pretrained.safetensors")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "datencoder", ([str(folder)], {".safetensors"}))
    loaded = nodes.DATEncoderLoader.execute("pretrained.safetensors")
    encoder = loaded.result[0]
    assert encoder.encoder_id.startswith("datencoder-pretrained@")
    assert loaded.ui == {"text": [f"encoder {encoder.encoder_id}"], "datencoder": [{"encoder_id": encoder.encoder_id}]}
    with torch.inference_mode():
        concept = nodes.DATEncoderPersonalize.execute(patcher, clip, vae, clip_vision, encoder, cat_image, 1, 2e-3,
                                                      0.25, 1, 0).result[0]
    assert concept.encoder_id == encoder.encoder_id and torch.isfinite(concept.v_star).all()


# Personalize Concept (no encoder): the encoder-free path (issue 27) through ComfyUI.

def _from_word(stack, image, word="cat", steps=2, seed=0, lr=1e-3):
    nodes, patcher, clip, vae, *_ = stack
    with torch.inference_mode():
        return nodes.DATEncoderPersonalizeFromWord.execute(patcher, clip, vae, image, word, steps, lr, 0.25, 1, seed)


def test_personalize_from_word_makes_an_ordinary_concept(stack, cat_image, tmp_path, monkeypatch):
    """No encoder, no CLIP vision: a concept whose record says so (encoder_id "none", the start word), that
    Save Concept, Load Concept, Export, Dual-Path Model Patch and Apply Concept Token take as any other;
    the input MODEL and CLIP are untouched."""
    import folder_paths

    nodes, patcher, clip, *_ = stack
    before = _fingerprints(stack)
    output = _from_word(stack, cat_image)
    concept = output.result[0]
    [record] = output.ui["datencoder"]
    assert output.ui["text"] == [f"nearest word: {concept.token}"]
    assert record == {"token": concept.token, "token_id": concept.token_id, "encoder_id": "none", "init_word": "cat",
                      "losses": record["losses"]} and len(record["losses"]) == 2
    assert json.loads(json.dumps(output.ui)) == output.ui
    assert concept.v_star.shape == (32,) and len(concept.lora.down) == 96
    assert any(b.abs().sum() > 0 for b in concept.lora.up.values())
    assert (concept.tuning.steps, concept.tuning.lr, concept.tuning.seed) == (2, 1e-3, 0)
    assert all(torch.equal(a, b) for a, b in zip(before, _fingerprints(stack), strict=True))
    assert patcher.object_patches == {} and patcher.wrappers == {}

    for key in ("datencoder_concepts", "loras", "embeddings"):
        monkeypatch.setitem(folder_paths.folder_names_and_paths, key, ([str(tmp_path / key)], {".safetensors"}))
        (tmp_path / key).mkdir()
    nodes.DATEncoderSaveConcept.execute(concept, "word", False)
    loaded_output = nodes.DATEncoderLoadConcept.execute("word.safetensors")
    loaded = loaded_output.result[0]
    assert (loaded.encoder_id, loaded.init_word) == ("none", "cat") and torch.equal(loaded.v_star, concept.v_star)
    [loaded_record] = loaded_output.ui["datencoder"]
    assert (loaded_record["encoder_id"], loaded_record["init_word"]) == ("none", "cat")
    assert "cat" in loaded_output.ui["text"][0] and "no encoder" in loaded_output.ui["text"][0]
    nodes.DATEncoderExportConcept.execute(concept, "word", False)
    assert all((tmp_path / key / "word.safetensors").exists() for key in ("loras", "embeddings"))
    patched = nodes.DATEncoderDualPathPatch.execute(patcher, loaded, 0.25, 1.0).result[0]
    assert patched is not patcher
    (listed,) = nodes.DATEncoderConceptList.execute(loaded, "S2*").result
    assert listed == (("S2*", loaded),)
    with torch.inference_mode():
        (conditioning,) = nodes.DATEncoderApplyConceptToken.execute(clip, loaded, "a photo of S*", "S*").result
    assert conditioning[0][0].shape == (1, 77, 32)


def test_personalize_from_word_starts_at_the_words_embedding_in_comfyui(stack, cat_image):
    """v*_0 is the mean of the CLIP token-embedding rows of the word's tokens (ComfyUI's tokenizer, no start or
    end token); several tokens average."""
    nodes, patcher, clip, vae, *_ = stack
    core = pack_module("datencoder_core")
    table = clip.cond_stage_model.clip_l.transformer.text_model.embeddings.token_embedding.weight
    with torch.inference_mode(False):
        backend = pack_module("nodes.backend").ComfyUIBackend(patcher, clip, vae, image_size=128)
        for word, count in (("cat", 1), ("a red teapot", 3)):
            ids = backend.word_token_ids(word)
            assert len(ids) == count and 49406 not in ids and 49407 not in ids
            v, lora = core.word_start(backend, word, core.LoRAConfig(), 0)
            assert torch.equal(v, table[ids].float().mean(0))
        assert backend.word_token_ids("  ") == []
        start = core.personalize_from_word(backend, "cat", core.LoRAConfig(), cat_image, core.TuningConfig(steps=0))
    assert torch.equal(start.v_star, table[backend.word_token_ids("cat")].float().mean(0))
    assert start.token == "cat</w>" and not any(b.any() for b in start.lora.up.values())


def test_personalize_from_word_same_inputs_and_seed_give_the_same_concept(stack, cat_image):
    first, second = (_from_word(stack, cat_image, steps=1).result[0] for _ in range(2))
    other = _from_word(stack, cat_image, steps=1, seed=1).result[0]
    assert torch.equal(first.v_star, second.v_star)
    assert all(torch.equal(first.lora.down[k], second.lora.down[k]) for k in first.lora.down)
    assert not torch.equal(first.v_star, other.v_star)


def test_personalize_from_word_cancel_stops_within_one_step(stack, cat_image):
    assert _steps_before_cancel(stack, lambda: _from_word(stack, cat_image, steps=50)) == [1]


def test_an_empty_init_word_is_refused_when_queued_and_when_run(stack, cat_image):
    nodes = stack[0]
    for word in ("", "   ", "\t\n"):
        problem = nodes.DATEncoderPersonalizeFromWord.validate_inputs(word)
        assert isinstance(problem, str) and problem.startswith("init_word is empty: name the concept's class word")
    assert nodes.DATEncoderPersonalizeFromWord.validate_inputs("cat") is True
    assert nodes.DATEncoderPersonalizeFromWord.validate_inputs(None) is True  # linked: checked when it runs
    with pytest.raises(pack_module("datencoder_core").DATEncoderError, match="has no tokens: name the concept's"):
        _from_word(stack, cat_image, word=" ")


def test_a_diverging_run_stops_with_a_clear_error_and_no_concept(stack, cat_image, monkeypatch):
    backend = pack_module("nodes.backend").ComfyUIBackend
    predict = backend.predict_noise
    monkeypatch.setattr(backend, "predict_noise", lambda self, *a: predict(self, *a) * float("nan"))
    with pytest.raises(pack_module("datencoder_core").DATEncoderError,
                       match=r"^tuning diverged: the loss of step 1/3 is nan at lr 0\.001; no concept was made"):
        _from_word(stack, cat_image, steps=3)


def test_progress_shows_step_loss_and_time_left(stack, monkeypatch):
    """Each step's loss and counter; the time left on runs of more than 10 steps (not on the last step)."""
    nodes = stack[0]
    shown = []
    monkeypatch.setattr(nodes, "show_text", lambda node_id, text: shown.append(text))

    def make(steps):
        def run(progress, interrupt):
            for step in range(1, steps + 1):
                interrupt()
                progress(step, steps, 0.5 / step)
            return _concept_stub()
        return run

    nodes.run_tuning("7", 12, make(12))
    assert re.fullmatch(r"step 1/12  loss 0\.5000  ~\d+ s left", shown[0]) and len(shown) == 13
    assert shown[-2] == "step 12/12  loss 0.0417" and shown[-1] == "nearest word: cat</w>"
    shown.clear()
    nodes.run_tuning("7", 3, make(3))
    assert shown[:3] == ["step 1/3  loss 0.5000", "step 2/3  loss 0.2500", "step 3/3  loss 0.1667"]


def _concept_stub():
    core = pack_module("datencoder_core")
    site = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    lora = core.LoRAFactors({site: torch.zeros(4, 8)}, {site: torch.zeros(8, 4)}, 1.0)
    return core.Concept(torch.zeros(32), lora, 2368, "cat</w>", "f", "none", None, ("attn1.to_q",), init_word="cat")
