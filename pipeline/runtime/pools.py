"""Pools of forked decode processes that always end.

A pool whose work finished is closed and joined: its workers leave on the pool's end-of-work
sentinel, with no signal involved. Only a pool stopped by an error or a signal is terminated.
terminate() stops workers with SIGTERM, and a SIGTERM that reaches a worker before its fork has
finished is dropped by Python (the child clears the signals that were pending at fork); that worker
then waits on the task queue forever and terminate() waits for it. On the normal path that race
hung a stage at its end under load, so the normal path never signals.
"""
from __future__ import annotations

import multiprocessing
import signal

from pipeline.train.signals import PREEMPTION_SIGNALS


def _default_signals() -> None:
    """A decode worker dies on the preemption signals (stopping the stage is its parent's business)."""
    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)


def forked_pool(processes: int) -> multiprocessing.pool.Pool:
    """A pool of `processes` forked workers: they inherit the parent's memory (a large file list is
    not pickled per task) and take the preemption signals' default action."""
    return multiprocessing.get_context("fork").Pool(processes, initializer=_default_signals)


def end_pool(pool: multiprocessing.pool.Pool | None, failed: bool) -> None:
    """Close and join a pool whose work finished; terminate one stopped by an error or a signal."""
    if pool is None:
        return
    if failed:
        pool.terminate()
    else:
        pool.close()
        pool.join()
