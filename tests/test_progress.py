"""Progress a person can follow (issue 16): before, a variant printed one line per epoch (minutes of
silence on the CPU); evaluation and prefix caching printed nothing until done."""
from __future__ import annotations

import io
import re
import sys

import pytest
import torch

from depthtune import progress as progress_mod
from depthtune.config import FIXED_BUDGET, ModelConfig, TrainConfig, parse_section, parse_variant
from depthtune.training.prefix_cache import PrefixCache
from depthtune.progress import Progress, counting_forwards, fmt_duration
from depthtune.training.loop import train
from depthtune.model.variants import build_variant
from tests.conftest import TINY_ARCH

MODEL = parse_section(ModelConfig, {"source": "scratch", "scratch": TINY_ARCH}, "model")
CFG = TrainConfig(convergence=FIXED_BUDGET, epochs=2, batch_size=8, lr=1e-3, warmup_fraction=0.1, checkpoint_every=0, seed=7,
                  patience=0, evals_per_epoch=1)


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _tiny(name="full", spec=None):
    spec = parse_variant(name, spec or {}, f"variants.{name}")
    return spec, build_variant(MODEL, spec, 2, device="cpu", seed=0)


def test_fmt_duration():
    assert [fmt_duration(s) for s in (8, 75, 3725)] == ["8s", "1m15s", "1h02m"]


def test_log_lines_at_most_every_10_s_and_10_percent():
    clock, lines = Clock(), []
    p = Progress("train", 1000, log=lines.append, stream=io.StringIO(), clock=clock)
    for step in range(1, 1001):
        clock.t = step * 0.5  # 2 steps a second: 500 s in all
        p.update(step, loss=1.0, samples=step * 8)
    p.close()
    # every 10 s = every 20 steps, but also every 10% = 100 steps: the rarer rule wins
    assert 9 <= len(lines) <= 11, lines
    assert lines[0] == "train: step 100/1000 (10%)  16.0 samples/s  loss 1.0000  ETA 7m30s"
    assert lines[-1].startswith("train: step 1000/1000 (100%)") and lines[-1].endswith("done in 8m20s")


def test_quick_work_prints_nothing_in_logs():
    lines = []
    p = Progress("evaluating", 50, unit="batch", log=lines.append, stream=io.StringIO())
    for b in range(1, 51):
        p.update(b)
    p.close()
    assert lines == []


def test_non_tty_train_gives_a_bounded_number_of_progress_lines(data, monkeypatch):
    monkeypatch.setattr(progress_mod, "LOG_EVERY_S", 0.0)  # a tiny run: only the 10% rule throttles
    train_ex, val_ex = data
    spec, built = _tiny()
    logged = []
    monkeypatch.setattr(sys, "stdout", io.StringIO())  # not a TTY
    out = train(model=built.model, spec=spec, num_layers=built.num_layers, train_ex=train_ex, val_ex=val_ex, cfg=CFG,
                metric="accuracy", device="cpu", pad_id=0, num_labels=2, log=logged.append)
    assert out.steps == 24
    progress = [ln for ln in logged if ln.startswith("train: step")]
    assert 5 <= len(progress) <= 11, logged
    assert all(re.search(r"step \d+/24 \(\d+%\)  [\d.]+ samples/s  loss \d\.\d{4}  (ETA|done in) ", ln)
               for ln in progress), progress
    assert sum("ETA" in ln for ln in progress) == len(progress) - 1 and "done in" in progress[-1]
    assert sum(ln.startswith("  step ") and ": val " in ln for ln in logged) == 2  # the validation lines stay
    assert sys.stdout.getvalue() == ""


def test_tty_train_redraws_one_line_in_place(data, monkeypatch):
    train_ex, val_ex = data
    spec, built = _tiny()
    tty, logged = FakeTTY(), []
    monkeypatch.setattr(sys, "stdout", tty)
    train(model=built.model, spec=spec, num_layers=built.num_layers, train_ex=train_ex, val_ex=val_ex, cfg=CFG,
          metric="accuracy", device="cpu", pad_id=0, num_labels=2, log=logged.append)
    screen = tty.getvalue()
    assert "\r\x1b[Ktrain: step 1/24 (4%)" in screen and "ETA" in screen
    assert screen.endswith("done in 0s\n") or re.search(r"done in \d+s\n$", screen)
    assert not any(ln.startswith("train: step") for ln in logged)  # the live line is not in the log


def test_counting_forwards_and_prefix_cache_progress(data, monkeypatch):
    monkeypatch.setattr(progress_mod, "LOG_EVERY_S", 0.0)
    train_ex, _ = data
    spec, built = _tiny("top1", {"train_top": 1})
    model = built.model.eval()
    lines = []
    p = Progress("scoring", 12, unit="batch", log=lines.append, stream=io.StringIO())
    with counting_forwards(model, p), torch.no_grad():
        for s in range(0, 96, 8):
            model(input_ids=torch.tensor([train_ex.input_ids[i][:8] + [0] * (8 - len(train_ex.input_ids[i][:8]))
                                          for i in range(s, s + 8)]))
    assert lines and lines[-1].startswith("scoring: batch 12/12") and "done in" in lines[-1]

    logged = []
    PrefixCache(model, train_ex, 3, "cpu", batch_size=8, pad_id=0, log=logged.append, delay_s=0.0)
    assert logged and logged[-1].startswith("caching frozen prefix: batch 12/12"), logged
    PrefixCache(model, train_ex, 3, "cpu", batch_size=8, pad_id=0, log=logged.append)  # quick: silent
    assert sum("12/12" in ln for ln in logged) == 1


@pytest.mark.parametrize("stream", [io.StringIO(), FakeTTY()])
def test_pause_clears_only_a_drawn_terminal_line(stream):
    p = Progress("train", 10, log=lambda s: None, stream=stream)
    p.update(1)
    p.pause()
    assert stream.getvalue().endswith("\r\x1b[K") == isinstance(stream, FakeTTY)
