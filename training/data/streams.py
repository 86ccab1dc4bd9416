"""The streaming path: shards and weighted mixes, split over machines x processes x workers, resumable.

Readers. A job has R = processes x DataLoader workers readers; reader ``slot = rank * workers + worker``.
Epoch e of a source lists its units (shards, or a folder's images) in a permutation seeded by
(seed, source, e); reader ``slot`` reads units slot, slot + R, slot + 2R, ... of it, so across the
job every sample is read exactly once per epoch (a source needs at least R units). A reader's samples
are cut into blocks of ``training.shuffle_buffer`` and each block is emitted in a permutation seeded by
(seed, source, slot, epoch, where the block starts): the shuffle buffer. A reader's position in a
source is (epoch, unit, offset) where its current block starts and ``emitted``, how many of the block
are out: resume re-reads that one block and continues exactly, without repeats or gaps.

Mixing. A reader's k-th sample comes from source i with probability w_i / sum(w), drawn from a seed of
(seed, slot, k): deterministic per seed, and over many samples the shares are the weights. Each source
keeps its own epochs.

Batches. Each worker builds whole batches from its own reader; the DataLoader hands them out round
robin, so step s comes from worker s mod W (a loader started at step s0 lets its first worker play
worker s0 mod W), and each batch carries its worker's position after it; the loader's
``state_dict`` is every worker's position, and the checkpoint holds every process's. Resume needs the
same processes and workers (checked). Unlike the exact folder path (``training.data``), a step's samples
depend on the number of processes and workers: the same data, not the same batches.

Latent cache. When every source is shards with a complete cache at the models' resolution
(``training.cache_latents``), each batch carries the cached latents, and the images are the same centre
crops the latents were made from (no random crop or flip); else the cache is not used (logged).

Held-out images (the encoder gain): the first ``n`` that decode, reading the first source's units in a
seeded order; their keys are never trained on.
"""

from __future__ import annotations

import logging
from collections import Counter
from itertools import islice
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from datencoder_core.errors import DATEncoderError
from training.data.decode import Decoded, decode_image
from training.data.sources import MIN_CROP, Batch, ImageSource, Mix, Raw, sample_seed, square_crop

logger = logging.getLogger("datencoder.data")
HELDOUT = 2**32 - 1  # the held-out images' order: a seed no epoch reaches


def _permutation(n: int, *seeds: int) -> list[int]:
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence(seeds).generate_state(1, np.uint64)[0] >> 1))
    return torch.randperm(n, generator=generator).tolist()


class Reader:
    """One reader's share of one source, endlessly, from ``position`` (see the module docstring)."""

    def __init__(self, source: ImageSource, index: int, seed: int, slot: int, slots: int, block: int,
                 excluded: frozenset[str], position: dict | None = None):
        if len(source) < slots:
            raise DATEncoderError(f"--data {source.name}: {len(source)} units (shards or images) for {slots} readers "
                                  f"(processes x training.num_workers); every reader needs one: write more, "
                                  f"smaller shards (training.make_shards --per-shard) or use fewer workers")
        self.source, self.index, self.seed, self.slot, self.slots, self.block = source, index, seed, slot, slots, block
        self.excluded = excluded
        self.position = dict(position or {"epoch": 0, "unit": 0, "offset": 0, "emitted": 0})
        self._units: tuple[int, list[int]] | None = None
        self._samples: list[Raw] = []
        self._after: tuple[int, int, int] | None = None  # (epoch, unit, offset) where the next block starts
        self._open: tuple[tuple[int, int, int], Iterator[Raw]] | None = None  # a unit left mid-way, and where

    def units(self, epoch: int) -> list[int]:
        if self._units is None or self._units[0] != epoch:
            self._units = epoch, _permutation(len(self.source), self.seed, self.index, epoch)[self.slot::self.slots]
        return self._units[1]

    def _fill(self) -> None:
        """Read the block that starts at the current position (and its end), permuted."""
        p, samples = self.position, []
        epoch, unit, offset = p["epoch"], p["unit"], p["offset"]
        for _ in range(2):  # at most one epoch change; a second empty epoch means no samples at all
            units = self.units(epoch)
            while len(samples) < self.block and unit < len(units):
                taken = 0
                if self._open is not None and self._open[0] == (epoch, unit, offset):
                    reading = self._open[1]  # the shard the last block stopped in: no re-reading of its start
                else:
                    reading = islice(self.source.read(units[unit]), offset, None)
                self._open = None
                for raw in reading:
                    taken += 1
                    if raw[0] not in self.excluded:
                        samples.append(raw)
                    if len(samples) == self.block:
                        break
                if len(samples) == self.block:
                    offset += taken
                    self._open = (epoch, unit, offset), reading
                else:
                    unit, offset = unit + 1, 0
            if samples:
                break
            epoch, unit, offset = epoch + 1, 0, 0
            p.update(epoch=epoch, unit=0, offset=0, emitted=0)
        if not samples:
            raise DATEncoderError(f"--data {self.source.name}: reader {self.slot} of {self.slots} found no samples "
                                  f"in its units {self.units(epoch)[:5]}...: the shards are empty")
        order = _permutation(len(samples), self.seed, self.index, self.slot, p["epoch"], p["unit"], p["offset"])
        self._samples = [samples[i] for i in order]
        self._after = epoch, unit, offset

    def __next__(self) -> Raw:
        p = self.position
        if not self._samples:
            self._fill()
        if p["emitted"] == len(self._samples):
            epoch, unit, offset = self._after
            p.update(epoch=epoch, unit=unit, offset=offset, emitted=0)
            self._fill()
        p["emitted"] += 1
        return self._samples[p["emitted"] - 1]


class MixedStream(IterableDataset):
    """This process's share of the mix, as whole batches per worker (``Batch`` with ``state``)."""

    def __init__(self, mix: Mix, image_size: int, seed: int, local_batch: int, rank: int, world: int,
                 num_workers: int, block: int, min_side: int, excluded: frozenset[str], start_step: int = 0,
                 resume: list[dict] | None = None, min_crop: float = MIN_CROP):
        self.mix, self.image_size, self.seed, self.local_batch = mix, image_size, seed, local_batch
        self.rank, self.world, self.workers, self.block, self.min_side = rank, world, max(num_workers, 1), block, min_side
        self.excluded, self.start_step, self.resume, self.min_crop = excluded, start_step, resume, min_crop
        self.slots = self.world * self.workers
        for index, source in enumerate(mix.sources):  # refuse too few units before any worker starts
            Reader(source, index, seed, 0, self.slots, block, frozenset())
        self.weights = np.cumsum(mix.weights) / sum(mix.weights)
        self.use_latents = all(getattr(s, "cache_size", None) == image_size for s in mix.sources)

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker = ((info.id if info else 0) + self.start_step) % self.workers  # the round robin's turn
        slot = self.rank * self.workers + worker
        state = self.resume[worker] if self.resume else {"draws": 0, "sources": [None] * len(self.mix.sources)}
        readers = [Reader(source, i, self.seed, slot, self.slots, self.block, self.excluded if i == 0 else frozenset(),
                          state["sources"][i]) for i, source in enumerate(self.mix.sources)]
        draws = state["draws"]
        while True:
            images, words, latents, events = [], [], [], Counter()
            while len(images) < self.local_batch:
                u = sample_seed(self.seed, draws, 3 + slot) / 2.0 ** 63  # streams 3+: the readers' draws
                chosen = min(int(np.searchsorted(self.weights, u, side="right")), len(readers) - 1)
                _, payload, word = next(readers[chosen])
                decoded = decode_image(payload, self.min_side)
                if self.use_latents and decoded.pixels is not None and payload.latent is None:
                    decoded = Decoded(None, "skipped_no_latent")
                if decoded.event:
                    events[decoded.event] += 1
                if decoded.pixels is not None:
                    generator = None if self.use_latents else torch.Generator().manual_seed(
                        sample_seed(self.seed, draws, 3 + self.slots + slot))
                    images.append(square_crop(decoded.pixels, self.image_size, generator, self.min_crop))
                    words.append(word)
                    if self.use_latents:
                        latents.append(payload.latent.float())
                draws += 1
            state = {"draws": draws, "sources": [dict(r.position) for r in readers]}
            yield Batch(torch.stack(images), torch.zeros(0, dtype=torch.long), words, events, worker, state,
                        torch.stack(latents) if latents else None)


class StreamLoader:
    """Batches of a ``MixedStream`` for its ``start_step`` .. ``steps``, with each row's global position
    (step * G + rank * G/W + row) and the per-worker state to checkpoint."""

    def __init__(self, stream: MixedStream, num_workers: int, global_batch: int, steps: int):
        self.stream, self.global_batch, self.steps = stream, global_batch, steps
        self.loader = DataLoader(stream, batch_size=None, num_workers=num_workers, collate_fn=_as_is,
                                 persistent_workers=False, pin_memory=torch.cuda.is_available())
        self.states = list(stream.resume) if stream.resume else [None] * stream.workers

    def __iter__(self) -> Iterator[Batch]:
        local = self.stream.local_batch
        for step, batch in zip(range(self.stream.start_step, self.steps), self.loader):
            self.states[batch.worker] = batch.state
            first = step * self.global_batch + self.stream.rank * local
            yield batch._replace(positions=torch.arange(first, first + local))

    def state_dict(self) -> list[dict | None]:
        """Every worker's position after the last batch yielded (None: a worker not read from yet)."""
        return [s if s is not None else _start(len(self.stream.mix.sources)) for s in self.states]


def _start(sources: int) -> dict:
    return {"draws": 0, "sources": [None] * sources}


def _as_is(batch: Batch) -> Batch:
    return batch


def heldout(mix: Mix, n: int, seed: int, image_size: int, min_side: int) -> tuple[torch.Tensor, list[str], frozenset[str]]:
    """The held-out images of a streaming run: the first ``n`` of the first source that decode, its units
    read in a seeded order; centre-cropped (n, S, S, 3), their words, and their keys (never trained on)."""
    source, images, words, keys = mix.sources[0], [], [], []
    for unit in _permutation(len(source), seed, 0, HELDOUT):
        for key, payload, word in source.read(unit):
            decoded = decode_image(payload, min_side)
            if decoded.pixels is not None:
                images.append(square_crop(decoded.pixels, image_size, None))
                words.append(word)
                keys.append(key)
            if len(images) == n:
                return torch.stack(images), words, frozenset(keys)
    raise DATEncoderError(f"--data {source.name}: {len(images)} images decode, but training.heldout_images = {n} are "
                          f"held out for the encoder gain (and some must be left to train on); add images or lower it")


def training_data(mix: Mix, image_size: int, training, rank: int, world: int, start_step: int,
                  resume: list[list[dict]] | None):
    """(loader of ``Batch``, held-out images (n, S, S, 3), their words) for this process: the exact folder
    path (``training.data.sources.ProcessShard``) or the streaming one. ``resume``: the checkpoint's data state,
    one list of worker positions per process (streaming only)."""
    from training.data import sources

    if not mix.streaming:
        source = sources.ConcatSource(mix.sources)
        train_indices, heldout_indices = sources.split_heldout(source, training.heldout_images, training.seed)
        shard = sources.ProcessShard(source, train_indices, image_size, training.seed, training.batch_size, rank, world,
                                  start_step, training.steps, training.min_image_side, training.min_crop)
        images, words = sources.heldout_images(source, heldout_indices, image_size, training.min_image_side)
        return sources.shard_loader(shard, training.num_workers), images, words
    if training.batch_size % world:
        raise DATEncoderError(f"training.batch_size {training.batch_size} is not divisible by the {world} processes")
    workers = max(training.num_workers, 1)
    if resume is not None and (len(resume) != world or len(resume[rank]) != workers):
        raise DATEncoderError(f"the checkpoint's data position is for {len(resume)} processes x {len(resume[0])} "
                              f"workers, this run has {world} x {workers}: resume a streaming run with the same "
                              f"number of processes and training.num_workers")
    images, words, keys = heldout(mix, training.heldout_images, training.seed, image_size, training.min_image_side)
    stream = MixedStream(mix, image_size, training.seed, training.batch_size // world, rank, world,
                         training.num_workers, training.shuffle_buffer, training.min_image_side, keys, start_step,
                         resume[rank] if resume is not None else None, training.min_crop)
    cached = [f"{s.name} ({s.cache_size} px)" for s in mix.sources if getattr(s, "cache_size", None)]
    if stream.use_latents:
        logger.info("latent cache: used (%s)", ", ".join(cached))
    elif cached:
        logger.warning("latent cache of %s not used: every source needs one at the models' %d px",
                       ", ".join(cached), image_size)
    return StreamLoader(stream, training.num_workers, training.batch_size, training.steps), images, words
