"""Logging with a `[rank r/w]` prefix to the console and to RUN_DIR/<stage>/log.txt, plus the
one TensorBoard writer helper (RUN_DIR/tensorboard/<stage>)."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from .dist import detect_env

LOGGER_NAME = "tessera"


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)


def setup_logging(log_file: str | Path | None = None, level: int = logging.INFO) -> logging.Logger:
    """(Re)configure the tessera logger: console (main rank at INFO, others WARNING) + file."""
    env = detect_env()
    fmt = logging.Formatter(
        f"%(asctime)s [rank {env.rank}/{env.world_size}] %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
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
        file_handler = logging.FileHandler(log_file, mode="a", encoding="utf-8")
        file_handler.setFormatter(fmt)
        logger.addHandler(file_handler)
    return logger


def tensorboard_writer(run_dir: str | Path, stage: str, enabled: bool = True):
    """SummaryWriter under RUN_DIR/tensorboard/<stage> on the main rank; None elsewhere."""
    if not enabled or not detect_env().is_main:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard" / stage))
