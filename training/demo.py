"""Personalize one real photo through the core, with the diffusers reference backend.

    python -m training.demo                      # tiny random models, scikit-image's cat, seconds on a CPU
    python -m training.demo --sd15 DIR --clip-vision FILE --encoder FILE [--image PHOTO]

Prints the concept's nearest word, the time and the peak memory; writes the concept, its LoRA +
embedding export and a JSON report to ``output/demo/``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from datencoder_core import TuningConfig, load_encoder, personalize
from training.measure import Measure
from training.models import build_random_models, load_user_models

logger = logging.getLogger("datencoder.demo")


def load_image(path: str | None) -> torch.Tensor:
    """A photo as a ComfyUI IMAGE (1, H, W, 3) in [0, 1]; default: scikit-image's chelsea the cat."""
    if path is None:
        from skimage import data

        pixels = data.chelsea()
    else:
        pixels = np.asarray(Image.open(path).convert("RGB"))
    return torch.from_numpy(pixels.astype(np.float32) / 255.0)[None]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sd15", help="diffusers-format SD1.5 folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
    parser.add_argument("--clip-vision", help="open_clip ViT-H-14 checkpoint (open_clip_model.safetensors)")
    parser.add_argument("--encoder", help="DATEncoder weights (datencoder_sd15.safetensors)")
    parser.add_argument("--image", help="the concept photo (default: scikit-image's cat)")
    parser.add_argument("--steps", type=int, default=TuningConfig.steps)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default="output/demo")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if bool(args.sd15) != bool(args.clip_vision):
        parser.error("--sd15 and --clip-vision go together")
    models = load_user_models(args.sd15, args.clip_vision) if args.sd15 else build_random_models("tiny", args.seed)
    models.to(args.device)
    if args.encoder:
        encoder, encoder_id = load_encoder(args.encoder)
    else:
        if args.sd15:
            logger.warning("no --encoder given: using a random encoder, so the concept will not look like the photo")
        encoder, encoder_id = models.random_encoder(seed=args.seed), "random-init"
    encoder.to(args.device)
    backend = models.backend(encoder.lora_config)
    image = load_image(args.image)

    config = TuningConfig(steps=args.steps, seed=args.seed)
    progress = lambda step, total, loss: logger.info(f"  tuning step {step}/{total}  loss {loss:.4f}")  # noqa: E731
    with Measure(args.device) as measured:
        concept = personalize(backend, encoder, encoder_id, image, config, progress=progress)

    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    concept.save(output / "concept.safetensors")
    concept.export(output / "concept_lora.safetensors", output / "concept_embedding.safetensors")
    report = {
        "models": "user" if args.sd15 else "tiny random (built in code)",
        "encoder_id": encoder_id, "device": args.device, "steps": config.steps,
        "nearest_word": concept.token, "nearest_token_id": concept.token_id,
        "personalization_seconds": round(measured.seconds, 3),
        "peak_memory_mib": round(measured.peak_bytes / 2**20, 1), "peak_memory_kind": measured.what,
    }
    (output / "report.json").write_text(json.dumps(report, indent=2))
    logger.info(f"nearest word: {concept.token!r} (id {concept.token_id})")
    logger.info(f"personalization: {measured.seconds:.2f} s, {measured.what} {measured.peak_bytes / 2**20:.0f} MiB "
                f"on {args.device}")
    logger.info(f"wrote {output}/concept.safetensors, concept_lora.safetensors, concept_embedding.safetensors, "
                f"report.json")
    return report


if __name__ == "__main__":
    main()
