"""Training checkpoints as step folders, published atomically, for every engine and world size.

Layout (DIR is e.g. RUN_DIR/train_tokenizer/checkpoints):

    DIR/step_00001200/               one complete checkpoint
        complete.json                written last: {"step", "engine", "world_size", "zero_stage",
                                     "files": {relative path: bytes}} of every other file
        client_rank_00000.pt ...     per-rank client state (step, reader position, RNG states)
        ...                          the engines' files: DDP's `<name>.pt` from rank 0, DeepSpeed's
                                     sharded `<name>/` directories written by every rank

Saving (`with manager.saving(step, meta) as folder:` on every rank): all ranks write into one
temp folder `.step_00001200.<token>.tmp` (the token is drawn on rank 0 and broadcast, so every
rank of this job writes to the same folder and no other job shares it), a barrier, then rank 0
lists the files with their sizes into `complete.json` and renames the temp folder to its final
name (one atomic rename on a shared filesystem), drops all but the newest `keep`, and a last
barrier. Before writing, rank 0 checks the filesystem has room for another checkpoint the size of
the newest one (a full disk is an error naming the folder and the sizes, not torch's "unexpected
pos"). A killed save leaves `.step_*.tmp` behind: the next run removes them when it loads, which
is safe because the stage lock (pipeline/runner/lock.py) lets only one job write in this folder.

Loading (`manager.candidates()`): the newest step folder whose record matches the files on disk
(every listed file present with its size) comes first; each incomplete one is skipped with a
warning naming it and the reason. The caller loads from it and calls `manager.skip(...)` with the
reason if loading fails, then tries the next. `torch.load` goes through `load_pt`
(weights_only=True): a checkpoint holds tensors, containers and primitives, never pickled objects.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Iterator

import torch

from ..runtime.dist import barrier, broadcast_object
from ..runtime.io import atomic_write_json, read_json

RECORD = "complete.json"
_NAME = re.compile(r"^step_(\d{8})$")


class IncompatibleCheckpoint(RuntimeError):
    """A complete checkpoint that this run cannot resume (other engine, zero stage or world size)."""


def _disk_is_full(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free < (1 << 20)
    except OSError:
        return False


def load_pt(path: str | Path, map_location="cpu"):
    return torch.load(path, map_location=map_location, weights_only=True)


def _is_main() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def list_files(folder: Path) -> dict[str, int]:
    """Every regular file under `folder` (relative POSIX path -> bytes), the record excepted."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != RECORD:
            files[path.relative_to(folder).as_posix()] = path.stat().st_size
    return files


class CheckpointManager:
    def __init__(self, folder: str | Path, keep: int = 2, logger: logging.Logger | None = None):
        self.folder = Path(folder)
        self.keep = keep
        self.logger = logger or logging.getLogger("tessera")

    def path_for(self, step: int) -> Path:
        return self.folder / f"step_{step:08d}"

    def steps(self) -> list[int]:
        """Steps of the step folders present, newest first (complete or not)."""
        if not self.folder.is_dir():
            return []
        found = [int(m.group(1)) for p in self.folder.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
        return sorted(found, reverse=True)

    # ----- saving ------------------------------------------------------------------------
    @contextlib.contextmanager
    def saving(self, step: int, meta: dict) -> Iterator[Path]:
        """Collective: every rank writes its files into the yielded temp folder; on exit the
        folder is published as `step_<step, 8 digits>` with its completion record (meta + file sizes)."""
        token = broadcast_object(f"{uuid.uuid4().hex[:12]}-{os.getpid()}" if _is_main() else None)
        tmp = self.folder / f".step_{step:08d}.{token}.tmp"
        problem = None
        if _is_main():
            try:
                tmp.mkdir(parents=True)
                self._check_free_space()
            except OSError as err:
                problem = (err.errno, err.strerror, err.filename)
        problem = broadcast_object(problem)
        if problem is not None:
            if _is_main():
                shutil.rmtree(tmp, ignore_errors=True)
            raise OSError(*problem)
        try:
            yield tmp
        except BaseException as err:
            full = _is_main() and _disk_is_full(self.folder)
            if _is_main():  # this job's own temp folder (no barrier: other ranks may be elsewhere)
                shutil.rmtree(tmp, ignore_errors=True)
            if full and not isinstance(err, OSError):  # e.g. torch.save's "unexpected pos ..."
                raise OSError(errno.ENOSPC, f"no space left while saving a checkpoint ({err})", str(tmp)) from err
            raise
        barrier()  # every rank's files are written (and closed) before they are listed
        if _is_main():
            self._publish(step, tmp, meta)
        barrier()

    def _check_free_space(self) -> None:
        """Room for one more checkpoint the size of the newest complete one (plus 5%)?"""
        newest = next((step for step in self.steps() if self.check_files(step) is None), None)
        if newest is None:
            return  # the first save: nothing to size it by
        need = int(1.05 * sum(read_json(self.path_for(newest) / RECORD)["files"].values()))
        free = shutil.disk_usage(self.folder).free
        if free < need:
            raise OSError(errno.ENOSPC, f"no space left for a checkpoint: it needs ~{need / 2**20:.1f} MiB "
                                        f"(the size of step {newest}), {free / 2**20:.1f} MiB are free",
                          str(self.folder))

    def _publish(self, step: int, tmp: Path, meta: dict) -> None:
        for path in tmp.rglob("*"):
            if path.is_file():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
        atomic_write_json(tmp / RECORD, {"step": step, **meta, "files": list_files(tmp)})
        final = self.path_for(step)
        if final.exists():  # e.g. an incomplete folder of this step from before a crash
            old = tmp.with_name(tmp.name[:-len(".tmp")] + ".old.tmp")
            final.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        tmp.rename(final)
        _fsync_dir(self.folder)
        for stale in self.steps()[self.keep:]:
            shutil.rmtree(self.path_for(stale), ignore_errors=True)

    # ----- loading -----------------------------------------------------------------------
    def check_files(self, step: int) -> str | None:
        """Why step folder `step` is incomplete (None: every recorded file is there with its size)."""
        folder = self.path_for(step)
        try:
            record = read_json(folder / RECORD)
        except (OSError, ValueError) as err:
            return f"no readable {RECORD} ({type(err).__name__}); the save did not finish"
        if not isinstance(record, dict) or record.get("step") != step or not isinstance(record.get("files"), dict):
            return f"{RECORD} does not describe step {step}"
        for rel, size in record["files"].items():
            path = folder / rel
            if not path.is_file():
                return f"{rel} is missing"
            if path.stat().st_size != size:
                return f"{rel} is truncated or changed ({path.stat().st_size} bytes, {size} recorded)"
        return None

    def check(self, step: int, meta: dict) -> str | None:
        """Why step folder `step` cannot be used (None: complete). Raises IncompatibleCheckpoint
        for a complete one written by another engine / zero stage / world size."""
        reason = self.check_files(step)
        if reason is not None:
            return reason
        folder = self.path_for(step)
        record = read_json(folder / RECORD)
        wrong = {k: (record.get(k), v) for k, v in meta.items() if record.get(k) != v}
        if wrong:
            raise IncompatibleCheckpoint(
                f"checkpoint {folder} was written with " + ", ".join(f"{k}={a}" for k, (a, _) in wrong.items())
                + "; this run has " + ", ".join(f"{k}={b}" for k, (_, b) in wrong.items())
                + f": resume with the same settings, or rerun with --force, which deletes the checkpoints in "
                f"{self.folder} and starts over")
        return None

    def candidates(self, meta: dict) -> Iterator[tuple[int, Path]]:
        """Complete step folders, newest first; incomplete ones are skipped with a warning.
        Rank 0 decides and broadcasts, so all ranks walk the same list."""
        self._remove_stale_temps()
        for step in self.steps():
            reason = None
            if _is_main():
                try:
                    reason = self.check(step, meta)
                except IncompatibleCheckpoint as err:
                    reason = ("incompatible", str(err))
            reason = broadcast_object(reason)
            if isinstance(reason, (list, tuple)):
                raise IncompatibleCheckpoint(reason[1])
            if reason is not None:
                self.skip(step, reason)
                continue
            yield step, self.path_for(step)

    def skip(self, step: int, reason: str) -> None:
        self.logger.warning("checkpoint %s skipped: %s; using an older one", self.path_for(step), reason)

    def _remove_stale_temps(self) -> None:
        """Temp folders of saves that were killed; only this job writes here (the stage lock)."""
        if _is_main() and self.folder.is_dir():
            for path in sorted(self.folder.iterdir()):
                if path.name.startswith(".step_") and path.name.endswith(".tmp"):
                    self.logger.info("removing %s, left by an interrupted checkpoint save", path)
                    shutil.rmtree(path, ignore_errors=True)


def resume_newest(checkpoints: "CheckpointManager", meta: dict, load) -> bool:
    """Load the newest checkpoint that matches `meta` through `load(folder)` on every rank; a
    folder any rank fails to read is skipped with a warning and the next older one is tried.
    Collective. IncompatibleCheckpoint becomes a StageError (another config wrote them)."""
    from ..runtime.dist import all_gather_objects
    from ..runtime.errors import StageError

    try:
        for step, folder in checkpoints.candidates(meta):
            error = None
            try:
                load(folder)
            except Exception as err:  # a corrupt file raises several different error types
                error = f"could not be loaded ({type(err).__name__}: {err})"
            errors = [e for e in all_gather_objects(error) if e]
            if not errors:
                return True
            checkpoints.skip(step, errors[0])
    except IncompatibleCheckpoint as err:
        raise StageError(str(err)) from None
    return False
