"""The run directory: one folder per run, one sub-folder per stage, `done.json` written last.

    RUN_DIR/config.yaml                effective config of the latest invocation
    RUN_DIR/<stage>/attempt.json       config hash + input hashes of the work in progress
    RUN_DIR/<stage>/done.json          written last and atomically when the stage completes
    RUN_DIR/<stage>/log.txt            the stage's log (all invocations, appended)
    RUN_DIR/tensorboard/<stage>/       TensorBoard events
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config.schema import ConfigError
from ..runtime.io import atomic_write_json, read_json
from .lock import is_lock_file

STAGE_NAMES = ("shard", "train_tokenizer", "precompute_codes", "train_prior", "sample", "score")


def check_run_dir_name(run_dir: str | Path, *, slurm: bool = False) -> None:
    """Refuse a run directory whose name holds a control character: the name travels into sbatch
    scripts (`#SBATCH --output=...`, the job's command line) and log lines, where a newline would
    start a line of shell code of its own. `slurm`: the name also becomes SLURM's output file
    names, where '%' starts a placeholder (%j, %A, %x, ...), so it is refused too."""
    text = str(run_dir)
    bad = next((c for c in text if ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        raise ConfigError(f"--run-dir {text!r}: the name contains the control character {bad!r}; "
                          f"choose a name without control characters (newlines, tabs, escapes)")
    if slurm and "%" in text:
        raise ConfigError(f"--run-dir {text!r}: the path contains '%', which SLURM reads in its output file "
                          f"names as a placeholder (%j: the job id, %x: the job name); choose a path without '%'")


@dataclass
class StageState:
    name: str
    state: str            # "done" | "partial" | "not started"
    done: dict | None     # contents of done.json when done


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def done_path(self, stage: str) -> Path:
        return self.stage_dir(stage) / "done.json"

    def attempt_path(self, stage: str) -> Path:
        return self.stage_dir(stage) / "attempt.json"

    def read_done(self, stage: str) -> dict | None:
        path = self.done_path(stage)
        if not path.is_file():
            return None
        try:
            return read_json(path)
        except (ValueError, OSError):  # ValueError: CorruptFileError
            return None  # unreadable done.json: treat the stage as not finished

    def read_attempt(self, stage: str) -> dict | None:
        path = self.attempt_path(stage)
        try:
            return read_json(path) if path.is_file() else None
        except (ValueError, OSError):  # ValueError: CorruptFileError
            return None

    def write_attempt(self, stage: str, fingerprint: dict) -> None:
        atomic_write_json(self.attempt_path(stage), fingerprint)

    def write_done(self, stage: str, record: dict) -> None:
        atomic_write_json(self.done_path(stage), record)

    def state(self, stage: str) -> StageState:
        done = self.read_done(stage)
        if done is not None:
            return StageState(stage, "done", done)
        folder = self.stage_dir(stage)
        has_work = folder.is_dir() and any(p.name != "log.txt" and not is_lock_file(p.name) for p in folder.iterdir())
        return StageState(stage, "partial" if has_work else "not started", None)

    def states(self) -> list[StageState]:
        return [self.state(name) for name in STAGE_NAMES]
