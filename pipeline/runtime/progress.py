"""Progress for people: a tqdm bar in a terminal, plain periodic lines anywhere else.

A bar redraws itself with carriage returns; in a SLURM output file (or `make run > log`) every
redraw stays, and a long stage becomes one enormous line. When stderr is not a terminal,
`progress(...)` returns a `PlainProgress` instead, which prints one line every
`TESSERA_PROGRESS_INTERVAL_S` seconds (default 30) and one at the end:

    [train_prior] step 1200/5000 (24.0%)  9.84 step/s  ETA 6m26s  loss=0.5312 tok_s=2519

Both have the interface the call sites use: `update(n)`, `set_postfix(**values)`, `close()`, and
use as a context manager.
"""
from __future__ import annotations

import os
import sys
import time

from tqdm import tqdm

INTERVAL_ENV = "TESSERA_PROGRESS_INTERVAL_S"
DEFAULT_INTERVAL_S = 30.0


def _interval_s() -> float:
    raw = os.environ.get(INTERVAL_ENV, "")
    try:
        return max(0.0, float(raw)) if raw else DEFAULT_INTERVAL_S
    except ValueError:
        return DEFAULT_INTERVAL_S


def format_duration(seconds: float | None) -> str:
    """`1h05m` / `4m07s` (`-` for None): progress lines, `tessera status` and the run summary."""
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class PlainProgress:
    """Counts like a tqdm bar; writes a complete line every `interval_s` seconds, never redraws."""

    def __init__(self, total: int | None, *, desc: str, unit: str, initial: int = 0, enabled: bool = True,
                 interval_s: float | None = None, stream=None):
        self.total, self.desc, self.unit = total, desc, unit
        self.n = initial
        self.enabled = enabled
        self.interval_s = _interval_s() if interval_s is None else interval_s
        self.stream = stream
        self.postfix: dict = {}
        self._start = self._last = time.monotonic()
        self._start_n = initial
        self._closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if self.enabled and now - self._last >= self.interval_s:
            self._last = now
            self._write()

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **values) -> None:
        self.postfix = {**(ordered_dict or {}), **values}

    def line(self) -> str:
        elapsed = time.monotonic() - self._start
        done_here = self.n - self._start_n
        rate = done_here / elapsed if elapsed > 0 else 0.0
        parts = [f"[{self.desc}] {self.unit} {self.n}"]
        if self.total:
            parts[0] += f"/{self.total} ({100.0 * self.n / self.total:.1f}%)"
        parts.append(f"{rate:.3g} {self.unit}/s")
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"ETA {format_duration((self.total - self.n) / rate)}")
        else:
            parts.append(f"elapsed {format_duration(elapsed)}")
        if self.postfix:
            parts.append(" ".join(f"{k}={v}" for k, v in self.postfix.items()))
        return "  ".join(parts)

    def _write(self) -> None:
        stream = self.stream or sys.stderr
        print(self.line(), file=stream, flush=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.enabled and self.n > self._start_n:
            self._write()

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(total: int | None, *, desc: str, unit: str, initial: int = 0, enabled: bool = True, **bar_options):
    """A tqdm bar when stderr is a terminal, else a PlainProgress. `enabled=False` prints nothing
    (ranks other than 0); `bar_options` (position, mininterval, ...) only concern the bar."""
    if sys.stderr.isatty():
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True,
                    **bar_options)
    return PlainProgress(total, desc=desc, unit=unit, initial=initial, enabled=enabled)
