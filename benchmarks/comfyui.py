"""The two costs of the ComfyUI integration, as ratios (robust on a noisy machine):

1. sampling: seconds per KSampler step (euler, CFG 5, batch 1) of the Dual-Path Model Patch over the
   unpatched model, same graph, same run;
2. personalization memory: the peak of the memory Personalize Concept allocates beyond the models
   ComfyUI already holds, over the UNet's weight bytes (a second copy of the UNet alone would be 1.0).
   On CUDA the allocator's peak; on CPU the peak of live tensor bytes (``LiveTensorBytes``) and the
   process's peak RSS growth.
3. against ComfyUI's own LoRA trainer: Personalize Concept (no encoder)'s tuning beside TrainLoraNode
   (comfy_extras/nodes_train.py, rank 4, AdamW, its default gradient checkpointing), both on one photo at
   ``--train-size`` px and one random SD1.5 checkpoint file (SD1.5's UNet, CLIP-L and VAE at full size: a copy
   of the UNet is what the memory goal is about) loaded as Load Checkpoint loads it, float32, the same steps, one sample per step (ours at
   timesteps_per_step 1, theirs at batch 1), both given the photo's latents (VAE Encode not counted): median seconds per step (from ComfyUI's progress bar) and
   the peak memory each adds beyond the loaded models, as ratios ours / theirs.

    python -m benchmarks.comfyui                     # tiny shapes on CPU, or SD1.5 shapes on CUDA
    python -m benchmarks.comfyui --shapes sd15 --batch 4
    python -m benchmarks.comfyui --train-steps 0     # without the TrainLoraNode comparison

ComfyUI's own model classes with random weights (nothing is downloaded); ``COMFYUI_PATH`` is the
ComfyUI to run (``make`` sets it).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from skimage import data

from benchmarks.measure import LiveTensorBytes, Measure
from training.headless.comfyui import import_comfyui, pack_module, seeded_random_init
from training.headless.demo_models import VAE_CONFIG
from training.headless.random_models import (comfy_model_from_diffusers, comfy_vae_from_diffusers, random_comfy_clip,
                                             random_comfy_clip_vision)
from training.models.reference import build_random_models

def comfy_stack(shapes: str):
    """ComfyUI MODEL, CLIP, VAE, CLIP_VISION and DATENCODER at ``shapes``, created under inference mode as
    ComfyUI's loaders create them."""
    nodes = pack_module("nodes.nodes")
    core = pack_module("datencoder_core")
    models = build_random_models(shapes)
    full = shapes == "sd15"
    import comfy.model_management

    with torch.inference_mode():
        model = comfy_model_from_diffusers(models.unet, comfy.model_management.get_torch_device())
        clip = random_comfy_clip(full_size=full)
        clip_vision = random_comfy_clip_vision(Path(tempfile.mkdtemp()), full_size=full)
        vae = comfy_vae_from_diffusers(models.vae)
    sites, _ = pack_module("nodes.patching").comfy_sites(model)
    encoder = core.DATEncoder(core.EncoderConfig(**models.encoder_config.to_dict()), core.LoRAConfig(), sites).eval()
    return model, clip, vae, clip_vision, nodes.LoadedEncoder(encoder, "bench@random"), models.image_size


def sampling_ratio(model, clip, concept, steps: int, size: int) -> tuple[float, float]:
    """Median seconds per step, unpatched and with the Dual-Path Model Patch, in one KSampler graph (each
    sampled twice, alternating; the median is over all steps after each run's first)."""
    import comfy.sample
    import nodes as comfy_nodes

    nodes = pack_module("nodes.nodes")
    positive = nodes.DATEncoderApplyConceptToken.execute(clip, concept, "a photo of S* in the snow", "S*").result[0]
    (negative,) = comfy_nodes.CLIPTextEncode().encode(clip, "blurry")
    patched = nodes.DATEncoderDualPathPatch.execute(model, concept, 0.25, 1.0).result[0]
    latent = torch.zeros(1, 4, size // 8, size // 8)
    steps_seconds = {"plain": [], "dual path": []}
    for name, m in (("plain", model), ("dual path", patched)) * 2:
        marks = []

        def callback(step, x0, x, total, marks=marks):
            if x.is_cuda:
                torch.cuda.synchronize()
            marks.append(time.perf_counter())

        comfy.sample.sample(m, comfy.sample.prepare_noise(latent, 0), steps, 5.0, "euler", "normal", positive,
                            negative, latent, callback=callback, disable_pbar=True)
        steps_seconds[name] += [b - a for a, b in zip(marks, marks[1:])]
    return statistics.median(steps_seconds["plain"]), statistics.median(steps_seconds["dual path"])


# SD1.5's UNet, as ComfyUI's model detection describes it (comfy/model_detection.py, ``SD15``).
SD15_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "use_temporal_attention": False,
    "use_temporal_resblock": False,
}


def write_checkpoint(path: Path) -> None:
    """A random SD1.5 checkpoint file (float16, as downloads are): SD1.5's UNet, CLIP-L and VAE at full size.
    TrainLoraNode needs a model loaded from a file: in ComfyUI 0.30 it clones with ``force_deepcopy``, which
    reloads the file."""
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    from comfy.ldm.models.autoencoder import AutoencoderKL

    config = comfy.supported_models.SD15(dict(SD15_UNET_CONFIG))
    model = config.get_model({})
    seeded_random_init(model.diffusion_model, 0)
    cpu = torch.device("cpu")
    patcher = comfy.model_patcher.ModelPatcher(model.half(), load_device=cpu, offload_device=cpu)
    clip = comfy.sd.CLIP(config.clip_target(), model_options={"dtype": torch.float16})
    seeded_random_init(clip.cond_stage_model, 1)
    vae = AutoencoderKL(ddconfig=VAE_CONFIG, embed_dim=4)
    seeded_random_init(vae, 2)
    comfy.sd.save_checkpoint(str(path), patcher, clip, comfy.sd.VAE(sd=vae.half().state_dict()))


def versus_trainlora(steps: int, size: int) -> None:
    """Print Personalize Concept (no encoder) against TrainLoraNode: s/step and peak memory, ours / theirs."""
    import comfy.sd
    import comfy.utils
    import nodes as comfy_nodes
    from comfy_extras.nodes_train import TrainLoraNode
    import inspect

    nodes, core = pack_module("nodes.nodes"), pack_module("datencoder_core")
    backend_class = pack_module("nodes.backend").ComfyUIBackend
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "random_sd15.safetensors"
        write_checkpoint(path)
        with torch.inference_mode():
            model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(path), embedding_directory=None)[:3]
            photo = torch.from_numpy(data.chelsea().astype(np.float32) / 255.0)[None, :, 75:375]  # square
            image = torch.nn.functional.interpolate(photo.movedim(-1, 1), size=(size, size), mode="bicubic",
                                                    antialias=True).clamp(0, 1).movedim(1, -1)
            (latent,) = comfy_nodes.VAEEncode().encode(vae, image)
            (positive,) = comfy_nodes.CLIPTextEncode().encode(clip, "a photo of sks cat")
        device = model.load_device
        theirs = {"model": model, "latents": latent, "positive": positive, "batch_size": 1,
                  "grad_accumulation_steps": 1, "steps": steps, "learning_rate": 5e-4, "rank": 4,
                  "optimizer": "AdamW", "loss_function": "MSE", "seed": 0, "training_dtype": "fp32",
                  "lora_dtype": "fp32", "algorithm": "LoRA", "gradient_checkpointing": True,
                  "existing_lora": "[None]", "quantized_backward": False, "checkpoint_depth": 1,
                  "offloading": False, "bucket_mode": False, "bypass_mode": False}
        accepted = inspect.signature(TrainLoraNode.execute).parameters
        theirs = {k: [v] for k, v in theirs.items() if k in accepted}  # is_input_list: every input a list
        if "bucket_mode" not in accepted:  # 0.3.x: one latent dict never sets multi_res; two copies do
            theirs["latents"] = [latent, latent]

        with torch.inference_mode():
            latents = backend_class(model, clip, vae, image_size=size).encode_latents(image)

        def ours(n: int):  # Personalize Concept (no encoder) at 1e-3, timesteps_per_step 1, at ``size`` px
            config = core.TuningConfig(steps=n, lr=1e-3, alpha_blend=0.25, timesteps_per_step=1, seed=0)

            def make(progress, interrupt):
                backend = backend_class(model, clip, vae, image_size=size)
                backend.encode_latents = lambda images: latents.clone()  # as theirs, the photo encoded before
                return core.personalize_from_word(backend, "cat", core.LoRAConfig(), image, config, progress,
                                                  interrupt)
            return nodes.run_tuning(None, n, make)

        def run(name: str, work) -> tuple[float, int, int]:
            stamps: list[float] = []
            comfy.utils.set_progress_bar_global_hook(lambda *a, **k: stamps.append(time.perf_counter()))
            try:
                with torch.inference_mode(), Measure(device) as measured, LiveTensorBytes() as live:
                    work()
            finally:
                comfy.utils.set_progress_bar_global_hook(None)
            per_step = statistics.median(b - a for a, b in zip(stamps, stamps[1:]))  # steps 2.., warm
            print(f"  {name:<34} {per_step:8.2f} s/step  total {measured.seconds:6.1f} s  peak beyond the loaded "
                  f"models: RSS {(measured.peak_bytes - measured.start_bytes) / 2**20:6.0f} MiB, live tensors "
                  f"{live.peak_bytes / 2**20:6.0f} MiB")
            return per_step, measured.peak_bytes - measured.start_bytes, live.peak_bytes

        unet_bytes = sum(p.numel() * p.element_size() for p in model.model.diffusion_model.parameters())
        print(f"vs TrainLoraNode ({steps} steps, 1 sample per step, {size} px, fp32, UNet weights "
              f"{unet_bytes / 2**20:.0f} MiB, {model.model.diffusion_model.dtype}):")
        with torch.inference_mode():
            ours(1)  # warm-up: the models loaded where ComfyUI keeps them, as for theirs below
        mine = run("Personalize Concept (no encoder)", lambda: ours(steps))
        other = run("TrainLoraNode rank 4 (batch 1)", lambda: TrainLoraNode.execute(**theirs))
        print(f"  ours / theirs: s/step {mine[0] / other[0]:.2f}, peak RSS growth {mine[1] / other[1]:.2f}, "
              f"peak live tensors {mine[2] / other[2]:.2f}")


def main(argv: list[str] | None = None) -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", choices=("tiny", "sd15"), default="sd15" if cuda else "tiny")
    parser.add_argument("--batch", type=int, default=4, help="timesteps per tuning step")
    parser.add_argument("--steps", type=int, default=12, help="tuning steps")
    parser.add_argument("--sampling-steps", type=int, default=10)
    parser.add_argument("--train-steps", type=int, default=4,
                        help="steps of the comparison with TrainLoraNode (0 skips it; >= 3 for a median)")
    parser.add_argument("--train-size", type=int, default=256,
                        help="photo size (px) of that comparison; 512 is what the node runs (slow on a CPU)")
    args = parser.parse_args(argv)

    import_comfyui()
    with torch.inference_mode():
        model, clip, vae, clip_vision, encoder, image_size = comfy_stack(args.shapes)
    nodes = pack_module("nodes.nodes")
    device = model.load_device
    image = torch.from_numpy(data.chelsea().astype(np.float32) / 255.0)[None]
    unet_bytes = sum(p.numel() * p.element_size() for p in model.model.diffusion_model.parameters())
    name = torch.cuda.get_device_name() if cuda else f"CPU x{torch.get_num_threads()}"
    print(f"shapes={args.shapes} float32 device={device} ({name}) torch={torch.__version__} "
          f"UNet weights {unet_bytes / 2**20:.0f} MiB")

    def personalize():
        with torch.inference_mode():
            return nodes.DATEncoderPersonalize.execute(model, clip, vae, clip_vision, encoder, image, args.steps,
                                                       2e-3, 0.25, args.batch, 0).result[0]

    personalize()  # warm-up: everything loaded where ComfyUI keeps it
    with Measure(device) as measured, LiveTensorBytes() as live:
        concept = personalize()
    extra = measured.peak_bytes - measured.start_bytes
    print(f"personalization ({args.steps} steps x {args.batch} timesteps, 512 px as the node runs): "
          f"{measured.seconds:.2f} s; "
          f"peak memory beyond the loaded models / UNet bytes: {measured.what} {extra / unet_bytes:.3f} "
          f"({extra / 2**20:.0f} MiB), live tensors {live.peak_bytes / unet_bytes:.3f} "
          f"({live.peak_bytes / 2**20:.0f} MiB)")
    plain, dual = sampling_ratio(model, clip, concept, args.sampling_steps, image_size)
    print(f"sampling (euler, CFG 5, batch 1, {image_size} px): {plain * 1e3:.1f} ms/step plain, "
          f"{dual * 1e3:.1f} ms/step dual path: ratio {dual / plain:.2f}")
    if args.train_steps:
        versus_trainlora(args.train_steps, args.train_size)


if __name__ == "__main__":
    main()
