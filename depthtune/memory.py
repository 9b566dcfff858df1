"""Peak memory while a block runs: CUDA max allocated, or RSS growth on the CPU."""
from __future__ import annotations

import threading

import psutil


class PeakMemory:
    """Samples RSS every 20 ms in a thread; `peak_growth` = max RSS - RSS at start."""

    def __init__(self, device: str = "cpu", interval: float = 0.02):
        self.device, self.interval = device, interval
        self.kind = "cuda_max_allocated" if device == "cuda" else "rss_growth"
        self.peak_growth = 0
        self._stop = threading.Event()

    def __enter__(self):
        if self.device == "cuda":
            import torch
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        self._proc = psutil.Process()
        self._base = self._proc.memory_info().rss
        self._peak = self._base
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, self._proc.memory_info().rss)

    def __exit__(self, *exc):
        if self.device == "cuda":
            import torch
            self.peak_growth = torch.cuda.max_memory_allocated()
            return False
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._proc.memory_info().rss)
        self.peak_growth = self._peak - self._base
        return False
