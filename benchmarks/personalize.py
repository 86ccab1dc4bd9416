"""Time and peak memory of personalization: the encoder forward plus the tuning steps, and beside it the
encoder-free path (``personalize_from_word``: v* from a word, dW = 0, the same tuning loop) at its default
steps; both loops cost the same per step, which the last line checks.

    python -m benchmarks.personalize                          # tiny shapes on CPU (or SD1.5 shapes on CUDA)
    python -m benchmarks.personalize --shapes sd15 --device cuda --dtype bfloat16 --batch 4
    python -m benchmarks.personalize --word-steps 0           # the encoder only

Random weights at the chosen shapes ("sd15": SD1.5 UNet/VAE/text encoder + ViT-H-14, 512 px). Each
configuration runs once to warm up, then ``--repeats`` times; the median is printed. "tuning" is the
steps alone (first step start to last step end), "total" adds VAE encoding, the two backbones and
the encoder forward. The encoder-free runs once after a 2-step warm-up (its 200 steps are the long part).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import numpy as np
import torch
from skimage import data

from benchmarks.measure import Measure
from datencoder_core import TuningConfig, personalize
from datencoder_core.config import WORD_START_TUNING
from datencoder_core.tuning import personalize_from_word
from training.models.loading import DTYPES
from training.models.reference import build_random_models


def run_once(backend, encoder, image, config: TuningConfig, device: str, word: str | None = None
             ) -> tuple[float, float, int]:
    """(total s, tuning s, peak bytes) of one personalization: with ``encoder``, or from ``word`` without it."""
    marks: list[float] = []

    def interrupt():
        if not marks:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            marks.append(time.perf_counter())

    with Measure(device) as measured:
        if word is None:
            personalize(backend, encoder, "bench", image, config, interrupt=interrupt)
        else:
            personalize_from_word(backend, word, encoder.lora_config, image, config, interrupt=interrupt)
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
    parser.add_argument("--word-steps", type=int, default=WORD_START_TUNING.steps,
                        help="steps of the encoder-free path (its default; 0 skips it)")
    parser.add_argument("--word", default="cat", help="the encoder-free path's start word (the photo is a cat)")
    args = parser.parse_args(argv)

    models = build_random_models(args.shapes).to(args.device, DTYPES[args.dtype])
    encoder = models.random_encoder().to(args.device)
    backend = models.backend()
    image = torch.from_numpy(data.chelsea().astype(np.float32) / 255.0)[None]
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU x{torch.get_num_threads()}"
    print(f"shapes={args.shapes} device={args.device} ({device_name}) dtype={args.dtype} steps={args.steps} "
          f"torch={torch.__version__}")
    print(f"{'path':<12} {'steps':>5} {'batch':>5} {'total s':>8} {'tuning s':>9} {'s/step':>7} {'peak MiB':>9}  "
          f"({Measure(args.device).what})")
    for batch in args.batch:
        config = TuningConfig(steps=args.steps, timesteps_per_step=batch)
        run_once(backend, encoder, image, config, args.device)  # warm-up
        runs = [run_once(backend, encoder, image, config, args.device) for _ in range(args.repeats)]
        total, tuning = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
        per_step = tuning / max(args.steps, 1)
        print(f"{'encoder':<12} {args.steps:>5} {batch:>5} {total:>8.3f} {tuning:>9.3f} {per_step:>7.3f} "
              f"{max(r[2] for r in runs) / 2**20:>9.0f}")
        if args.word_steps:
            word_config = replace(WORD_START_TUNING, steps=args.word_steps, timesteps_per_step=batch)
            run_once(backend, encoder, image, replace(word_config, steps=2), args.device, args.word)  # warm-up
            total, tuning, peak = run_once(backend, encoder, image, word_config, args.device, args.word)
            word_per_step = tuning / args.word_steps
            print(f"{'encoder-free':<12} {args.word_steps:>5} {batch:>5} {total:>8.3f} {tuning:>9.3f} "
                  f"{word_per_step:>7.3f} {peak / 2**20:>9.0f}  per step / encoder's: "
                  f"{word_per_step / per_step:.2f} (same loop: 1.0 within noise)")


if __name__ == "__main__":
    main()
