"""Issue 18: `flows.pipeline --parallel N` gives each concurrent variant its own GPU (flows/gpu_slots.py)."""
from __future__ import annotations

import threading
import time

from flows.gpu_slots import GpuSlots, child_env, visible_gpus


def test_visible_gpus_follow_the_parents_cuda_visible_devices():
    assert visible_gpus(None, 4) == ["0", "1", "2", "3"]
    assert visible_gpus("2,3", 8) == ["2", "3"]  # handed GPUs 2 and 3: children get 2 and 3, not 0 and 1
    assert visible_gpus("GPU-1a2b, GPU-3c4d", 2) == ["GPU-1a2b", "GPU-3c4d"]
    assert visible_gpus("", 4) == [] and visible_gpus("-1", 4) == [] and visible_gpus(None, 0) == []


def test_concurrent_variants_never_share_a_gpu_and_wait_for_a_free_one():
    slots = GpuSlots(["0", "1"])
    held, seen, lock = set(), [], threading.Lock()
    clashes = []

    def variant(i):
        with slots.take() as gpu:
            with lock:
                if gpu in held:
                    clashes.append((i, gpu))
                held.add(gpu)
                seen.append(gpu)
            time.sleep(0.05)
            with lock:
                held.discard(gpu)

    threads = [threading.Thread(target=variant, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not clashes and sorted(set(seen)) == ["0", "1"] and len(seen) == 5
    assert child_env("1")["CUDA_VISIBLE_DEVICES"] == "1"
    assert "at most 2 train at once" in slots.describe(3) and "one GPU each" in slots.describe(2)


def test_without_a_gpu_the_variants_run_as_before():
    slots = GpuSlots([])
    with slots.take() as gpu:
        assert gpu is None and child_env(gpu) is None  # the child inherits this environment unchanged
    assert "on the CPU" in slots.describe(2)
