"""One writer per stage of a run directory (per array task for array stages), on shared cluster
filesystems too.

    RUN_DIR/<stage>/lock.json          the lease: host, pid, SLURM job, start and heartbeat times
    RUN_DIR/<stage>/.lock              guards reading + writing the lease for a few milliseconds
    (array stages: lock.task-K.json / .lock.task-K, one per task, so the tasks of an array run
    side by side while two processes of the same task cannot)

The guard is an `fcntl.lockf` record lock, which NFS and Lustre honour across nodes (flock is
node-local on some of them). Ownership itself is the lease, so a holder that died cannot block a
run forever: a lease is live while its heartbeat (refreshed every `heartbeat_s` by a thread of the
holder) is younger than `stale_after_s` and, when it names this host, while its pid exists. A
lease of a killed process on this host is taken over at once, one left by a dead node once it
goes stale. Only rank 0 of a job takes the lock; the other ranks follow rank 0's decision.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import socket
import threading
import time
import uuid
from pathlib import Path

from ..runtime.dist import job_label
from ..runtime.errors import StageError
from ..runtime.io import atomic_write_json, read_json

HEARTBEAT_S = float(os.environ.get("TESSERA_LOCK_HEARTBEAT_S", "30"))
STALE_AFTER_S = float(os.environ.get("TESSERA_LOCK_STALE_S", "300"))
_LOCK_FILE = re.compile(r"^(lock(\.task-\d+)?\.json|\.lock(\.task-\d+)?)$")


def is_lock_file(name: str) -> bool:
    """A lease or guard file (kept by --force, not counted as work by `tessera status`)."""
    return bool(_LOCK_FILE.match(name))


class LockHeld(StageError):
    """Another live process holds the stage; the message names it."""


def describe_holder(lease: dict) -> str:
    job = f", SLURM job {lease['job']}" if lease.get("job") else ""
    age = time.time() - float(lease.get("heartbeat", 0))
    return f"pid {lease.get('pid')} on {lease.get('host')}{job}, heartbeat {age:.0f} s ago"


def lease_is_live(lease: dict | None, stale_after_s: float = STALE_AFTER_S, now: float | None = None) -> bool:
    if not lease:
        return False
    now = time.time() if now is None else now
    if now - float(lease.get("heartbeat", 0)) > stale_after_s:
        return False
    if lease.get("host") == socket.gethostname():
        return _pid_alive(int(lease.get("pid", -1)))
    return True  # another node: only the heartbeat can tell


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except OSError as err:
        return err.errno == errno.EPERM  # exists, owned by someone else
    return True


def read_lease(path: Path) -> dict | None:
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


class StageLock:
    def __init__(self, stage_dir: str | Path, *, task_id: int = 0, num_tasks: int = 1,
                 heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S,
                 logger: logging.Logger | None = None):
        stage_dir = Path(stage_dir)
        suffix = f".task-{task_id}" if num_tasks > 1 else ""
        self.lease_path = stage_dir / f"lock{suffix}.json"
        self.guard_path = stage_dir / f".lock{suffix}"
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.logger = logger or logging.getLogger("tessera")
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def _guarded(self):
        self.guard_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.guard_path, "a+") as f:
            fcntl.lockf(f, fcntl.LOCK_EX)  # blocks only while another process reads/writes the lease
            try:
                yield
            finally:
                fcntl.lockf(f, fcntl.LOCK_UN)

    def _lease(self, started: float) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "job": job_label(), "token": self.token,
                "started": started, "heartbeat": time.time()}

    def acquire(self) -> "StageLock":
        with self._guarded():
            lease = read_lease(self.lease_path)
            if lease_is_live(lease, self.stale_after_s) and lease.get("token") != self.token:
                raise LockHeld(
                    f"{self.lease_path.parent} is in use by {describe_holder(lease)} ({self.lease_path}); wait "
                    f"for it to finish or stop it. A lease from a process that died is taken over automatically "
                    f"(at once on the same host, after {self.stale_after_s:.0f} s of silence from another node).")
            if lease is not None:
                self.logger.warning("taking over the lock of %s: that process is gone", describe_holder(lease))
            self._started = time.time()
            atomic_write_json(self.lease_path, self._lease(self._started))
        self._thread = threading.Thread(target=self._beat, name="tessera-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                with self._guarded():
                    lease = read_lease(self.lease_path)
                    if lease is not None and lease.get("token") != self.token:
                        self.logger.error("the lock %s was taken over by %s while this process held it (was it "
                                          "frozen for over %.0f s?)", self.lease_path, describe_holder(lease),
                                          self.stale_after_s)
                        return
                    atomic_write_json(self.lease_path, self._lease(self._started))
            except OSError as err:  # a full or flaky filesystem: keep training, the next beat may work
                self.logger.warning("could not refresh the lock %s: %s", self.lease_path, err)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        try:
            with self._guarded():
                lease = read_lease(self.lease_path)
                if lease is not None and lease.get("token") == self.token:
                    self.lease_path.unlink(missing_ok=True)
        except OSError:
            pass  # e.g. a read-only run directory: the lease dies with this pid anyway

    def __enter__(self) -> "StageLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def live_holder(stage_dir: str | Path) -> dict | None:
    """The live lease of any task of a stage (for `tessera status`), or None."""
    stage_dir = Path(stage_dir)
    if not stage_dir.is_dir():
        return None
    for path in sorted(stage_dir.glob("lock*.json")):
        lease = read_lease(path)
        if lease_is_live(lease):
            return lease
    return None
