"""Preemption: SIGUSR1 / SIGUSR2 / SIGTERM ask the training loop to checkpoint and stop.

SLURM sends TERM to every task when a job is cancelled, preempted or reaches its time limit, and,
if the job was submitted with `--signal=[B:]USR1@SECONDS`, USR1 that many seconds before the time
limit; submitit asks for USR2 (`--signal=USR2@90` by default) and requeues on it. The handler only
sets a flag; the loop polls `guard.should_stop()` at a step boundary, which all-reduces the flag so
every rank checkpoints at the same step (DeepSpeed's save_checkpoint must be called on all ranks),
then raises `Preempted` after saving.
"""
from __future__ import annotations

import signal

import torch
import torch.distributed as dist

PREEMPTION_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)
PREEMPTED_EXIT_CODE = 3  # distinct from failures: the launcher requeues the job on this code


class Preempted(Exception):
    """Raised after a checkpoint was written in response to a preemption signal."""

    def __init__(self, step: int, signum: int | None):
        name = signal.Signals(signum).name if signum else "signal"
        super().__init__(f"{name} received: checkpoint saved at step {step}; rerun the same command to resume")
        self.step = step


class PreemptionGuard:
    def __init__(self, signals=PREEMPTION_SIGNALS):
        self.signals = signals
        self.received: int | None = None
        self._previous = {}

    def __enter__(self) -> "PreemptionGuard":
        for sig in self.signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals cannot be caught here
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.received is None:  # the first signal is the cause; a relayed or repeated one adds nothing
            self.received = signum

    def should_stop(self) -> bool:
        """True on every rank if any rank was signalled (a collective call when distributed)."""
        flag = self.received is not None
        if dist.is_available() and dist.is_initialized():
            t = torch.tensor([1 if flag else 0], dtype=torch.int32)
            if dist.get_backend() == "nccl":
                t = t.cuda()
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        return flag
