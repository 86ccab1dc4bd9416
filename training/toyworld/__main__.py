"""``python -m training.toyworld --output DIR [--rebuild | --reduced] [--cache DIR] [--jobs N]``

Scores held-out concepts of the toy world with ``training.evaluate``, with the world's models and pretrained
encoders the repository ships (``training/toyworld/shipped/``), then writes ``DIR/report.md`` with the world's
ceilings and the table of the paper's claims. ``--rebuild`` first trains them again (the world's models, then
the encoders with ``training.pretrain``) and ships them; ``--reduced`` is the smaller world and experiment of
the test (tests/test_toyworld.py), built and pretrained in the cache, never shipped.
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
from training.toyworld import build, experiment, shipped
from training.toyworld.checks import failed_ceilings
from training.toyworld.claims import measure_claims
from training.toyworld.report import write_report

log = logging.getLogger("datencoder.toyworld")


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m training.toyworld", description=__doc__.split("\n")[2])
    parser.add_argument("--output", type=Path, required=True)
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--rebuild", action="store_true",
                       help="train the world's models and encoders again and ship them (training/toyworld/shipped/)")
    modes.add_argument("--reduced", action="store_true", help="the test's smaller world and experiment")
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
    if args.rebuild or args.reduced:
        world = build.world_folder(world_plan, args.cache)
        seconds = {"world (build or reuse)": time.perf_counter() - start}
        start = time.perf_counter()
        encoders = experiment.pretrain_all(world, args.output, plan, args.jobs)
        seconds["pretrain"] = time.perf_counter() - start
        if args.rebuild:
            manifest = {"command": "python -m training.toyworld --rebuild --output DIR",
                        "experiment_plan": dataclasses.asdict(plan),
                        "build": json.loads((world / "build.json").read_text()), "pretrain_seconds": seconds["pretrain"]}
            shipped.ship(world, encoders, manifest)
    else:
        world = build.shipped_world(args.cache)
        encoders = shipped.shipped_encoders()
        seconds = {"world (shipped)": time.perf_counter() - start}
    failed = failed_ceilings(json.loads((world / "build.json").read_text())["checks"])
    if failed:
        log.warning("the world does not reach its ceilings (%s): it cannot show whether an encoder personalizes; "
                    "report.md says so", "; ".join(failed))
    start = time.perf_counter()
    results = experiment.evaluate_all(world, encoders, args.output, plan, args.jobs)
    seconds["evaluate"] = time.perf_counter() - start
    class_words = {p.name: json.loads((p / "concept.json").read_text())["class"]
                   for p in (world / "concepts").iterdir() if p.is_dir()}
    oracle = json.loads((world / "build.json").read_text())["checks"]["oracle_identity"]
    claims = measure_claims(results, class_words, plan.curve_steps, oracle)
    plan_text = (f"World plan: `{json.dumps(dataclasses.asdict(world_plan))}`.\n\n"
                 f"Experiment plan: `{json.dumps(dataclasses.asdict(plan))}`.")
    report = write_report(args.output, world, claims, results, seconds, plan_text, plan.curve_steps)
    log.info("wrote %s", report)
    return report


if __name__ == "__main__":
    try:
        main()
    except DATEncoderError as error:
        sys.exit(f"error: {error}")
