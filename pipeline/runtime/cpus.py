"""How many CPU cores this rank may use, and DataLoader workers capped by them.

The presets ask for the workers a cluster node has (8 per GPU); on a 2-core laptop or a SLURM job
with --cpus-per-task=2 that many workers only contend for the same cores (and torch warns once per
loader). The usable count is the smallest of: the cores this process is allowed to run on
(os.sched_getaffinity: cgroups, taskset, srun binding) shared among the ranks on the node, and
SLURM's cpus-per-task for this task.
"""
from __future__ import annotations

import logging
import os


def usable_cpus(environ=None) -> int:
    environ = os.environ if environ is None else environ
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_rank = cores // max(1, int(environ.get("LOCAL_WORLD_SIZE", "1")))
    slurm = environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        per_rank = min(per_rank, int(slurm))
    return max(1, per_rank)


def capped_workers(requested: int, logger: logging.Logger | None = None, environ=None) -> int:
    """DataLoader workers for `requested`: at most one per usable core besides the main process."""
    cap = usable_cpus(environ) - 1
    if requested <= cap:
        return requested
    if logger is not None:
        logger.info("data.num_workers=%d capped to %d: this rank may use %d CPU core(s)", requested, cap, cap + 1)
    return cap
