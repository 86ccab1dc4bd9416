"""Export a pretraining checkpoint as the file the DATEncoder Loader reads.

    python -m training.export DIR/checkpoints/step-0150000 models/datencoder/datencoder_sd15.safetensors

The checkpoint already holds that file (``encoder.safetensors``, with the run's config and step in its
metadata); this validates it and writes it to ``OUT`` atomically. ``python -m training.pretrain`` does
the same for its last step (``DIR/datencoder.safetensors``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from datencoder_core.errors import DATEncoderError
from training.pretrain.checkpoints import export_checkpoint


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m training.export", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", type=Path, help="DIR/checkpoints/step-XXXXXXX")
    parser.add_argument("out", type=Path, help="the .safetensors file to write")
    args = parser.parse_args(argv)
    encoder_id = export_checkpoint(args.checkpoint, args.out)
    print(f"{args.out}: {encoder_id}")
    return encoder_id


if __name__ == "__main__":
    try:
        main()
    except DATEncoderError as error:
        sys.exit(f"error: {error}")
