"""Pretrain the DATEncoder (Sec. 4, 5): the weights the DATEncoder Loader reads.

    python -m training.pretrain --base SD15 --clip-vision VIT_H --data DIR [--data DIR ...] --output-dir OUT \\
        [--preset default|ablation|tiny] [--config FILE] [--set section.field=value ...] [--resume auto|PATH]
    accelerate launch [--num_processes 8] [--num_machines M --machine_rank R --main_process_ip IP] \\
        -m training.pretrain ...                                      # the same script on many GPUs
    python -m training.pretrain --preset tiny --output-dir OUT      # CPU quick check, random tiny models

The skeleton is diffusers' ``examples/text_to_image/train_text_to_image_lora.py``: frozen backbones in
the training dtype, only the encoder trained, ``accelerator.save_state`` checkpoints with a total limit
and resume from the newest, trackers and validation. The loss is ``training.pretrain.objective``, the data
``training.data``, the watching ``training.pretrain.validation``, the output folder ``training.pretrain.checkpoints``.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections import Counter
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, gather_object, set_seed
from diffusers.optimization import get_scheduler
from diffusers.utils import check_min_version
from tqdm.auto import tqdm

from datencoder_core.checkpoint import load_encoder
from datencoder_core.config import TuningConfig
from datencoder_core.encoder import DATEncoder
from datencoder_core.errors import DATEncoderError
from training.data import sources, streams
from training.data.decode import EVENTS, describe
from training.models.loading import load_models
from training.pretrain import checkpoints, validation
from training.pretrain.config import PRESETS, PretrainConfig, resolve_config
from training.pretrain.objective import PretrainingObjective

check_min_version("0.30.0")
logger = logging.getLogger("datencoder.pretrain")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training.pretrain", description=__doc__.split("\n")[0])
    parser.add_argument("--base", type=Path, help="SD1.5 single-file checkpoint (.safetensors/.ckpt) or diffusers folder")
    parser.add_argument("--clip-vision", type=Path, help="CLIP ViT-H-14 vision file (ComfyUI's clip_vision)")
    parser.add_argument("--data", action="append", default=[], metavar="SPEC[@WEIGHT]",
                        help="image folder, WebDataset shards ('DIR/{00000..00099}.tar') or 'skimage' (the photos "
                             "scikit-image ships); repeatable, @WEIGHT mixes the sources by weight")
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--config", type=Path, help="TOML or YAML file with [training], [loss], [encoder], [lora]")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    parser.add_argument("--resume", metavar="auto|PATH", help="'auto': the newest complete checkpoint, if any")
    return parser.parse_args(argv)


def describe_run(args: argparse.Namespace, config: PretrainConfig) -> tuple[dict, sources.Mix]:
    """The resolved config and the run's inputs, as written to DIR/config.json, and the opened data
    source: missing files and empty or too small data sources are refused here, before any work."""
    training = config.training
    if training.models == "tiny":
        if args.base or args.clip_vision:
            raise DATEncoderError("training.models = 'tiny' builds random models in code; drop --base/--clip-vision "
                                  "or use another preset")
        specs = args.data or ["skimage"]
    else:
        for flag, path in (("--base", args.base), ("--clip-vision", args.clip_vision)):
            if path is None or not path.exists():
                raise DATEncoderError(f"{flag} {path or '(missing)'}: no such file; pass the SD1.5 checkpoint "
                                      f"(--base) and the CLIP ViT-H-14 vision file (--clip-vision)")
        specs = args.data
    mix = sources.open_sources(specs)  # raises on a missing or empty folder, a missing shard
    sources.check_sources(mix, training.min_image_side)  # raises on a source without one usable image
    if not mix.streaming:
        sources.split_heldout(sources.ConcatSource(mix.sources), training.heldout_images, training.seed)
    run = {"config": config.to_dict(), "base": str(args.base) if args.base else None,
           "clip_vision": str(args.clip_vision) if args.clip_vision else None, "data": list(specs)}
    return run, mix


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    config = resolve_config(args.preset, args.config, tuple(args.set))
    training, output_dir = config.training, args.output_dir
    run, mix = describe_run(args, config)
    resume_from = checkpoints.check_output_dir(output_dir, run, args.resume)  # all refusals before any work

    accelerator = Accelerator(mixed_precision=training.mixed_precision, log_with="tensorboard",
                              project_config=ProjectConfiguration(project_dir=str(output_dir),
                                                                  logging_dir=str(output_dir / "logs")))
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = training.allow_tf32
    set_seed(training.seed)
    if accelerator.is_main_process:
        checkpoints.write_run(output_dir, run)

    weight_dtype = torch.bfloat16 if training.mixed_precision == "bf16" else torch.float32
    models = load_models(args.base, args.clip_vision, tiny=training.models == "tiny", seed=training.seed,
                         dtype=weight_dtype, device=accelerator.device)  # frozen, in the training dtype
    backend = models.backend(config.lora)
    if training.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
    torch.manual_seed(training.seed)
    encoder = DATEncoder(config.encoder, config.lora, backend.sites).to(accelerator.device)
    if not training.hypernetwork:
        encoder.hyper_head.requires_grad_(False)  # zero-init B: dW stays exactly 0
    trainable = [p for p in encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=training.lr, weight_decay=training.weight_decay)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=training.warmup_steps,
                              num_training_steps=training.steps)  # stepped once per global step
    encoder, optimizer = accelerator.prepare(encoder, optimizer)
    state = checkpoints.TrainState()
    accelerator.register_for_checkpointing(scheduler, state)
    _register_encoder_hooks(accelerator, run, state)
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        logger.info("resumed from %s (step %d)", resume_from, state.step)

    loader, held_images, held_words = streams.training_data(mix, models.image_size, training, accelerator.process_index,
                                                           accelerator.num_processes, state.step, state.data)
    objective = PretrainingObjective(backend, config)
    held_out = validation.held_out_draws(backend, held_images, held_words, training.heldout_timesteps, training.seed)
    accelerator.init_trackers("pretrain", config=_scalars(config))
    logger.info("data %s (%s), %d images held out; global batch %d on %d processes; steps %d to %d", mix.name,
                "streaming" if mix.streaming else "exact order", len(held_words), training.batch_size,
                accelerator.num_processes, state.step, training.steps)

    progress = tqdm(initial=state.step, total=training.steps, disable=not accelerator.is_main_process, unit="step")
    timer, events = _StepTimer(), _DataEvents(accelerator)
    if state.step == 0:
        _watch(accelerator, backend, encoder, held_out, held_images, config, output_dir, step=0)
    for batch in timer.wrap(loader):
        events.counts.update(batch.events)
        with accelerator.accumulate(encoder), accelerator.autocast():
            out = objective(encoder, batch.images.to(accelerator.device), batch.positions, accelerator.gather,
                            accelerator.process_index, accelerator.num_processes, batch.latents)
            accelerator.backward(out.objective)
            grad_norm = accelerator.clip_grad_norm_(trainable, training.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        state.step += 1
        progress.update(1)
        if state.step % training.log_every == 0 or state.step == training.steps:
            logs = {k: accelerator.reduce(v.to(accelerator.device), "mean").item() for k, v in out.terms.items()}
            logs |= {k: v.item() for k, v in out.metrics.items()}
            logs |= {"lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm)} | timer.read(training.batch_size)
            accelerator.log({f"train/{k}": v for k, v in logs.items()} | events.read(), step=state.step)
            progress.set_postfix(loss=f"{logs['loss']:.4f}", img_s=f"{logs['images_per_second']:.1f}")
        _watch(accelerator, backend, encoder, held_out, held_images, config, output_dir, state.step)
        if state.step % training.checkpoint_every == 0 or state.step == training.steps:
            state.data = gather_object([loader.state_dict()]) if mix.streaming else None
            checkpoints.save_checkpoint(accelerator, output_dir, state.step, training.checkpoints_total_limit)
    progress.close()

    exported = output_dir / checkpoints.EXPORTED
    if accelerator.is_main_process:
        encoder_id = checkpoints.write_encoder(accelerator.unwrap_model(encoder), exported, run, state.step)
        logger.info("exported %s (%s) after %d steps", exported, encoder_id, state.step)
    accelerator.end_training()
    return exported


def _watch(accelerator, backend, encoder, held_out, held_images, config: PretrainConfig, output_dir: Path,
           step: int) -> None:
    """On the main process, at their intervals (and at step 0 and the end): encoder gain, image grid."""
    training = config.training
    last = step == training.steps
    alpha = training.alpha_blend if training.dual_path else 1.0
    if accelerator.is_main_process and (step % training.validation_every == 0 or last):
        gain = validation.encoder_gain(backend, accelerator.unwrap_model(encoder), held_out, alpha,
                                       training.batch_size // accelerator.num_processes)
        accelerator.log({f"heldout/{k}": v for k, v in gain.items()}, step=step)
        logger.info("step %d: held-out encoder gain %.5f (as trained), %.5f (as personalization uses it: one "
                    "prediction at t=%d)", step, gain["encoder_gain"], gain["encoder_gain_fixed_t"],
                    TuningConfig().encoder_timestep)
    if accelerator.is_main_process and training.sample_images and (step % training.sample_every == 0 or last) and step:
        grid = validation.sample_grid(backend, accelerator.unwrap_model(encoder),
                                      held_images[:training.sample_images], alpha, training.sample_steps, training.seed)
        (output_dir / "samples").mkdir(exist_ok=True)
        from torchvision.utils import save_image

        save_image(grid, output_dir / "samples" / f"step-{step:07d}.png")
        accelerator.get_tracker("tensorboard").writer.add_image("samples", grid, step)
    accelerator.wait_for_everyone()


def _register_encoder_hooks(accelerator, run: dict, state: checkpoints.TrainState) -> None:
    """Checkpoints hold the encoder as the DATEncoder Loader's file instead of accelerate's model file."""

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            checkpoints.write_encoder(accelerator.unwrap_model(models[0]), Path(output_dir) / checkpoints.ENCODER_FILE,
                                      run, state.step)
        weights.pop()

    def load_hook(models, input_dir):
        saved, _ = load_encoder(Path(input_dir) / checkpoints.ENCODER_FILE)
        accelerator.unwrap_model(models.pop()).load_state_dict(saved.state_dict())

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _scalars(config: PretrainConfig) -> dict:
    """The config as TensorBoard hparams (scalars and strings only)."""
    return {f"{section}.{k}": v for section, values in config.to_dict().items() for k, v in values.items()
            if isinstance(v, (int, float, str, bool))}


class _DataEvents:
    """Bad images met by every process since the run (re)started, per kind (``training.data.decode``): logged
    as ``data/<kind>`` and, when they change, to the console."""

    def __init__(self, accelerator):
        self.accelerator, self.counts, self.logged = accelerator, Counter(), None

    def read(self) -> dict[str, int]:
        local = torch.tensor([self.counts[k] for k in EVENTS], dtype=torch.long, device=self.accelerator.device)
        total = dict(zip(EVENTS, self.accelerator.reduce(local, "sum").tolist()))
        if total != self.logged and any(total.values()):
            logger.info("data: %s", describe(Counter(total)))
        self.logged = total
        return {f"data/{k}": v for k, v in total.items()}


class _StepTimer:
    """Images/s and the share of step time spent waiting for data, since the last ``read``."""

    def __init__(self):
        self.waiting = self.steps = 0
        self.start = time.perf_counter()

    def wrap(self, loader):
        iterator = iter(loader)
        while True:
            before = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self.waiting += time.perf_counter() - before
            self.steps += 1
            yield batch

    def read(self, global_batch: int) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out = {"images_per_second": self.steps * global_batch / elapsed, "data_share": self.waiting / elapsed}
        self.waiting = self.steps = 0
        self.start = time.perf_counter()
        return out

