"""The two costs of the ComfyUI integration, as ratios (robust on a noisy machine):

1. sampling: seconds per KSampler step (euler, CFG 5, batch 1) of the Dual-Path Model Patch over the
   unpatched model, same graph, same run;
2. personalization memory: the peak of the memory Personalize Concept allocates beyond the models
   ComfyUI already holds, over the UNet's weight bytes (a second copy of the UNet alone would be 1.0).
   On CUDA the allocator's peak; on CPU the peak of live tensor bytes (``LiveTensorBytes``) and the
   process's peak RSS growth.

    python -m benchmarks.comfyui                     # tiny shapes on CPU, or SD1.5 shapes on CUDA
    python -m benchmarks.comfyui --shapes sd15 --batch 4

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
from training.headless.comfyui import import_comfyui, pack_module
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


def main(argv: list[str] | None = None) -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", choices=("tiny", "sd15"), default="sd15" if cuda else "tiny")
    parser.add_argument("--batch", type=int, default=4, help="timesteps per tuning step")
    parser.add_argument("--steps", type=int, default=12, help="tuning steps")
    parser.add_argument("--sampling-steps", type=int, default=10)
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


if __name__ == "__main__":
    main()
