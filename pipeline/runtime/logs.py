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


def tensorboard_writer(run_dir: str | Path, stage: str, enabled: bool = True):
    """SummaryWriter under RUN_DIR/tensorboard/<stage> on the main rank; None elsewhere."""
    if not enabled or not detect_env().is_main:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard" / stage))
