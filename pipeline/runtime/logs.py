"""Logging to the console and to RUN_DIR/<stage>/log.txt, plus the one TensorBoard writer helper
(RUN_DIR/tensorboard/<stage>).

Every line names its process: `[host job 4711 rank 0/2]` under SLURM, `[host pid 1234 rank 0/2]`
otherwise, so the lines of two jobs that met in one run directory can be told apart.
"""
from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path

from .dist import detect_env, job_label

LOGGER_NAME = "tessera"


class _StageLogFile(logging.FileHandler):
    """A log file that never turns a full or read-only disk into a traceback of its own: the
    error that caused it reaches the user through the console and the CLI's error line."""

    def handleError(self, record: logging.LogRecord) -> None:
        return  # deliberately silent: the write failure is the disk's, already reported elsewhere


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)


def setup_logging(log_file: str | Path | None = None, level: int = logging.INFO) -> logging.Logger:
    """(Re)configure the tessera logger: console (main rank at INFO, others WARNING) + file."""
    env = detect_env()
    job = job_label()
    who = f"{socket.gethostname()} {f'job {job}' if job else f'pid {os.getpid()}'} rank {env.rank}/{env.world_size}"
    fmt = logging.Formatter(f"%(asctime)s [{who}] %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logger = get_logger()
    logger.setLevel(level)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    console.setLevel(level if env.is_main else logging.WARNING)
    logger.addHandler(console)
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        file_handler = _StageLogFile(log_file, mode="a", encoding="utf-8", delay=True)
        file_handler.setFormatter(fmt)
        logger.addHandler(file_handler)
    return logger


class ResumableWriter:
    """A TensorBoard SummaryWriter that knows the run may be a resumed one.

    A killed run logged the steps after its last checkpoint; the resumed run logs them again. The
    trainer calls `resume_from(step)` once it knows the step it resumed from, and the event file is
    opened then (on first use) with `purge_step=step + 1`: TensorBoard drops every earlier event
    from that step on, so each step is shown once instead of a zig-zag after every preemption."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.purge_step: int | None = None
        self._writer = None

    def resume_from(self, step: int) -> None:
        if self._writer is None:  # set before the first event, as the trainers do
            self.purge_step = step + 1

    def _open(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=self.purge_step)
        return self._writer

    def add_scalar(self, tag: str, value, step: int) -> None:
        self._open().add_scalar(tag, value, step)

    def add_image(self, tag: str, image, step: int) -> None:
        self._open().add_image(tag, image, step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def tensorboard_writer(run_dir: str | Path, stage: str, enabled: bool = True) -> ResumableWriter | None:
    """The writer of RUN_DIR/tensorboard/<stage> on the main rank; None elsewhere."""
    if not enabled or not detect_env().is_main:
        return None
    return ResumableWriter(Path(run_dir) / "tensorboard" / stage)
