"""Process memory between stages: give a finished stage's memory back, and measure each stage's
peak resident set (Linux; elsewhere the peak is the process's since it started).

`tessera run` runs the stages one after another in one process. Their models, optimizers and
loaders are garbage once a stage returns, but CPython's cycles and glibc's arenas keep the pages
until collected and trimmed: without that, the score stage inherits the prior's training memory.
"""
from __future__ import annotations

import ctypes
import gc
import resource
import sys
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def current_rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    return 1024 * kib if kib is not None else peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak resident set since the last reset_peak_rss() (Linux) or since the process started."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return 1024 * kib
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else 1024 * peak


def reset_peak_rss() -> None:
    """Restart the peak-RSS count from the current RSS (Linux: writing 5 to clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def release_memory() -> None:
    """Collect garbage (cycles hold trainers alive), return cached accelerator blocks and free heap
    pages to the OS."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
