"""ComfyUI objects for in-process tests and benchmarks: ComfyUI's own SD1.x model, CLIP, CLIP vision and
VAE classes with random weights (small, or at the full shapes), or exactly the weights of a diffusers
reference model."""

import torch

from training.headless.comfyui import comfyui_path, import_comfyui, seeded_random_init


def comfy_model_from_diffusers(unet, load_device: torch.device = torch.device("cpu")):
    """A ComfyUI SD1.5 ``ModelPatcher`` with exactly the weights of a diffusers UNet, through ComfyUI's
    own key map and config detection (its checkpoint loader only accepts full-width SD1.5)."""
    import_comfyui()
    import comfy.model_detection
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.utils

    state = unet.state_dict()
    levels = len(unet.config.block_out_channels)
    layers = unet.config.layers_per_block
    has_attention = [t.startswith("CrossAttn") for t in unet.config.down_block_types]
    probe = {"num_res_blocks": [layers] * levels, "channel_mult": [1] * levels,
             "transformer_depth": [int(a) for a in has_attention for _ in range(layers)],
             "transformer_depth_output": [int(a) for a in has_attention for _ in range(layers + 1)],
             "transformer_depth_middle": 1}
    converted = {comfy_key: state[key] for key, comfy_key in comfy.utils.unet_to_diffusers(probe).items()
                 if key in state}
    config = comfy.supported_models.SD15(comfy.model_detection.detect_unet_config(converted, ""))
    model = config.get_model({})
    model.diffusion_model.load_state_dict(converted, strict=True)
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=torch.device("cpu"))


def random_comfy_clip(seed: int = 0, full_size: bool = False, embedding_directory=None):
    """ComfyUI's SD1 CLIP (its shipped tokenizer, 49,408 tokens) with a small random text model, or
    SD1.5's CLIP-L shapes with ``full_size``; prompts may name embeddings (``embedding:<name>``) in
    ``embedding_directory``, as the checkpoint loader's CLIP does with ``models/embeddings``."""
    import functools
    import json

    import_comfyui()
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base

    config = json.loads((comfyui_path() / "comfy" / "sd1_clip_config.json").read_text())
    if not full_size:
        config.update(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    small = functools.partial(comfy.sd1_clip.SDClipModel, textmodel_json_config=config, return_projected_pooled=False)
    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    clip = comfy.sd.CLIP(target, embedding_directory=embedding_directory,
                         model_options={"clip_l_class": small, "dtype": torch.float32})
    seeded_random_init(clip.cond_stage_model, seed)
    return clip


def random_comfy_clip_vision(tmp_path, seed: int = 0, full_size: bool = False):
    """ComfyUI's CLIP vision model (ViT-H-14 layout, 224 px, 16x16 patches) at width 32, or at
    ViT-H-14's shapes with ``full_size``, random weights."""
    import json

    import_comfyui()
    import comfy.clip_vision

    config = json.loads((comfyui_path() / "comfy" / "clip_vision_config_h.json").read_text())
    if not full_size:
        config.update(hidden_size=32, intermediate_size=37, num_attention_heads=2, num_hidden_layers=2,
                      projection_dim=32)
    path = tmp_path / "clip_vision_tiny.json"
    path.write_text(json.dumps(config))
    clip_vision = comfy.clip_vision.ClipVisionModel(str(path))
    seeded_random_init(clip_vision.model, seed)
    return clip_vision


def comfy_vae_from_diffusers(vae):
    """ComfyUI's VAE with exactly the weights of a diffusers ``AutoencoderKL`` (ComfyUI converts the
    keys; the shape config is given, since ComfyUI only detects full-size SD VAEs)."""
    import_comfyui()
    import comfy.sd

    channels = list(vae.config.block_out_channels)
    ddconfig = {"double_z": True, "z_channels": vae.config.latent_channels, "resolution": 256, "in_channels": 3,
                "out_ch": 3, "ch": channels[0], "ch_mult": [c // channels[0] for c in channels],
                "num_res_blocks": vae.config.layers_per_block, "attn_resolutions": [], "dropout": 0.0}
    return comfy.sd.VAE(sd=vae.state_dict(), config={"params": {"embed_dim": vae.config.latent_channels,
                                                                "ddconfig": ddconfig}})


def comfy_noise_prediction(patcher, conds, latents, timesteps):
    """eps of ``patcher`` for each conditioning in ``conds`` (ComfyUI CONDITIONING lists; the first is
    the positive, the second the negative), through ComfyUI's own sampling path: what
    ``CFGGuider.sample`` does before its sampler runs (wrappers into the model options,
    ``prepare_sampling``, ``process_conds``, ``calc_cond_batch``, batching included). For VP-scaled
    latents at integer timesteps, so it compares with a diffusers UNet."""
    import comfy.model_patcher
    import comfy.sampler_helpers
    import comfy.samplers

    sigma = patcher.model.model_sampling.sigmas[timesteps]
    x = latents * (sigma**2 + 1).sqrt()[:, None, None, None]
    names = ["positive", "negative", *(f"cond{i}" for i in range(2, len(conds)))]
    converted = {name: comfy.sampler_helpers.convert_cond(c) for name, c in zip(names, conds)}
    options = comfy.model_patcher.create_model_options_clone(patcher.model_options)
    comfy.sampler_helpers.prepare_model_patcher(patcher, converted, options)
    model, converted, loaded = comfy.sampler_helpers.prepare_sampling(patcher, x.shape, converted, options)
    patcher.pre_run()
    try:
        converted = comfy.samplers.process_conds(model, x, converted, x.device)
        outputs = comfy.samplers.calc_cond_batch(model, list(converted.values()), x, sigma, options)
    finally:
        patcher.cleanup()
        comfy.sampler_helpers.cleanup_models(converted, loaded)
    return [(x - out) / sigma[:, None, None, None] for out in outputs]
