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


def test_cancel_stops_within_one_step_and_leaves_inputs_untouched(stack, cat_image):
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
            _personalize(stack, cat_image, steps=5)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        comfy.model_management.interrupt_current_processing(False)
    assert steps_done == [1]
    assert all(torch.equal(a, b) for a, b in zip(before, _fingerprints(stack), strict=True))


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
