"""Personalization in ComfyUI keeps no second copy of the UNet: the peak of the tensor memory it allocates
is a small fraction of the UNet's weights, where a copy costs at least all of them."""

import copy

import pytest
import torch
from diffusers import UNet2DConditionModel

from benchmarks.measure import LiveTensorBytes
from training.headless.comfyui import pack_module
from training.headless.random_models import (comfy_model_from_diffusers, comfy_vae_from_diffusers, random_comfy_clip,
                                             random_comfy_clip_vision)
from training.models.reference import TINY_ENCODER

WIDTH = 256  # weights (about 150 MB) dominate the activations of 16x16 latents by far


@pytest.fixture(scope="module")
def wide(tiny_models, tmp_path_factory):
    """ComfyUI models, created under inference mode as its loaders create them, around a UNet wide
    enough that a copy of it would stand out from everything else personalization allocates."""
    core = pack_module("datencoder_core")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(WIDTH,) * 4, cross_attention_dim=32, attention_head_dim=8,
                                sample_size=16).eval()
    with torch.inference_mode():
        patcher = comfy_model_from_diffusers(unet)
        clip, vae = random_comfy_clip(), comfy_vae_from_diffusers(tiny_models.vae)
        clip_vision = random_comfy_clip_vision(tmp_path_factory.mktemp("clip_vision"))
    del unet
    sites, _ = pack_module("nodes.patching").comfy_sites(patcher)
    config = core.EncoderConfig(**{**TINY_ENCODER.to_dict(), "unet_dim": WIDTH})
    encoder = core.DATEncoder(config, core.LoRAConfig(), sites).eval()
    unet_bytes = sum(p.numel() * p.element_size() for p in patcher.model.diffusion_model.parameters())
    return patcher, clip, vae, clip_vision, encoder, unet_bytes


def _extra_peak(work) -> int:
    with LiveTensorBytes() as measured:
        work()
    return measured.peak_bytes


def test_personalization_does_not_duplicate_the_unet(wide, cat_image):
    patcher, clip, vae, clip_vision, encoder, unet_bytes = wide
    core, backend_module = pack_module("datencoder_core"), pack_module("nodes.backend")
    config = core.TuningConfig(steps=2, timesteps_per_step=1)

    def personalize():
        with torch.inference_mode(False), torch.enable_grad():
            backend = backend_module.ComfyUIBackend(patcher, clip, vae, clip_vision, image_size=128)
            core.personalize(backend, encoder, "wide@test", cat_image, config)

    ratio = _extra_peak(personalize) / unet_bytes
    copy_ratio = _extra_peak(lambda: copy.deepcopy(patcher.model.diffusion_model)) / unet_bytes
    print(f"peak tensor bytes allocated / UNet bytes: personalization {ratio:.3f}, a UNet copy {copy_ratio:.3f}")
    assert copy_ratio > 0.9  # the measurement sees a copy
    assert ratio < 0.5  # activations (about 0.27 here); a copy of the UNet alone would add 1.0
