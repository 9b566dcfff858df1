"""Peak memory while a block runs: what live tensors hold (allocated) and what the process holds (reserved).

    CUDA: torch.cuda.max_memory_allocated (live tensors) and max_memory_reserved (the caching allocator's
          blocks, live or not) over the block
    CPU:  the same two figures from the operating system and the C heap, sampled every 20 ms:
          reserved  = peak RSS growth over the block's start (what `top` and the OOM killer see)
          allocated = peak of (RSS - the bytes glibc's heap holds free) over the block's start.
          glibc keeps freed blocks in its arenas (its mmap threshold grows with every large free, up to
          32 MiB, so activations come from the arenas and stay there, fragmented). Those free bytes are
          resident but no tensor uses them: the CPU analogue of CUDA's reserved-but-unallocated memory.
          Measured, MiniLM-L6 full fine-tuning on the default data (batch 16, 125 steps, 2 cores):
          RSS growth 880 MiB, allocated 675 MiB; with every block over 128 KiB mmapped
          (MALLOC_MMAP_THRESHOLD_=131072, nothing retained) RSS growth is 680 MiB: the same live bytes.
          Without glibc (macOS, musl) allocated falls back to the RSS growth (kind "rss_growth").
          anonymous=True counts anonymous memory only (RSS less file-backed pages, Linux): for a process
          forked after its imports, which pages its parent's library code in again as it runs (fork does
          not copy the page tables of read-only file mappings: tens of MiB that no tensor holds). Not for
          the finetune stage: a pretrained checkpoint's weights are file-backed there (safetensors mmap).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import threading
from typing import Optional

import psutil


class Mallinfo2(ctypes.Structure):
    """glibc's `struct mallinfo2` (malloc.h, glibc >= 2.33): size_t fields, summed over every arena."""
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def glibc() -> Optional[ctypes.CDLL]:
    """The C library when it is glibc with mallinfo2, else None."""
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallinfo2.restype = Mallinfo2
    except (OSError, AttributeError):
        return None
    return libc


def heap_free_bytes(libc: Optional[ctypes.CDLL]) -> int:
    """Bytes glibc's arenas hold free (fordblks: free chunks, fast bins included); 0 without glibc."""
    return int(libc.mallinfo2().fordblks) if libc is not None else 0


class PeakMemory:
    """`peak_growth` = peak allocated over the start, `peak_reserved` = peak reserved over the start (bytes)."""

    def __init__(self, device: str = "cpu", interval: float = 0.02, anonymous: bool = False):
        self.device, self.interval, self.anonymous = device, interval, anonymous
        self.libc = None if device == "cuda" else glibc()
        self.kind = ("cuda_max_allocated" if device == "cuda" else
                     "heap_allocated" if self.libc is not None else "rss_growth")
        self.peak_growth = 0
        self.peak_reserved = 0
        self._stop = threading.Event()

    def _allocated(self, rss: int) -> int:
        return rss - heap_free_bytes(self.libc)

    def _rss(self) -> int:
        info = self._proc.memory_info()  # Linux: `shared` = resident file-backed + shmem pages (statm)
        return info.rss - getattr(info, "shared", 0) if self.anonymous else info.rss

    def __enter__(self):
        if self.device == "cuda":
            import torch
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            self._base_reserved = torch.cuda.memory_reserved()
            return self
        self._proc = psutil.Process()
        rss = self._rss()
        self._base, self._base_reserved = self._allocated(rss), rss
        self._peak, self._peak_reserved = self._base, self._base_reserved
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _take_sample(self):
        rss = self._rss()
        self._peak_reserved = max(self._peak_reserved, rss)
        self._peak = max(self._peak, self._allocated(rss))

    def _sample(self):
        while not self._stop.wait(self.interval):
            self._take_sample()

    def __exit__(self, *exc):
        if self.device == "cuda":
            import torch
            # the block's own growth, as on the CPU (the weights loaded before it are outside)
            self.peak_growth = torch.cuda.max_memory_allocated() - self._base
            self.peak_reserved = torch.cuda.max_memory_reserved() - self._base_reserved
            return False
        self._stop.set()
        self._thread.join()
        self._take_sample()
        self.peak_growth = self._peak - self._base
        self.peak_reserved = self._peak_reserved - self._base_reserved
        return False


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter (malloc.h)


def trim_heap(threshold: int = 128 * 1024) -> bool:
    """Fix glibc's mmap threshold so blocks >= `threshold` bytes are mmapped and go back to the OS when freed.

    Then RSS ~ live tensors (reserved ~ allocated). It is not free: every large tensor then costs an
    mmap and fresh zeroed pages; measured on 2 cores (MiniLM-L6 full, default data, 125 steps): 36.3 s
    at 128 KiB, 33.8 s at 512 KiB, 30.0 s at 1 MiB vs 26.5 s with glibc's default (+37%, +28%, +13%),
    and at 1 MiB LoRA's small blocks still fragment (RSS 1.56x the estimate). So no entry point calls it:
    PeakMemory reports the allocated bytes apart from the heap's free ones instead. For a user whose
    RSS must stay near the estimate: MALLOC_MMAP_THRESHOLD_=131072 in the environment does the same.
    Never at import. False where there is no glibc (macOS, musl): nothing changes there.
    """
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False
