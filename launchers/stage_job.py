"""The callable every `tessera submit` job runs: one stage (one array task), in a child process.

Why a child process: the stage runs exactly as `tessera stage NAME CONFIG --run-dir D ...` does on
the command line (same code path, same exit codes, torch imported fresh), while this parent, which
submitit started, keeps its signal handlers and decides about requeueing. The child inherits the
SLURM variables of its srun task, so `pipeline/runtime/dist.py` finds its rank and the rendezvous host.

Preemption and time limits (submitit sends USR2 `launcher.signal_delay_s` before the limit, and on
`scancel --signal=USR2`): the signal reaches every process of the step, so the child's trainer
checkpoints and exits with code 3 while submitit calls `checkpoint()` here on rank 0; that waits
for the child to finish its checkpoint, then hands submitit this same job to requeue. A TERM or USR1
that makes the child exit with code 3 without submitit's handler (a plain preemption) requeues the
job from `__call__`. Requeues are bounded by `launcher.max_requeues` (SLURM_RESTART_COUNT) and each
is logged to RUN_DIR/slurm/events.jsonl and to the job's output.

Nothing here imports torch: the parent stays small.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import submitit

PREEMPTED_EXIT_CODE = 3          # pipeline/train/signals.py: checkpoint written, resume by rerunning
CHILD_CHECKPOINT_WAIT_S = 600.0  # how long checkpoint() waits for the stage to write its checkpoint
REQUEUE_KILL_WAIT_S = 300.0      # after `scontrol requeue`, SLURM kills this job; wait for that


def restart_count() -> int:
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    except ValueError:
        return 0


def log_event(run_dir: str | Path, record: dict) -> None:
    """Append one JSON line to RUN_DIR/slurm/events.jsonl (O_APPEND: whole lines, any number of jobs)."""
    path = Path(run_dir) / "slurm" / "events.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **record}, sort_keys=True) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


class StageJob(submitit.helpers.Checkpointable):
    """`tessera stage NAME CONFIG --run-dir RUN_DIR --num-tasks N --task-id I OVERRIDES`, as a job.

    All arguments travel in submitit's pickle (no shell involved); `repo` is the checkout whose
    code the job runs (put first on PYTHONPATH and used as the working directory)."""

    def __init__(self, stage: str, config: str, run_dir: str, overrides: list[str], *, repo: str, python: str,
                 num_tasks: int = 1, max_requeues: int = 5, local_port: int | None = None):
        self.stage, self.config, self.run_dir = stage, config, run_dir
        self.overrides = list(overrides)
        self.repo, self.python = repo, python
        self.num_tasks, self.max_requeues = num_tasks, max_requeues
        self.local_port = local_port  # --executor local with several ranks: the rendezvous port
        self._reset_runtime()

    def _reset_runtime(self) -> None:
        self._child: subprocess.Popen | None = None
        self._returncode: int | None = None
        self._requeue_requested = False

    def __getstate__(self) -> dict:  # the running child is not part of what is pickled for a requeue
        state = dict(self.__dict__)
        for key in ("_child", "_returncode", "_requeue_requested"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset_runtime()

    def command(self, task_id: int) -> list[str]:
        return [self.python, "-m", "pipeline.cli", "stage", self.stage, self.config, "--run-dir", self.run_dir,
                "--num-tasks", str(self.num_tasks), "--task-id", str(task_id), *self.overrides]

    def child_env(self) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([self.repo] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        env["PYTHONUNBUFFERED"] = "1"
        if os.environ.get("SUBMITIT_EXECUTOR") == "local":
            # No SLURM variables here: give the ranks torchrun's, which pipeline/runtime/dist.py reads first.
            job_env = submitit.JobEnvironment()
            if job_env.num_tasks > 1:
                env.update(RANK=str(job_env.global_rank), WORLD_SIZE=str(job_env.num_tasks),
                           LOCAL_RANK=str(job_env.local_rank), LOCAL_WORLD_SIZE=str(job_env.num_tasks),
                           MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(self.local_port or 29500))
        return env

    def __call__(self, task_id: int = 0) -> int:
        job_env = submitit.JobEnvironment()
        if restart_count() and job_env.global_rank == 0:
            print(f"[tessera] {self.stage}: restart {restart_count()} of job {job_env.job_id}; resuming", flush=True)
        self._child = subprocess.Popen(self.command(task_id), cwd=self.repo, env=self.child_env())
        # A thread reaps the child so that a signal handler (checkpoint()) never has to call
        # Popen.wait while the main thread is inside it (Popen's internal lock is not reentrant).
        threading.Thread(target=self._reap, daemon=True).start()
        while self._returncode is None:
            time.sleep(0.2)
        rc = self._returncode
        if rc == 0:
            return 0
        if rc == PREEMPTED_EXIT_CODE and os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
            if job_env.global_rank != 0:
                return rc  # rank 0 (or submitit's handler there) requeues the job; only its result counts
            self._requeue_self(job_env, "the stage was signalled (TERM/USR1) and saved a checkpoint")
        raise RuntimeError(f"stage {self.stage} (task {task_id}) exited with code {rc}; see "
                           f"{Path(self.run_dir) / self.stage / 'log.txt'}")

    def _reap(self) -> None:
        self._returncode = self._child.wait()

    def _wait_child(self, timeout_s: float) -> int | None:
        deadline = time.monotonic() + timeout_s
        while self._returncode is None and time.monotonic() < deadline:
            time.sleep(0.2)
        return self._returncode

    def checkpoint(self, *args, **kwargs):
        """submitit's handler (rank 0, on USR2): let the stage save, then requeue this same job.

        Returning None means "do not requeue": submitit then ends the job as failed."""
        self._requeue_requested = True
        if self._child is not None and self._returncode is None:
            # The step's processes got the signal already; this covers a signal sent to us alone. It
            # relays the same signal (submitit's USR2), so the stage reports one cause whichever lands first.
            try:
                self._child.send_signal(signal.SIGUSR2)
            except ProcessLookupError:
                pass
        rc = self._wait_child(CHILD_CHECKPOINT_WAIT_S)
        if rc == 0:
            # Requeueing anyway is harmless (the rerun finds the stage done and skips it), whereas
            # refusing would make submitit record this finished job as failed.
            print(f"[tessera] {self.stage}: finished before the signal took effect; the requeued job will skip it",
                  flush=True)
        count = restart_count()
        job_id = os.environ.get("SLURM_JOB_ID", "")
        if count >= self.max_requeues:
            log_event(self.run_dir, {"stage": self.stage, "job": job_id, "event": "not requeued",
                                     "restarts": count, "reason": f"launcher.max_requeues={self.max_requeues} reached"})
            print(f"[tessera] {self.stage}: not requeued: {count} restarts already "
                  f"(launcher.max_requeues={self.max_requeues})", flush=True, file=sys.stderr)
            return None
        log_event(self.run_dir, {"stage": self.stage, "job": job_id, "event": "requeue", "restarts": count + 1,
                                 "child_exit": rc, "reason": "preemption or time-limit signal (submitit)"})
        print(f"[tessera] {self.stage}: checkpoint written (exit {rc}); requeueing job {job_id} "
              f"(restart {count + 1} of at most {self.max_requeues})", flush=True)
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)

    def _requeue_self(self, job_env, reason: str) -> None:
        """The stage saved and stopped without submitit's signal: requeue from here (rank 0), bounded."""
        count = restart_count()
        if self._requeue_requested:
            time.sleep(REQUEUE_KILL_WAIT_S)  # submitit's handler is requeueing; SLURM kills us
            return
        state = _slurm_job_state(job_env.job_id)
        if count >= self.max_requeues or state not in ("RUNNING", "COMPLETING", ""):
            why = f"launcher.max_requeues={self.max_requeues} reached" if count >= self.max_requeues \
                else f"job state {state}"
            log_event(self.run_dir, {"stage": self.stage, "job": job_env.job_id, "event": "not requeued",
                                     "restarts": count, "reason": why})
            return
        log_event(self.run_dir, {"stage": self.stage, "job": job_env.job_id, "event": "requeue",
                                 "restarts": count + 1, "reason": reason})
        print(f"[tessera] {self.stage}: {reason}; requeueing job {job_env.job_id} (restart {count + 1} of at most "
              f"{self.max_requeues})", flush=True)
        subprocess.run(["scontrol", "requeue", job_env.job_id], check=False, timeout=60)
        time.sleep(REQUEUE_KILL_WAIT_S)


def _slurm_job_state(job_id: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    for field in out.stdout.split():
        if field.startswith("JobState="):
            return field.split("=", 1)[1]
    return ""
