"""Progress a person can follow: one line updating in place in a terminal, plain periodic lines in logs.

  train: step 120/500 (24%)  41.3 samples/s  loss 0.4123  ETA 1m52s

In a terminal (stdout is a TTY) the line is redrawn in place with '\\r' at most every 0.5 s. When
stdout is not a TTY (DVC, Prefect, a file) a plain line goes through `log` only when ~10 s AND
~10% of the work have passed since the last one: at most 10 lines a run, none for work that is
over in a few seconds, so the logs stay readable. Not tqdm or rich.progress (bench/library_choices.py, a log,
20 ms steps): tqdm writes a carriage-return record every 0.1 s into the log (123 in 12 s, ~6,000 in a 10-minute
run), rich.progress writes nothing until the end; this writes 10 lines.
"""
from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable, Optional

TTY_REDRAW_S = 0.5  # terminal: redraw at most twice a second
LOG_EVERY_S = 10.0  # logs: a line at most every 10 s ...
LOG_EVERY_FRACTION = 0.1  # ... and every 10% of the work, whichever is rarer
QUIET_FOR_S = 3.0  # scoring, caching: a progress line only for work that takes longer than this


def fmt_duration(seconds: float) -> str:
    """75 -> '1m15s', 3725 -> '1h02m', 8 -> '8s'."""
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """Progress of `total` units of work (steps, batches), shown after `delay_s` seconds.

    update(done, ...) with the units done so far (absolute: a resumed run starts at `start`, with
    `samples_start` samples already processed);
    pause() before printing another line (clears the terminal line; the next update redraws it);
    close() ends it (in a terminal: the final state and a newline).
    """

    def __init__(self, label: str, total: int, *, unit: str = "step", log: Callable[[str], None] = print,
                 stream=None, start: int = 0, samples_start: int = 0, delay_s: float = 0.0, log_every_s: Optional[float] = None,
                 log_every_fraction: Optional[float] = None, clock: Callable[[], float] = time.monotonic):
        self.label, self.total, self.unit, self.log = label, max(1, int(total)), unit, log
        self.stream = stream if stream is not None else sys.stdout
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty and isatty())
        self.start, self.done, self.delay_s = start, start, delay_s
        self.log_every_s = LOG_EVERY_S if log_every_s is None else log_every_s
        self.log_every_fraction = LOG_EVERY_FRACTION if log_every_fraction is None else log_every_fraction
        self.clock = clock
        self.t0 = clock()
        self.last_shown_t, self.last_shown_done = self.t0, start
        self.samples0, self.samples = samples_start, None  # samples/s counts those processed since t0
        self.loss_sum, self.loss_n, self.loss = 0.0, 0, None
        self.drawn = False  # a partial terminal line is on screen
        self.lines = 0

    def update(self, done: int, *, loss: Optional[float] = None, samples: Optional[int] = None) -> None:
        self.done = done
        if samples is not None:
            self.samples = samples
        if loss is not None:  # the mean loss since the last line shown: one noisy batch does not set it
            self.loss_sum, self.loss_n = self.loss_sum + loss, self.loss_n + 1
        now = self.clock()
        if now - self.t0 < self.delay_s or done >= self.total:
            return  # too early to be worth a line; the last unit is shown by close()
        if self.tty:
            if now - self.last_shown_t >= TTY_REDRAW_S or not self.drawn:
                self.show(now)
        elif (now - self.last_shown_t >= self.log_every_s
              and done - self.last_shown_done >= self.log_every_fraction * self.total):
            self.show(now)

    def line(self, now: float, final: bool = False) -> str:
        elapsed = now - self.t0
        done = self.done - self.start
        parts = [f"{self.label}: {self.unit} {self.done}/{self.total} ({self.done / self.total:.0%})"]
        if self.samples is not None and elapsed > 0:
            parts.append(f"{(self.samples - self.samples0) / elapsed:.1f} samples/s")
        if self.loss_n:
            self.loss, self.loss_sum, self.loss_n = self.loss_sum / self.loss_n, 0.0, 0
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if final or self.done >= self.total:
            parts.append(f"done in {fmt_duration(elapsed)}")
        elif done > 0:  # the rate so far, validation passes included: they recur at the same pace
            parts.append(f"ETA {fmt_duration(elapsed / done * (self.total - self.done))}")
        return "  ".join(parts)

    def show(self, now: float, final: bool = False) -> None:
        text = self.line(now, final)
        if self.tty:
            self.stream.write("\r\x1b[K" + text)  # back to the line's start, clear it, redraw
            self.stream.flush()
            self.drawn = True
        else:
            self.log(text)
        self.last_shown_t, self.last_shown_done = now, self.done
        self.lines += 1

    def pause(self) -> None:
        """Clear the terminal line so that another message prints cleanly (the next update redraws)."""
        if self.tty and self.drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.drawn = False

    def close(self) -> None:
        """The final state: a last line, only when one was shown before (work over in a few seconds
        stays silent); in a terminal it stays on screen."""
        if not self.lines:
            return
        self.show(self.clock(), final=True)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False


@contextlib.contextmanager
def counting_forwards(model, progress: Progress, per_call: int = 1):
    """Advance `progress` by `per_call` at each forward pass of `model` (a batch of a loop we do not own)."""
    calls = [progress.done]

    def hook(module, args, output):
        calls[0] += per_call
        progress.update(min(calls[0], progress.total))

    handle = model.register_forward_hook(hook)
    try:
        yield progress
    finally:
        handle.remove()
        progress.close()
