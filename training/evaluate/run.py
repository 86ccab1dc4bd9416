"""Score encoder weights on the DreamBench protocol, with the paper's ablations and baselines (Sec. 5, Fig. 5).

    python -m training.evaluate --encoder FILE --base SD15 --clip-vision VIT_H --concepts DIR \\
        --metrics-models DIR --output DIR [--prompts FILE] [--variants ...] [--images-per-prompt 4]
    python -m training.evaluate --preset tiny --output DIR     # tiny random models, minutes on a CPU
    accelerate launch -m training.evaluate ...                  # the concepts shared between processes

Each concept x variant is one unit: personalize from the concept's first photo with the core code the
node runs (``personalize``, or ``personalize_from_word`` from the class word for ``scratch``), generate every prompt
through the reference backend (DDIM, classifier-free guidance, dual path; image i of prompt p has the
seed ``seed + 1000 p + i`` in every variant), score against all the concept's photos, and write
``units/<concept>/<variant>.json`` and ``grids/<concept>/<variant>.png`` (a row per prompt). A rerun
skips the units on disk. The main process then writes ``metrics.json``, ``metrics.csv`` and
``tradeoff.png`` from every unit (training/evaluate/report.py).

``main(argv, scorers)`` adds the metrics of further ``Scorer``s beside CLIP and DINO: the toy world passes its
ground truth (``truth_identity``, ``truth_editability``, ``truth_shape``); ``--tiny-metrics`` reads tiny metric
models.

Variants (``VARIANTS``; ``full:N`` and ``scratch:N`` are ``full`` and ``scratch`` with N steps):
* full: encoder + 12 tuning steps, dual path (alpha 0.25) in tuning and sampling: the method.
* encoder_only: the encoder's prediction, no tuning (0 steps), dual path.
* no_dual_path: encoder + 12 steps, tuning and sampling at alpha 1.
* no_tuning_no_dual: the encoder's prediction at alpha 1.
* scratch: no encoder (Personalize Concept (no encoder), ``datencoder_core.tuning.personalize_from_word``): v*
  starts at the class word's embedding (the mean over its tokens), A at peft's LoRA init (uniform in
  +-1/sqrt(D_in)) and B at zero (dW = 0); the same 12 steps and dual path as full (the node's own default is
  ``WORD_START_TUNING``, 200 steps at lr 1e-3).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from datencoder_core import (Concept, DATEncoderError, LoRAConfig, TuningConfig, load_encoder, personalize,
                             personalize_from_word, save_encoder)
from datencoder_core.atomic import atomic_write, atomic_write_text
from training.evaluate.concepts import (PROJECT_PROMPTS, ConceptSpec, Prompt, load_photo, read_concepts,
                                        read_prompts, write_tiny_concepts)
from training.evaluate.metrics import (TINY, MetricArchitectures, MetricModels, Scorer, check_metric_files,
                                       write_random_metric_models)
from training.evaluate.report import plot_tradeoff, summarize, write_metrics
from training.evaluate.sampling import generate
from training.models.loading import DTYPES, load_models

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    encoder: bool  # start from the encoder's prediction (else the scratch start)
    steps: int
    alpha: float  # a of Eq. 5, in tuning and sampling


def parse_variant(name: str, tuning: TuningConfig) -> Variant:
    steps, alpha = tuning.steps, tuning.alpha_blend
    table = {"full": (True, steps, alpha), "encoder_only": (True, 0, alpha), "no_dual_path": (True, steps, 1.0),
             "no_tuning_no_dual": (True, 0, 1.0), "scratch": (False, steps, alpha)}
    base, colon, count = name.partition(":")
    if base in table and (not colon or (base in ("scratch", "full") and count.isdigit())):
        encoder, steps, alpha = table[base]
        return Variant(name, encoder, int(count) if colon else steps, alpha)
    raise DATEncoderError(f"unknown variant {name!r}; expected one of {sorted(table)}, full:N or scratch:N")


DEFAULT_VARIANTS = ["full", "encoder_only", "no_dual_path", "no_tuning_no_dual", "scratch", "scratch:400"]
TINY_DEFAULTS = {"variants": [*DEFAULT_VARIANTS[:5], "scratch:3"], "images_per_prompt": 2, "prompts_per_kind": 1,
                 "sampling_steps": 2}
TINY_TUNING = {"steps": 2, "timesteps_per_step": 1}  # keeps the tiny preset within a few CPU minutes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=("tiny",), help="tiny random models and a generated concept set")
    parser.add_argument("--encoder", type=Path, help="encoder .safetensors (what DATEncoder Loader reads)")
    parser.add_argument("--base", type=Path, help="SD1.x .safetensors checkpoint or diffusers folder")
    parser.add_argument("--clip-vision", type=Path, help="CLIP ViT-H-14 clip_vision .safetensors")
    parser.add_argument("--concepts", type=Path, help="a folder per concept: photos + concept.json")
    parser.add_argument("--metrics-models", type=Path, help="folder of the metric weight files (training/evaluate/metrics.py)")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--prompts", type=Path, default=PROJECT_PROMPTS,
                        help="this project's prompt file or DreamBench's prompts_and_classes.txt")
    parser.add_argument("--prompts-per-kind", type=int, help="only the first N prompts of each kind")
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--sampling-steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    parser.add_argument("--seed", type=int, default=0, help="tuning seed and first sampling seed")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="of the frozen models")
    parser.add_argument("--tiny-metrics", action="store_true",
                        help="the --metrics-models files hold training.evaluate.metrics.TINY's architectures (a toy world)")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    if parser.parse_known_args(argv)[0].preset == "tiny":
        parser.set_defaults(**TINY_DEFAULTS)
    args = parser.parse_args(argv)
    if args.preset == "tiny" and (args.base or args.clip_vision):
        parser.error("--preset tiny builds its own random models; drop --base/--clip-vision")
    if args.preset is None:
        missing = [f"--{n.replace('_', '-')}" for n in ("encoder", "base", "clip_vision", "concepts", "metrics_models")
                   if getattr(args, n) is None]
        if missing:
            parser.error(f"missing {' '.join(missing)} (or use --preset tiny)")
    return args


def prepare_tiny_inputs(args: argparse.Namespace, models, write: bool) -> None:
    """Point each of --concepts / --metrics-models / --encoder not given at the tiny preset's own, under
    the output folder: a concept set, random metric models and a random encoder file, written if ``write``
    (the main process) and not there yet."""
    inputs = args.output / "tiny_inputs"
    writers = {"concepts": (inputs / "concepts", write_tiny_concepts),
               "metrics_models": (inputs / "metrics_models", lambda path: write_random_metric_models(path, TINY)),
               "encoder": (inputs / "encoder.safetensors",
                           lambda path: save_encoder(models.random_encoder(), path, "tiny-random"))}
    for name, (path, writer) in writers.items():
        if getattr(args, name) is None:
            setattr(args, name, path)
            if write and not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                writer(path)


def check_inputs(args: argparse.Namespace, tuning: TuningConfig) -> tuple[list[ConceptSpec], dict, list[Variant]]:
    """Everything that can be checked without loading a model; raises ``DATEncoderError``."""
    concepts = read_concepts(args.concepts)
    prompts = {kind: p[:args.prompts_per_kind] for kind, p in read_prompts(args.prompts).items()}
    check_metric_files(args.metrics_models)
    for path, what in ((args.encoder, "--encoder"), (args.base, "--base"), (args.clip_vision, "--clip-vision")):
        if path is not None and not path.exists():
            raise DATEncoderError(f"{what} {path} does not exist")
    return concepts, prompts, [parse_variant(v, tuning) for v in args.variants]


def scratch_concept(backend, lora_config: LoRAConfig, class_word: str, image: torch.Tensor,
                    config: TuningConfig) -> Concept:
    """The ``scratch`` baseline: the node's encoder-free path (``personalize_from_word``) from the class word."""
    return personalize_from_word(backend, class_word, lora_config, image, config)


def run_unit(backend, encoder, encoder_id: str, metric_models: MetricModels, concept: ConceptSpec,
             prompts: list[Prompt], variant: Variant, args: argparse.Namespace, tuning: TuningConfig,
             scorers: Sequence[Scorer] = ()) -> dict:
    """Personalize, generate and score one concept x variant; returns its record (training/evaluate/report.py).
    Each of ``scorers`` adds its metrics to each prompt's scores."""
    cuda = backend.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(backend.device)
    photos = [load_photo(p) for p in concept.photos]
    config = dataclasses.replace(tuning, steps=variant.steps, alpha_blend=variant.alpha)
    start = time.perf_counter()
    if variant.encoder:
        learned = personalize(backend, encoder, encoder_id, photos[0][None], config)
    else:
        learned = scratch_concept(backend, encoder.lora_config, concept.class_word, photos[0][None], config)
    personalization_s = time.perf_counter() - start
    images, results, generation_s = [], [], 0.0
    for p, prompt in enumerate(prompts):
        seeds = [args.seed + 1000 * p + i for i in range(args.images_per_prompt)]
        start = time.perf_counter()
        generated = generate(backend, learned, prompt.template, seeds, alpha=variant.alpha,
                             steps=args.sampling_steps, guidance=args.guidance)
        generation_s += time.perf_counter() - start
        images.append(generated)
        text = prompt.with_class(concept.class_word)
        scores = metric_models.score(generated, photos, text)
        for scorer in scorers:
            scores |= scorer.score(generated, concept.photos[0].parent, text)
        results.append({"template": prompt.template, "category": prompt.category, "text": text, **scores})
    save_grid(torch.cat(images), args.output / "grids" / concept.name / f"{variant.name}.png", args.images_per_prompt)
    return {"concept": concept.name, "kind": concept.kind, "variant": variant.name, "token": learned.token,
            "personalization_s": personalization_s, "generation_s": generation_s,
            "peak_gpu_bytes": torch.cuda.max_memory_allocated(backend.device) if cuda else None, "prompts": results}


def save_grid(images: torch.Tensor, path: Path, per_row: int) -> None:
    from torchvision.utils import save_image

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        save_image(images.permute(0, 3, 1, 2), tmp, nrow=per_row)


def check_resumable(path: Path, settings: dict) -> None:
    """The units in an output folder are reused only under the same settings (the variants may differ)."""
    if not path.exists():
        return
    def comparable(d):
        return {**d, "variants": None, "args": {**d["args"], "variants": None}}
    if comparable(json.loads(path.read_text())) != comparable(json.loads(json.dumps(settings))):
        raise DATEncoderError(f"{path.parent} holds a run with other settings ({path}); use another --output, "
                              f"or the same arguments to resume it")


def unit_path(output: Path, concept: str, variant: str) -> Path:
    return output / "units" / concept / f"{variant.replace(':', '_')}.json"


def _models(args: argparse.Namespace, device: torch.device):
    return load_models(args.base, args.clip_vision, tiny=args.preset == "tiny", dtype=DTYPES[args.dtype],
                       device=device)


def main(argv: list[str] | None = None, scorers: Sequence[Scorer] = ()) -> dict | None:
    """Run the evaluation, scoring with DINO, CLIP and ``scorers``; returns the metrics.json content on the main
    process."""
    from accelerate import Accelerator

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    tuning = TuningConfig(seed=args.seed, **(TINY_TUNING if args.preset == "tiny" else {}))
    accelerator = Accelerator()
    args.output.mkdir(parents=True, exist_ok=True)
    models = None
    if args.preset == "tiny":  # its inputs are made with its models, so these load first
        models = _models(args, accelerator.device)
        prepare_tiny_inputs(args, models, write=accelerator.is_main_process)
        accelerator.wait_for_everyone()
    concepts, prompts, variants = check_inputs(args, tuning)
    settings = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "tuning": tuning.to_dict(), "variants": [dataclasses.asdict(v) for v in variants],
                "prompts": {kind: [dataclasses.asdict(p) for p in ps] for kind, ps in prompts.items()}}
    check_resumable(args.output / "settings.json", settings)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_text(args.output / "settings.json", json.dumps(settings, indent=2))

    models = models or _models(args, accelerator.device)
    backend = models.backend()
    encoder, encoder_id = load_encoder(args.encoder)
    encoder = encoder.to(accelerator.device)
    metric_architectures = TINY if args.preset == "tiny" or args.tiny_metrics else MetricArchitectures()
    metric_models = MetricModels(args.metrics_models, metric_architectures, accelerator.device)
    with accelerator.split_between_processes(concepts) as mine:
        units = [(c, v) for c in mine for v in variants]
        for concept, variant in tqdm(units, desc="concepts x variants", disable=not accelerator.is_local_main_process):
            path = unit_path(args.output, concept.name, variant.name)
            if path.exists():
                continue
            record = run_unit(backend, encoder, encoder_id, metric_models, concept, prompts[concept.kind], variant,
                              args, tuning, scorers)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(record, indent=2))
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return None
    records = [json.loads(unit_path(args.output, c.name, v.name).read_text()) for c in concepts for v in variants]
    summary = summarize(records, [v.name for v in variants], settings)
    write_metrics(summary, args.output)
    plot_tradeoff(summary, args.output / "tradeoff.png")
    logger.info("wrote %s", ", ".join(str(args.output / n) for n in ("metrics.json", "metrics.csv", "tradeoff.png")))
    return summary

