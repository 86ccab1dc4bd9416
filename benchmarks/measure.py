"""Wall time and peak memory of a block of work, on CUDA or CPU."""

from __future__ import annotations

import threading
import time

import psutil
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode


class LiveTensorBytes(TorchDispatchMode):
    """``with LiveTensorBytes() as m: ...`` then ``m.peak_bytes``: the most bytes of tensor storage
    that was created inside the block and alive at one time, on any device: what the CUDA allocator's
    peak shows, for the CPU too, and exact where RSS is blurred by the C heap reusing freed memory.
    Storage that existed before the block (loaded weights) is not counted, nor is any of it copied
    without a tensor op seeing it. Backward passes run inside the block are counted."""

    def __enter__(self) -> LiveTensorBytes:
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self._current = self.peak_bytes = 0
        return super().__enter__()

    def _purge(self) -> None:
        for key in [key for key, (ref, _) in self._live.items() if ref.expired()]:
            self._current -= self._live.pop(key)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for tensor in torch.utils._pytree.tree_leaves(out):
            if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
                continue
            storage = tensor.untyped_storage()
            key, known = storage.data_ptr(), self._live.get(storage.data_ptr())
            if storage.nbytes() == 0 or key in inputs or (known is not None and not known[0].expired()):
                continue  # a view of an input (detach, a no-op .to) or of a counted storage
            if known is not None:
                self._current -= known[1]
            self._live[key] = (StorageWeakRef(storage), storage.nbytes())
            self._current += storage.nbytes()
            if self._current > self.peak_bytes:
                self._purge()  # count only what is still alive before raising the peak
                self.peak_bytes = max(self.peak_bytes, self._current)
        return out


class Measure:
    """``with Measure(device) as m: ...`` then ``m.seconds``, ``m.end`` (``perf_counter`` time),
    ``m.peak_bytes`` and ``m.start_bytes`` (the same measure when the block began).

    On CUDA, peak bytes are the allocator's peak during the block (``max_memory_allocated``). On CPU,
    the process's resident memory (models included) is sampled every 2 ms and its peak is kept.
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.seconds = self.end = 0.0
        self.peak_bytes = self.start_bytes = 0

    def __enter__(self) -> Measure:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
        else:
            self._process, self._stop = psutil.Process(), threading.Event()
            self._peak_rss = self.start_bytes = self._process.memory_info().rss
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        self._start = time.perf_counter()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._peak_rss = max(self._peak_rss, self._process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.end = time.perf_counter()
        self.seconds = self.end - self._start
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._sampler.join()
            self.peak_bytes = max(self._peak_rss, self._process.memory_info().rss)

    @property
    def what(self) -> str:
        return "CUDA allocator peak" if self.device.type == "cuda" else "process peak RSS"
