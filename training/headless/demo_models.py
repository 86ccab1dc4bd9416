"""The demo model set: random weights in the files ComfyUI's own loaders read, made once and cached.

``make demo`` without your model files runs the example workflow on these, so it needs no download:
* ``checkpoints/datencoder_demo_sd15.safetensors``: an SD1.5 single-file checkpoint that Load Checkpoint
  detects as SD1.5. Detection fixes the UNet width (320) and context (768), the full CLIP-L text encoder
  and the full SD VAE (ComfyUI before 0.30 builds the standard decoder whatever width the file holds);
  the UNet is cut down so it runs on a CPU: one res block per level, channel_mult (1, 1, 1, 1), attention
  at levels 1 and 2 and in the middle block (7 transformer blocks, 42 LoRA sites).
* ``clip_vision/datencoder_demo_vit_h14.safetensors``: a full-size ViT-H-14 (Load CLIP Vision chooses its
  config by layer count), float16, 1.2 GB.
* ``datencoder/datencoder_demo.safetensors``: a DATEncoder for that checkpoint, its metadata flagged
  ``DEMO_FLAG`` so that Personalize Concept can say its nearest word is no result (with random weights
  every photo gets the same word).
The weights are random: the demo shows the pipeline and its cost, not a likeness.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from datencoder_core.checkpoint import DEMO_KEY
from training.headless.comfyui import comfyui_path, import_comfyui, pack_module, seeded_random_init

VERSION = 3  # bump when the files change, so caches are rebuilt (2: the standard-width VAE decoder; 3: DEMO_FLAG)
CHECKPOINT = "datencoder_demo_sd15.safetensors"
CLIP_VISION = "datencoder_demo_vit_h14.safetensors"
ENCODER = "datencoder_demo.safetensors"
DEMO_FLAG = {DEMO_KEY: "random weights"}  # in the demo files' safetensors metadata
FILES = {"checkpoints": CHECKPOINT, "clip_vision": CLIP_VISION, "datencoder": ENCODER}

UNET_CONFIG = {
    "model_channels": 320, "context_dim": 768, "in_channels": 4, "out_channels": 4, "channel_mult": [1, 1, 1, 1],
    "num_res_blocks": [1, 1, 1, 1], "transformer_depth": [0, 1, 1, 0], "transformer_depth_middle": 1,
    "transformer_depth_output": [0, 0, 1, 1, 1, 1, 0, 0], "use_linear_in_transformer": False,
    "adm_in_channels": None, "use_spatial_transformer": True, "legacy": False, "use_checkpoint": False,
    "use_temporal_resblock": False, "use_temporal_attention": False, "image_size": 32,
}
VAE_CONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
              "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


def ensure_demo_models(cache_dir: Path) -> Path:
    """The ``models/``-style folder of the demo set under ``cache_dir``, written on first use."""
    folder = Path(cache_dir) / f"demo-models-v{VERSION}"
    if not (folder / "complete").is_file():
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        write_demo_models(partial)
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)
        (folder / "complete").touch()
    return folder


def write_demo_models(folder: Path, seed: int = 0) -> None:
    """Write the three demo files into ``folder/{checkpoints,clip_vision,datencoder}/``."""
    import_comfyui()
    import comfy.clip_vision
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    import comfy.utils
    from comfy.ldm.models.autoencoder import AutoencoderKL

    core = pack_module("datencoder_core")
    patching = pack_module("nodes.patching")
    for sub in FILES:
        (folder / sub).mkdir(parents=True, exist_ok=True)

    model_config = comfy.supported_models.SD15(dict(UNET_CONFIG))
    model = model_config.get_model({})
    seeded_random_init(model.diffusion_model, seed)
    model.diffusion_model.half()  # all three files are float16, like the usual downloads
    cpu = torch.device("cpu")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
    clip = comfy.sd.CLIP(model_config.clip_target(), model_options={"dtype": torch.float16})
    seeded_random_init(clip.cond_stage_model, seed + 1)
    vae_model = AutoencoderKL(ddconfig=VAE_CONFIG, embed_dim=4)
    seeded_random_init(vae_model, seed + 2)
    vae = comfy.sd.VAE(sd=vae_model.half().state_dict())  # ComfyUI's own VAE detection must accept it
    comfy.sd.save_checkpoint(str(folder / "checkpoints" / CHECKPOINT), patcher, clip, vae,
                             metadata=dict(DEMO_FLAG))

    clip_vision = comfy.clip_vision.ClipVisionModel(str(comfyui_path() / "comfy" / "clip_vision_config_h.json"))
    seeded_random_init(clip_vision.model, seed + 3)
    comfy.utils.save_torch_file({k: v.half() for k, v in clip_vision.get_sd().items()},
                                str(folder / "clip_vision" / CLIP_VISION))

    sites, _ = patching.comfy_sites(patcher)
    torch.manual_seed(seed + 4)
    encoder = core.DATEncoder(core.EncoderConfig(unet_dim=UNET_CONFIG["model_channels"]), core.LoRAConfig(), sites)
    core.save_encoder(encoder, folder / "datencoder" / ENCODER, name="datencoder-demo-random",
                      extra_metadata=dict(DEMO_FLAG))
