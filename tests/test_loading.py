"""Loading the user's model files for training (``training.models.loading``): the features the training side
computes from a file equal what Personalize Concept computes in ComfyUI from the same file and image,
and each wrong file is refused with its name.

The files are written by ComfyUI's own savers from ComfyUI's own model classes with random tiny weights:
an SD1.x checkpoint in the original LDM key layout (``comfy.sd.save_checkpoint``, the layout of
``v1-5-pruned-emaonly.safetensors``) and a clip_vision file in transformers' keys (float16, as the
IP-Adapter file). The loader gets a config folder of the same tiny shapes (``config=``,
``vision_model=``); the shipped SD1.5 / ViT-H-14 shapes are checked by the full-size ViT-H test, the
shipped-config test (against SD1's v1-inference.yaml) and the error tests.
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file
from training.headless.comfyui import comfyui_path, import_comfyui, pack_module, seeded_random_init
from training.headless.random_models import (comfy_model_from_diffusers, comfy_noise_prediction, comfy_vae_from_diffusers,
                                             random_comfy_clip, random_comfy_clip_vision)

from datencoder_core import DATEncoderError
from training.models.loading import SD15_CONFIG, load_reference_models, load_vision_tower
from training.models.reference import build_random_models, sd15_alphas_cumprod

# The tiny ViT of random_comfy_clip_vision (width 32, 2 layers of 2 heads, MLP 37) as an open_clip config.
TINY_VIT = {"embed_dim": 32, "vision_cfg": {"layers": 2, "width": 32, "head_width": 16, "mlp_ratio": 37 / 32,
                                            "patch_size": 14, "image_size": 224}}
# The tiny CLIP-L of random_comfy_clip, as a transformers config.
TINY_TEXT = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """ComfyUI's models (MODEL, CLIP, VAE, CLIP vision), the checkpoint and clip_vision files ComfyUI wrote
    from them, and a config folder of their shapes in the shipped folder's layout."""
    import_comfyui()
    import comfy.sd
    import comfy.utils

    folder = tmp_path_factory.mktemp("files")
    tiny = build_random_models("tiny", seed=0)
    with torch.inference_mode():
        patcher = comfy_model_from_diffusers(tiny.unet)
        clip = random_comfy_clip(seed=1)
        vae = comfy_vae_from_diffusers(tiny.vae)
        comfy.sd.save_checkpoint(str(folder / "tiny_sd15.safetensors"), patcher, clip, vae)
        writer = random_comfy_clip_vision(folder, seed=2)  # float16 weights, as ComfyUI keeps them on a CPU
        comfy.utils.save_torch_file(writer.get_sd(), str(folder / "tiny_vit.safetensors"))
    config = folder / "config"
    shutil.copytree(SD15_CONFIG, config)
    tiny.unet.save_config(config / "unet")
    tiny.vae.save_config(config / "vae")
    text = json.loads((config / "text_encoder" / "config.json").read_text())
    (config / "text_encoder" / "config.json").write_text(json.dumps({**text, **TINY_TEXT}))
    return {"folder": folder, "patcher": patcher, "clip": clip, "vae": vae, "config": config,
            "checkpoint": folder / "tiny_sd15.safetensors", "vit": folder / "tiny_vit.safetensors",
            "vit_json": folder / "clip_vision_tiny.json"}


@pytest.fixture(scope="module")
def loaded(files):
    return load_reference_models(files["checkpoint"], files["vit"], config=files["config"], vision_model=TINY_VIT)


def test_the_files_have_the_layouts_users_have(files):
    """The checkpoint is in the original LDM layout, the clip_vision file in transformers' keys."""
    from safetensors import safe_open

    with safe_open(str(files["checkpoint"]), "pt") as f:
        keys = set(f.keys())
    assert {"model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.encoder.conv_in.weight",
            "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"} <= keys
    with safe_open(str(files["vit"]), "pt") as f:
        assert "vision_model.encoder.layers.1.self_attn.q_proj.weight" in f.keys()


def test_features_equal_personalize_concepts(files, loaded, cat_image):
    """CLIP tokens (before the final LayerNorm) and UNet mid-block features from the loaded files equal
    the ComfyUI backend's (Personalize Concept's ``image_features``), on ComfyUI's CLIP vision model
    reading the same clip_vision file, for the same image, latent and timestep; so do the VAE latents.
    Tolerance 1e-4 relative to the largest value (float32 on both sides, float16 weights). A wrong key
    map (e.g. k and v swapped in ``in_proj``) or the tokens after ``ln_post`` fail this (checked by hand)."""
    import comfy.clip_vision
    import comfy.utils

    comfy_vision = comfy.clip_vision.ClipVisionModel(str(files["vit_json"]))
    missing, unexpected = comfy_vision.load_sd(comfy.utils.load_torch_file(str(files["vit"])))
    assert not missing and not unexpected
    with torch.inference_mode(False):
        comfy = pack_module("nodes.backend").ComfyUIBackend(files["patcher"], files["clip"], files["vae"],
                                                            comfy_vision)
    reference = loaded.backend()
    try:
        noisy, t = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(4)), torch.tensor([500])
        with torch.no_grad():
            theirs = comfy.image_features(cat_image, noisy, t)
            ours = reference.image_features(cat_image, noisy, t)
            latents = (comfy.encode_latents(cat_image), reference.encode_latents(cat_image))
    finally:
        reference.remove()
    assert ours[0].shape == (1, 1 + 16 * 16, 32) and ours[1].shape == (1, 64, 8, 8)
    for mine, comfys in (*zip(ours, theirs), latents[::-1]):
        torch.testing.assert_close(mine, comfys, rtol=0, atol=1e-4 * comfys.abs().max().item())


def test_noise_prediction_equals_comfyuis(files, loaded, cat_image):
    """The loaded UNet's eps equals ComfyUI's for the same latents, timesteps and context (through
    ComfyUI's sampling path), and the loaded text encoder gives ComfyUI's context. Tolerance 1e-4 of the
    largest value; a UNet loaded with a wrong layer order fails it."""
    g = torch.Generator().manual_seed(5)
    latents, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([100, 700])
    tokens = loaded.tokenizer("a photo of a cat", padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        context = loaded.text_encoder(tokens.input_ids).last_hidden_state
        comfy_context = files["clip"].encode_from_tokens(files["clip"].tokenize("a photo of a cat"))
        ours = loaded.unet(latents, t, encoder_hidden_states=context.expand(2, -1, -1)).sample
        [theirs] = comfy_noise_prediction(files["patcher"], [[[comfy_context, {}]]], latents, t)
    torch.testing.assert_close(context, comfy_context, rtol=0, atol=1e-4 * comfy_context.abs().max().item())
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4 * theirs.abs().max().item())
    assert ours.abs().max() > 0.1


def test_reference_models_are_sized_from_the_files(loaded):
    assert loaded.image_size == 512
    assert (loaded.encoder_config.clip_dim, loaded.encoder_config.unet_dim, loaded.encoder_config.token_dim) == (
        32, 64, 32)
    torch.testing.assert_close(loaded.alphas_cumprod, sd15_alphas_cumprod(), rtol=0, atol=0)
    assert len(loaded.tokenizer) == 49408 and loaded.tokenizer("a cat").input_ids == [49406, 320, 2368, 49407]


def test_a_diffusers_folder_round_trip(files, loaded, tmp_path):
    """A diffusers folder (``save_pretrained``) loads to the same weights as the single file."""
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline(loaded.vae, loaded.text_encoder, loaded.tokenizer, loaded.unet,
                            _ddpm(files["config"]), None, None, requires_safety_checker=False
                            ).save_pretrained(tmp_path / "pipeline")
    again = load_reference_models(tmp_path / "pipeline", files["vit"], config=files["config"], vision_model=TINY_VIT)
    for name in ("unet", "vae", "text_encoder", "vision_tower"):
        theirs, ours = getattr(loaded, name).state_dict(), getattr(again, name).state_dict()
        assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs), name
    assert again.tokenizer.get_vocab() == loaded.tokenizer.get_vocab()


def _ddpm(config):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_pretrained(config / "scheduler")


def test_a_full_size_vit_h_14_file_loads_with_the_shipped_config(tmp_path, cat_image):
    """The user's path: a ViT-H-14 clip_vision file (ComfyUI's layout, float16) loads with the default
    ``vision_model`` (open_clip's ViT-H-14: 16 heads of 80) and gives the tokens ComfyUI's own loader
    (``comfy.clip_vision.load``) gives for the same file. Tolerance 1e-4 of the largest value; about 30 s
    and 6 GB on a CPU."""
    import_comfyui()
    import comfy.clip_vision
    import comfy.utils

    with torch.inference_mode():
        writer = comfy.clip_vision.ClipVisionModel(str(comfyui_path() / "comfy" / "clip_vision_config_h.json"))
        seeded_random_init(writer.model, 3)
        comfy.utils.save_torch_file(writer.get_sd(), str(tmp_path / "vit_h14.safetensors"))
    del writer
    tower = load_vision_tower(tmp_path / "vit_h14.safetensors")
    with torch.no_grad():
        ours = pack_module("datencoder_core.reference").open_clip_tokens(tower, cat_image)
    del tower
    with torch.no_grad():
        theirs = comfy.clip_vision.load(str(tmp_path / "vit_h14.safetensors")).encode_image(cat_image)[
            "last_hidden_state"]
    assert ours.shape == (1, 1 + 16 * 16, 1280)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4 * theirs.abs().max().item())


def _checkpoint(path, **tensors):
    save_file({key: torch.zeros(shape) for key, shape in tensors.items()}, str(path))
    return path


UNET = "model.diffusion_model."
SD1_KEYS = {f"{UNET}input_blocks.0.0.weight": (320, 4, 3, 3),
            f"{UNET}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
            "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (4, 768)}


@pytest.mark.parametrize("name, tensors, found", [
    ("sdxl.safetensors", {**SD1_KEYS, "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (768,)},
     "an SDXL checkpoint"),
    ("sd21.safetensors", {**SD1_KEYS, f"{UNET}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024)},
     "text context width 1024"),
    ("inpainting.safetensors", {**SD1_KEYS, f"{UNET}input_blocks.0.0.weight": (320, 9, 3, 3)}, "9 input channels"),
    ("lora.safetensors", {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320)},
     "no SD1.x UNet weights"),
])
def test_a_checkpoint_that_is_not_sd1_is_refused_by_name(tmp_path, files, name, tensors, found):
    path = _checkpoint(tmp_path / name, **tensors)
    with pytest.raises(DATEncoderError) as error:
        load_reference_models(path, files["vit"])
    assert str(path) in str(error.value) and found in str(error.value) and "expected an SD1.x model" in str(
        error.value)


def test_files_that_are_not_checkpoints_are_refused_by_name(tmp_path, files):
    garbage = tmp_path / "notes.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    pickle = tmp_path / "v1-5-pruned-emaonly.ckpt"
    pickle.write_bytes(b"PK")
    sdxl_folder = tmp_path / "sdxl"
    sdxl_folder.mkdir()
    (sdxl_folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    for path, found in ((garbage, "not safetensors"), (pickle, "a .ckpt file"),
                        (sdxl_folder, "a StableDiffusionXLPipeline folder"),
                        (tmp_path, "without model_index.json")):
        with pytest.raises(DATEncoderError, match="expected an SD1.x model") as error:
            load_reference_models(path, files["vit"])
        assert str(path) in str(error.value) and found in str(error.value), str(error.value)


def test_missing_files_are_named_before_anything_loads(tmp_path, files):
    with pytest.raises(DATEncoderError, match=f"{tmp_path / 'absent.safetensors'} does not exist: expected the SD1"):
        load_reference_models(tmp_path / "absent.safetensors", files["vit"])
    with pytest.raises(DATEncoderError, match=f"{tmp_path / 'absent_vit.safetensors'} does not exist: expected the "
                                              f"CLIP ViT-H-14"):
        load_reference_models(files["checkpoint"], tmp_path / "absent_vit.safetensors")


def test_a_wrong_clip_vision_file_is_refused_by_name(tmp_path, files):
    """A smaller ViT (the tiny file against ViT-H-14), a file of other keys (the SD checkpoint) and garbage."""
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    for path, found in ((files["vit"], "found another model"), (files["checkpoint"], "found no CLIP vision keys"),
                        (garbage, "not safetensors")):
        with pytest.raises(DATEncoderError, match="expected a CLIP vision model with 32 layers of width 1280") as error:
            load_vision_tower(path)
        assert str(path) in str(error.value) and found in str(error.value), str(error.value)
    with pytest.raises(DATEncoderError) as error:
        load_vision_tower(files["vit"])
    assert "class_embedding has shape (32,), expected (1280,)" in str(error.value)


def test_loading_imports_neither_comfyui_nor_the_nodes():
    import subprocess
    import sys

    code = ("import sys, training.models.loading; bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "{'comfy', 'nodes', 'datencoder_pack'}); print(bad); sys.exit(bool(bad))")
    result = subprocess.run([sys.executable, "-c", code], cwd=SD15_CONFIG.parents[3], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_shipped_configs_are_sd15s():
    """The shipped configs are what diffusers derives from SD1's original ``v1-inference.yaml`` (UNet, VAE,
    the training schedule), ComfyUI's SD1 CLIP-L config (text encoder) and its tokenizer files (as ComfyUI
    ships them, byte for byte)."""
    import yaml
    from diffusers.loaders.single_file_utils import (create_unet_diffusers_config_from_ldm,
                                                     create_vae_diffusers_config_from_ldm)

    original = yaml.safe_load((comfyui_path() / "models" / "configs" / "v1-inference.yaml").read_text())
    for name, derived in (("unet", create_unet_diffusers_config_from_ldm(original, {})),
                          ("vae", create_vae_diffusers_config_from_ldm(original, {}))):
        shipped = json.loads((SD15_CONFIG / name / "config.json").read_text())
        assert {key: shipped.get(key) for key in derived} == json.loads(json.dumps(derived)), name
    schedule = original["model"]["params"]
    scheduler = json.loads((SD15_CONFIG / "scheduler" / "scheduler_config.json").read_text())
    assert (scheduler["beta_start"], scheduler["beta_end"], scheduler["num_train_timesteps"]) == (
        schedule["linear_start"], schedule["linear_end"], schedule["timesteps"])
    comfy_text = json.loads((comfyui_path() / "comfy" / "sd1_clip_config.json").read_text())
    text = json.loads((SD15_CONFIG / "text_encoder" / "config.json").read_text())
    shared = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "hidden_act",
              "max_position_embeddings", "vocab_size", "layer_norm_eps")  # its token ids are legacy (bos 0)
    assert {key: text[key] for key in shared} == {key: comfy_text[key] for key in shared}
    for name in ("vocab.json", "merges.txt"):
        assert (SD15_CONFIG / "tokenizer" / name).read_bytes() == (
            comfyui_path() / "comfy" / "sd1_tokenizer" / name).read_bytes()


def test_open_clip_and_transformers_files_give_the_same_tower(tmp_path):
    """An open_clip file (``visual.*``) loads as is, and its transformers-keyed twin, made by ComfyUI's own
    converter (``comfy.clip_vision.convert_to_transformers``, the reverse of our key map), loads to exactly
    the same weights. A wrong entry in our map (q/k/v order, a transposed projection) fails it."""
    import_comfyui()
    import comfy.clip_vision
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    torch.manual_seed(6)
    original = _build_vision_tower(TINY_VIT["embed_dim"], CLIPVisionCfg(**TINY_VIT["vision_cfg"]))
    state = {f"visual.{key}": value.clone() for key, value in original.state_dict().items()}
    save_file(state, str(tmp_path / "open_clip_model.safetensors"))
    transformers_state = comfy.clip_vision.convert_to_transformers(dict(state), "visual.")
    save_file({k: v.contiguous() for k, v in transformers_state.items()}, str(tmp_path / "clip_vision.safetensors"))
    for name in ("open_clip_model.safetensors", "clip_vision.safetensors"):
        loaded = load_vision_tower(tmp_path / name, vision_model=TINY_VIT).state_dict()
        assert loaded.keys() == original.state_dict().keys(), name
        assert all(torch.equal(loaded[k], v) for k, v in original.state_dict().items()), name


def test_every_command_takes_the_same_dtype_names():
    """One table: ``--dtype bf16`` and ``--dtype bfloat16`` work in every command that has ``--dtype``."""
    import subprocess
    import sys

    from training.models.loading import DTYPES

    assert {DTYPES[a] for a in ("bf16", "bfloat16")} == {torch.bfloat16}
    for command in ("training.evaluate", "training.cache_latents", "benchmarks.personalize"):
        help_text = subprocess.run([sys.executable, "-m", command, "--help"], cwd=SD15_CONFIG.parents[3],
                                   capture_output=True, text=True, check=True).stdout
        assert "bf16" in help_text and "bfloat16" in help_text, command


def test_the_tiny_preset_refuses_model_files(tmp_path):
    from training.models.loading import load_models

    with pytest.raises(DATEncoderError, match="drop --base/--clip-vision"):
        load_models(tmp_path / "sd15.safetensors", None, tiny=True)
