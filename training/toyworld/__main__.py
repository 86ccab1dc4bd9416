"""``python -m training.toyworld --output DIR [--reduced] [--cache DIR] [--jobs N]``

Builds (or reuses from the cache) the toy world and its models, pretrains the DATEncoder on it with
``training.pretrain`` and scores held-out concepts with ``training.evaluate``, then writes
``DIR/report.md`` with the table of the paper's four claims. ``--reduced`` is the smaller world and
experiment of the test (tests/test_toyworld.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import torch

from datencoder_core import DATEncoderError
from training.toyworld import build, experiment
from training.toyworld.claims import measure_claims
from training.toyworld.report import write_report

log = logging.getLogger("datencoder.toyworld")


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m training.toyworld", description=__doc__.split("\n")[2])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--reduced", action="store_true", help="the test's smaller world and experiment")
    parser.add_argument("--cache", type=Path, default=build.DEFAULT_CACHE, help="where worlds are built once")
    parser.add_argument("--jobs", type=int, default=2,
                        help="CPU cores to use: the world's build runs this many torch threads, then up to this many "
                             "pretrainings and evaluations run at once, one thread each (default 2; 1 on a machine "
                             "busy with other work)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    torch.set_num_threads(args.jobs)
    world_plan, plan = ((build.REDUCED, experiment.REDUCED_EXPERIMENT) if args.reduced
                        else (build.FULL, experiment.FULL_EXPERIMENT))
    args.output.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    world = build.world_folder(world_plan, args.cache)
    seconds = {"world (build or reuse)": time.perf_counter() - start}
    start = time.perf_counter()
    results = experiment.run(world, args.output, plan, args.jobs)
    seconds["pretrain + evaluate"] = time.perf_counter() - start
    class_words = {p.name: json.loads((p / "concept.json").read_text())["class"]
                   for p in (world / "concepts").iterdir() if p.is_dir()}
    claims = measure_claims(results, class_words, plan.scratch_steps)
    plan_text = (f"World plan: `{json.dumps(dataclasses.asdict(world_plan))}`.\n\n"
                 f"Experiment plan: `{json.dumps(dataclasses.asdict(plan))}`.")
    report = write_report(args.output, world, claims, results, seconds, plan_text)
    log.info("wrote %s", report)
    return report


if __name__ == "__main__":
    try:
        main()
    except DATEncoderError as error:
        sys.exit(f"error: {error}")
