"""Load the model files users already have into ``training.models.reference.ReferenceModels``, offline.

* ``base``: an SD1.x single-file ``.safetensors`` checkpoint in the original LDM key layout
  (``v1-5-pruned-emaonly.safetensors``, what ComfyUI's ``models/checkpoints/`` holds), loaded with diffusers'
  ``StableDiffusionPipeline.from_single_file`` and the SD1.5 configs and CLIP tokenizer shipped in
  ``training/models/configs/sd15/`` (the tokenizer is OpenAI CLIP's, MIT, see its LICENSE); or a diffusers folder of
  an SD1.x pipeline (``model_index.json``), loaded with ``from_pretrained``. ``local_files_only`` and a local
  config folder: nothing is ever fetched from the hub.
* ``clip_vision``: CLIP ViT-H-14 as ComfyUI's clip_vision file (transformers ``CLIPVisionModelWithProjection``
  keys ``vision_model.*``: ``CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors``, the IP-Adapter file) or an
  open_clip checkpoint (``visual.*``), loaded into open_clip's ``VisionTransformer``.

The vision tower is open_clip's because the reference backend takes its tokens before ``ln_post`` with a
hook (the feature contract) and open_clip's own files then need no conversion. A transformers file maps onto
it one to one (q, k, v concatenated into ``in_proj``, the projection transposed), in the small table
below; open_clip has no such converter (its ``convert.py`` covers big_vision and MobileCLIP). The alternative,
transformers' model, would give the backend a second tower type and open_clip files a reverse map.

A base folder holding ``loader.json`` (``{"loader": "module:function"}``) names the function that loads it,
with ``load_reference_models``' contract: the toy world's ``sd/`` folder names
``training.toyworld.models.load_world_models`` (SD1.x's structure at the world's own widths). So this room
imports nothing of the rooms built on it.

Every wrong file raises ``DATEncoderError`` naming the file, what was expected and what was found; a
missing file is reported before anything loads.
"""

from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path

import open_clip
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline
from open_clip.model import CLIPVisionCfg, _build_vision_tower
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from datencoder_core import DATEncoderError, EncoderConfig
from training.models.reference import ReferenceModels, build_random_models

log = logging.getLogger(__name__)

SD15_CONFIG = Path(__file__).resolve().parent / "configs" / "sd15"
VIT_H_14 = open_clip.get_model_config("ViT-H-14")  # {"embed_dim": 1024, "vision_cfg": {...}}, ships with open_clip
IMAGE_SIZE = 512  # SD1.x's resolution, as Personalize Concept uses it
# The frozen models' dtypes, by the names every command's --dtype takes (torch's and accelerate's spellings).
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
LOADER_FILE = "loader.json"  # in a base folder that names its own loader (module docstring)

# Keys of an SD1.x LDM checkpoint: the first cross-attention's key projection (its input width is the text
# context width: 768 for SD1.x, 1024 for SD2.x), the first conv (4 input channels; 9 for inpainting) and
# the CLIP-L text encoder, in the layout diffusers' converter reads.
_CONTEXT_KEY = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
_CONV_IN_KEY = "model.diffusion_model.input_blocks.0.0.weight"
_TEXT_KEY = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"

# transformers CLIPVisionModelWithProjection -> open_clip VisionTransformer (q/k/v and the projection below).
_PREFIXES = {"vision_model.embeddings.class_embedding": "class_embedding",
             "vision_model.embeddings.patch_embedding.": "conv1.",
             "vision_model.embeddings.position_embedding.weight": "positional_embedding",
             "vision_model.pre_layrnorm.": "ln_pre.", "vision_model.post_layernorm.": "ln_post.",
             "vision_model.encoder.layers.": "transformer.resblocks."}
_LAYER_PARTS = {".layer_norm1.": ".ln_1.", ".layer_norm2.": ".ln_2.", ".self_attn.out_proj.": ".attn.out_proj.",
                ".mlp.fc1.": ".mlp.c_fc.", ".mlp.fc2.": ".mlp.c_proj."}


def load_models(base: Path | None, clip_vision: Path | None, *, tiny: bool, seed: int = 0,
                dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> ReferenceModels:
    """A command's frozen models: the tiny preset's, built in code with ``seed`` (``tiny``), or the user's files
    (``load_reference_models``)."""
    if tiny:
        if base or clip_vision:
            raise DATEncoderError("the tiny preset builds random models in code; drop --base/--clip-vision")
        return build_random_models("tiny", seed=seed).to(device, dtype)
    return load_reference_models(base, clip_vision, dtype=dtype, device=device)


def load_reference_models(base: Path, clip_vision: Path, *, dtype: torch.dtype = torch.float32,
                          device: str | torch.device = "cpu", config: Path = SD15_CONFIG,
                          vision_model: dict = VIT_H_14) -> ReferenceModels:
    """The frozen models of pretraining and evaluation from the user's files, in ``dtype`` on ``device``.

    ``base``: an SD1.x ``.safetensors`` checkpoint or diffusers folder; ``clip_vision``: a ViT-H-14
    clip_vision or open_clip ``.safetensors`` file (see the module docstring). ``config`` (a diffusers folder
    of configs and tokenizer) says how a single-file checkpoint is built and what an SD1.x model is (context
    width, input channels); ``vision_model`` (an open_clip model config) what the vision file must hold.
    Both default to the real shapes (SD1.5, ViT-H-14); tests pass tiny ones. The encoder config gets the
    loaded models' widths (CLIP tokens, UNet mid-block, text tokens) and otherwise the defaults.
    """
    base, clip_vision = Path(base), Path(clip_vision)
    if (base / LOADER_FILE).is_file():  # a folder that names its own loader (the toy world's)
        return _named_loader(base)(base, clip_vision, dtype=dtype, device=device)
    for path, what in ((base, "SD1.x checkpoint (.safetensors) or diffusers folder"),
                       (clip_vision, "CLIP ViT-H-14 clip_vision file (.safetensors)")):
        if not path.exists():
            raise DATEncoderError(f"{path} does not exist: expected the {what}")
    _check_sd1(base, config)
    tower = load_vision_tower(clip_vision, vision_model=vision_model).to(dtype)
    pipeline = _load_sd1(base, dtype, config)
    models = ReferenceModels(
        pipeline.unet.eval(), pipeline.vae.eval(), pipeline.text_encoder.eval(), pipeline.tokenizer, tower,
        DDPMScheduler.from_config(pipeline.scheduler.config).alphas_cumprod, IMAGE_SIZE,
        EncoderConfig(clip_dim=tower.transformer.width, unet_dim=pipeline.unet.config.block_out_channels[-1],
                      token_dim=pipeline.text_encoder.config.hidden_size))
    return models.to(device)  # the pipeline was loaded in dtype already


def _named_loader(base: Path):
    """The function ``base/loader.json`` names (``{"loader": "module:function"}``)."""
    path = base / LOADER_FILE
    try:
        module, _, name = json.loads(path.read_text())["loader"].partition(":")
        return getattr(importlib.import_module(module), name)
    except (ValueError, KeyError, TypeError, ImportError, AttributeError) as error:
        raise DATEncoderError(f"{path}: expected {{\"loader\": \"module:function\"}} naming an importable "
                              f"loader, got an error: {error!r}") from None


def _load_sd1(base: Path, dtype: torch.dtype, config: Path) -> StableDiffusionPipeline:
    """``base`` (checked by ``_check_sd1``) as a diffusers pipeline without safety checker, offline."""
    options = {"torch_dtype": dtype, "local_files_only": True, "safety_checker": None, "feature_extractor": None}
    try:
        if base.is_dir():
            return StableDiffusionPipeline.from_pretrained(base, **options)
        return StableDiffusionPipeline.from_single_file(str(base), config=str(config), **options)
    except (ValueError, RuntimeError, KeyError, OSError) as error:  # e.g. an SD1.x with another UNet structure
        raise DATEncoderError(f"{base}: could not be loaded as SD1.x with the configs in {config} "
                              f"(expected SD1.5's structure): {error}") from error


def _check_sd1(base: Path, config: Path) -> None:
    """Refuse, before loading weights, anything that is not an SD1.x model shaped as ``config`` says."""
    expected = json.loads((Path(config) / "unet" / "config.json").read_text())
    width, channels = expected["cross_attention_dim"], expected["in_channels"]
    wanted = (f"expected an SD1.x model (text context width {width}, {channels} latent channels), e.g. "
              f"v1-5-pruned-emaonly.safetensors or a diffusers StableDiffusionPipeline folder")
    if base.is_dir():
        found = _describe_folder(base, width, channels)
    elif base.suffix != ".safetensors":
        found = f"a {base.suffix or 'suffix-less'} file (only .safetensors checkpoints are read)"
    else:
        found = _describe_checkpoint(base, width, channels)
    if found:
        raise DATEncoderError(f"{base}: {wanted}; found {found}")


def _describe_folder(folder: Path, width: int, channels: int) -> str:
    """What is wrong with a diffusers folder for SD1.x, or ''."""
    index = folder / "model_index.json"
    if not index.is_file():
        return "a folder without model_index.json (not a diffusers pipeline folder)"
    pipeline = json.loads(index.read_text()).get("_class_name")
    if pipeline != "StableDiffusionPipeline":
        return f"a {pipeline} folder"
    unet = json.loads((folder / "unet" / "config.json").read_text())
    if (unet["cross_attention_dim"], unet["in_channels"]) != (width, channels):
        return f"a UNet with context width {unet['cross_attention_dim']} and {unet['in_channels']} input channels"
    prediction = json.loads((folder / "scheduler" / "scheduler_config.json").read_text()).get("prediction_type")
    if prediction not in (None, "epsilon"):
        return f"a {prediction} model (DATEncoder is trained on eps-prediction)"
    return ""


def _describe_checkpoint(path: Path, width: int, channels: int) -> str:
    """What is wrong with a single-file checkpoint for SD1.x, read from its safetensors header, or ''."""
    try:
        with safe_open(str(path), "pt") as file:
            shapes = {key: tuple(file.get_slice(key).get_shape()) for key in file.keys()}
    except (SafetensorError, OSError) as error:
        return f"a file that is not safetensors ({error})"
    if any(key.startswith("conditioner.embedders.") for key in shapes):
        return "an SDXL checkpoint (conditioner.embedders.*)"
    if _CONTEXT_KEY not in shapes or _CONV_IN_KEY not in shapes:
        examples = ", ".join(sorted(shapes)[:3])
        return f"no SD1.x UNet weights ({_CONTEXT_KEY} is missing; a LoRA, VAE or embedding file?), keys such as {examples}"
    if shapes[_CONTEXT_KEY][1] != width:
        return f"a UNet with text context width {shapes[_CONTEXT_KEY][1]} (SD2.x has 1024)"
    if shapes[_CONV_IN_KEY][1] != channels:
        return f"a UNet with {shapes[_CONV_IN_KEY][1]} input channels (an inpainting or instruct-pix2pix model)"
    if _TEXT_KEY not in shapes:
        return f"no CLIP-L text encoder at {_TEXT_KEY} (SD2.x keeps OpenCLIP at cond_stage_model.model.*)"
    return ""


def load_vision_tower(path: Path, *, vision_model: dict = VIT_H_14) -> nn.Module:
    """open_clip's ``VisionTransformer`` (float32, eval) built from ``vision_model`` and loaded strictly from
    ``path``: transformers keys (``vision_model.*``, ``visual_projection.weight``) or open_clip's (``visual.*``)."""
    path = Path(path)
    config = CLIPVisionCfg(**vision_model["vision_cfg"])
    with torch.device("meta"):  # shapes only: the weights come from the file (load_state_dict assign=True)
        tower = _build_vision_tower(vision_model["embed_dim"], config)
    wanted = (f"expected a CLIP vision model with {config.layers} layers of width {config.width} at "
              f"{config.image_size} px, patch {config.patch_size} (CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors: "
              f"ComfyUI's clip_vision format or open_clip's)")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise DATEncoderError(f"{path}: {wanted}; found a file that is not safetensors ({error})") from error
    if "vision_model.encoder.layers.0.layer_norm1.weight" in state:
        state = open_clip_state_from_transformers(state)
    elif "visual.transformer.resblocks.0.ln_1.weight" in state:
        state = {key[len("visual."):]: value for key, value in state.items() if key.startswith("visual.")}
    else:
        raise DATEncoderError(f"{path}: {wanted}; found no CLIP vision keys (vision_model.encoder.layers.* or "
                              f"visual.transformer.resblocks.*), keys such as {', '.join(sorted(state)[:3])}")
    expected = {key: tuple(value.shape) for key, value in tower.state_dict().items()}
    found = {key: tuple(value.shape) for key, value in state.items()}
    problems = [f"{key} has shape {found[key]}, expected {shape}" for key, shape in expected.items()
                if key in found and found[key] != shape]
    problems += [f"{key} is missing" for key in sorted(expected.keys() - found.keys())]
    problems += [f"{key} is unexpected" for key in sorted(found.keys() - expected.keys())]
    if problems:
        raise DATEncoderError(f"{path}: {wanted}; found another model ({len(problems)} differences in open_clip "
                              f"keys, e.g. {'; '.join(problems[:4])})")
    tower.load_state_dict(state, assign=True)
    log.info("loaded CLIP vision %s (%d layers, width %d)", path, config.layers, config.width)
    return tower.float().eval()


def open_clip_state_from_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers ``CLIPVisionModelWithProjection`` state dict in open_clip ``VisionTransformer`` keys:
    renamed one to one, per layer q, k, v concatenated into ``attn.in_proj_*``, ``proj`` = projection^T.
    Keys of neither kind pass through (the caller reports them)."""
    out = {}
    for key, value in state.items():
        if key == "vision_model.embeddings.position_ids":  # a buffer of old transformers files, not a weight
            continue
        if key == "visual_projection.weight":
            out["proj"] = value.t()
            continue
        for old, new in _PREFIXES.items():
            if key.startswith(old):
                key = new + key[len(old):]
                break
        for old, new in _LAYER_PARTS.items():
            key = key.replace(old, new)
        out[key] = value
    for key in [key for key in out if ".self_attn.q_proj." in key]:
        stem, kind = key.split(".self_attn.q_proj.")
        names = [f"{stem}.self_attn.{p}_proj.{kind}" for p in "qkv"]
        if all(name in out for name in names):
            out[f"{stem}.attn.in_proj_{kind}"] = torch.cat([out.pop(name) for name in names])
    return out


def load_vae(base: Path | None, *, tiny: bool, dtype: torch.dtype = torch.float32,
             device: str | torch.device = "cpu", config: Path = SD15_CONFIG):
    """(VAE, resolution) for ``training.cache_latents``: the tiny preset's (``tiny``, seed 0, as
    ``load_models``) or an SD1.x checkpoint's or diffusers folder's."""
    if tiny:
        models = load_models(base, None, tiny=True, dtype=dtype, device=device)
        return models.vae, models.image_size
    if base is None or not Path(base).exists():
        raise DATEncoderError(f"--base {base or '(missing)'}: no such file; pass the SD1.x checkpoint "
                              f"(.safetensors) or diffusers folder whose VAE training will use")
    _check_sd1(Path(base), config)
    return _load_sd1(Path(base), dtype, config).vae.eval().to(device), IMAGE_SIZE
