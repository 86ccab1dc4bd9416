"""Time and peak memory of personalization: the encoder forward plus the tuning steps.

    python -m benchmarks.personalize                          # tiny shapes on CPU (or SD1.5 shapes on CUDA)
    python -m benchmarks.personalize --shapes sd15 --device cuda --dtype bfloat16 --batch 4

Random weights at the chosen shapes ("sd15": SD1.5 UNet/VAE/text encoder + ViT-H-14, 512 px). Each
configuration runs once to warm up, then ``--repeats`` times; the median is printed. "tuning" is the
steps alone (first step start to last step end), "total" adds VAE encoding, the two backbones and
the encoder forward.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from skimage import data

from benchmarks.measure import Measure
from datencoder_core import TuningConfig, personalize
from training.models.loading import DTYPES
from training.models.reference import build_random_models



def run_once(backend, encoder, image, config: TuningConfig, device: str) -> tuple[float, float, int]:
    marks: list[float] = []

    def interrupt():
        if not marks:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            marks.append(time.perf_counter())

    with Measure(device) as measured:
        personalize(backend, encoder, "bench", image, config, interrupt=interrupt)
    tuning = (measured.end - marks[0]) if marks else 0.0
    return measured.seconds, tuning, measured.peak_bytes


def main(argv: list[str] | None = None) -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", choices=("tiny", "sd15"), default="sd15" if cuda else "tiny")
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--batch", type=int, nargs="+", default=[4], help="timesteps per tuning step")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    models = build_random_models(args.shapes).to(args.device, DTYPES[args.dtype])
    encoder = models.random_encoder().to(args.device)
    backend = models.backend()
    image = torch.from_numpy(data.chelsea().astype(np.float32) / 255.0)[None]
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU x{torch.get_num_threads()}"
    print(f"shapes={args.shapes} device={args.device} ({device_name}) dtype={args.dtype} steps={args.steps} "
          f"torch={torch.__version__}")
    print(f"{'batch':>5} {'total s':>8} {'tuning s':>9} {'peak MiB':>9}  ({Measure(args.device).what})")
    for batch in args.batch:
        config = TuningConfig(steps=args.steps, timesteps_per_step=batch)
        run_once(backend, encoder, image, config, args.device)  # warm-up
        runs = [run_once(backend, encoder, image, config, args.device) for _ in range(args.repeats)]
        total, tuning = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
        peak = max(r[2] for r in runs) / 2**20
        print(f"{batch:>5} {total:>8.3f} {tuning:>9.3f} {peak:>9.0f}")


if __name__ == "__main__":
    main()
