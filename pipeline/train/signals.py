"""Preemption: SIGUSR1 / SIGUSR2 / SIGTERM stop a stage quietly, with exit code 3.

SLURM sends TERM to every task when a job is cancelled, preempted or reaches its time limit, and,
if the job was submitted with `--signal=[B:]USR1@SECONDS`, USR1 that many seconds before the time
limit; submitit asks for USR2 (`--signal=USR2@90` by default) and requeues on it. SLURM signals
the whole process group, so DataLoader workers and helper processes get the signal too.

A guard is in one of two modes:
- deferred (a training loop): the handler only sets a flag; the loop polls `guard.should_stop()`
  at a step boundary, which all-reduces the flag so every rank checkpoints at the same step
  (DeepSpeed's save_checkpoint must be called on all ranks), then raises `Preempted` after saving;
- at once (everything else: model build, evaluation, rFID, the probe classifier, featurisation,
  export, data-parallel units): the handler raises `Interrupted` in the main thread right away.
  Nothing finished is lost: units and checkpoints are published atomically, so the rerun resumes.
A forked child inherits the handler: a DataLoader worker ignores the signal (its parent shuts it
down), any other child (a multiprocessing pool worker, which its pool terminates with SIGTERM)
takes the signal's default action. multiprocessing's resource tracker is started with these signals blocked, so a signal
to the group does not kill it (which made it warn of leaks and print a traceback per segment).
"""
from __future__ import annotations

import os
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


class Interrupted(BaseException):
    """Raised at once by a guard outside a training loop. A BaseException, like KeyboardInterrupt,
    so that `except Exception` (e.g. around a checkpoint load) does not take it for a failure."""

    def __init__(self, signum: int, doing: str):
        super().__init__(f"{signal.Signals(signum).name} received during {doing}: stopped; what was finished is "
                         f"kept (checkpoints, written units); rerun the same command to resume")


def shield_helper_processes(signals=PREEMPTION_SIGNALS) -> None:
    """Start multiprocessing's resource tracker (shared memory bookkeeping, used by the streaming
    readers) with `signals` blocked: it keeps the blocked mask, so a signal to the process group
    leaves it alive and it still cleans up when the stage exits. A no-op once it runs."""
    from multiprocessing import resource_tracker

    if not hasattr(signal, "pthread_sigmask"):
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        resource_tracker.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _forked_child_signalled(signum: int) -> None:
    from torch.utils.data import get_worker_info

    if get_worker_info() is not None:
        return  # a DataLoader worker: its parent decides, and shuts it down
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


class PreemptionGuard:
    def __init__(self, signals=PREEMPTION_SIGNALS, *, at_once: bool = False, doing: str = "the stage"):
        self.signals = signals
        self.received: int | None = None
        self.at_once = at_once
        self.doing = doing
        self._previous = {}
        self._owner = os.getpid()
        self._raised = False

    def defer(self) -> None:
        """From now on a signal waits for the loop's next `should_stop()` (a step boundary)."""
        self.at_once = False

    def act_at_once(self, doing: str) -> None:
        """From now on a signal stops at once; one that came while deferred stops now."""
        self.at_once, self.doing = True, doing
        if self.received is not None:
            self._raised = True
            raise Interrupted(self.received, doing)

    def __enter__(self) -> "PreemptionGuard":
        shield_helper_processes(self.signals)
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
        if os.getpid() != self._owner:
            _forked_child_signalled(signum)
            return
        if self.received is None:  # the first signal is the cause; a relayed or repeated one adds nothing
            self.received = signum
        if self.at_once and not self._raised:  # once: a relayed second signal must not interrupt the unwinding
            self._raised = True
            raise Interrupted(self.received, self.doing)

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
