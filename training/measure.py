"""Wall time and peak memory of a block of work, on CUDA or CPU."""

from __future__ import annotations

import threading
import time

import psutil
import torch


class Measure:
    """``with Measure(device) as m: ...`` then ``m.seconds``, ``m.end`` (``perf_counter`` time) and
    ``m.peak_bytes``.

    On CUDA, peak bytes are the allocator's peak during the block (``max_memory_allocated``). On CPU,
    the process's resident memory (models included) is sampled every 2 ms and its peak is kept.
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.seconds = self.end = 0.0
        self.peak_bytes = 0

    def __enter__(self) -> Measure:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._process, self._stop = psutil.Process(), threading.Event()
            self._peak_rss = self._process.memory_info().rss
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
