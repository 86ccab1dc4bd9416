"""Pretraining throughput and peak memory per GPU: images/s of full training steps, per batch size.

    python -m benchmarks.pretrain                       # tiny shapes on CPU (or SD1.5 shapes, bf16, on CUDA)
    python -m benchmarks.pretrain --shapes sd15 --device cuda --batch 8 16 32 --checkpointing both

Random weights at the chosen shapes ("sd15": SD1.5 UNet/VAE/text encoder + ViT-H-14 at 512 px, the
default encoder). A step is exactly the training loop's (``training.pretrain.objective`` forward, backward,
gradient clipping, AdamW) on one process, under the run's mixed precision (frozen models cast to bf16,
encoder fp32 under autocast). The images are random pixels made on the device, so the figure is the
compute side alone: the data-loading share of a real run is logged by the run itself
(``train/data_share``). Each configuration runs ``--warmup`` steps, then ``--steps`` timed steps.
The aim (issue 10): >= 60 images/s on one H100 at batch 32, so that 150,000 steps at global batch
128 take under a day on one 8-GPU machine.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
from accelerate import Accelerator

from benchmarks.measure import Measure
from datencoder_core.encoder import DATEncoder
from training.models.reference import build_random_models
from training.pretrain.config import PRESETS, PretrainConfig
from training.pretrain.objective import PretrainingObjective


def benchmark_config(shapes: str, batch: int, mixed_precision: str, checkpointing: bool) -> PretrainConfig:
    """The preset the shapes belong to (``default`` for SD1.5, ``tiny``), at this batch and precision."""
    preset = PRESETS["tiny" if shapes == "tiny" else "default"]
    training = dataclasses.replace(preset.training, batch_size=batch, mixed_precision=mixed_precision,
                                   gradient_checkpointing=checkpointing)
    return dataclasses.replace(preset, training=training)


def time_steps(accelerator: Accelerator, models, config: PretrainConfig, warmup: int, steps: int) -> tuple[float, int]:
    """Seconds for ``steps`` training steps after ``warmup`` untimed ones, and the peak bytes of the timed ones."""
    training = config.training
    backend = models.backend(config.lora)
    if training.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
    else:
        models.unet.disable_gradient_checkpointing()
    torch.manual_seed(0)
    encoder = DATEncoder(config.encoder, config.lora, backend.sites).to(accelerator.device)
    trainable = [p for p in encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=training.lr, weight_decay=training.weight_decay)
    encoder, optimizer = accelerator.prepare(encoder, optimizer)
    objective = PretrainingObjective(backend, config)
    size, batch = models.image_size, training.batch_size

    def step(k: int) -> None:
        images = torch.rand(batch, size, size, 3, device=accelerator.device)
        positions = torch.arange(k * batch, (k + 1) * batch)
        with accelerator.autocast():
            out = objective(encoder, images, positions, accelerator.gather, 0, 1)
        accelerator.backward(out.objective)
        accelerator.clip_grad_norm_(trainable, training.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for k in range(warmup):
        step(k)
    with Measure(accelerator.device) as measured:
        for k in range(warmup, warmup + steps):
            step(k)
    return measured.seconds, measured.peak_bytes


def main(argv: list[str] | None = None) -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", choices=("tiny", "sd15"), default="sd15" if cuda else "tiny")
    parser.add_argument("--device", default="cuda" if cuda else "cpu", choices=("cuda", "cpu"))
    parser.add_argument("--mixed-precision", choices=("no", "bf16"), default="bf16" if cuda else "no")
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 16, 32] if cuda else [4, 8])
    parser.add_argument("--checkpointing", choices=("off", "on", "both"), default="both",
                        help="gradient checkpointing of the frozen UNet")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)

    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=args.device == "cpu")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as training.allow_tf32
    weight_dtype = torch.bfloat16 if args.mixed_precision == "bf16" else torch.float32
    models = build_random_models(args.shapes).to(accelerator.device, weight_dtype)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU x{torch.get_num_threads()}"
    print(f"shapes={args.shapes} ({models.image_size} px) device={args.device} ({device_name}) "
          f"mixed_precision={args.mixed_precision} steps={args.steps} (after {args.warmup}) torch={torch.__version__}")
    print(f"{'batch':>5} {'ckpt':>4} {'images/s':>9} {'s/step':>7} {'peak MiB':>9}  ({Measure(args.device).what})")
    for checkpointing in {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]:
        for batch in args.batch:
            config = benchmark_config(args.shapes, batch, args.mixed_precision, checkpointing)
            seconds, peak = time_steps(accelerator, models, config, args.warmup, args.steps)
            print(f"{batch:>5} {'on' if checkpointing else 'off':>4} {batch * args.steps / seconds:>9.2f} "
                  f"{seconds / args.steps:>7.3f} {peak / 2**20:>9.0f}", flush=True)
            accelerator.free_memory()


if __name__ == "__main__":
    main()
