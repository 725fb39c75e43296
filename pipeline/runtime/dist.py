"""Rank, world size and array task: one place that understands torchrun and SLURM.

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT; `srun` with one task per
process sets SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID. DeepSpeed and torch.distributed only read
the former, so `init_distributed` translates SLURM variables before creating the process group.
"""
from __future__ import annotations

import datetime
import os
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def detect_env(environ: dict | None = None) -> DistEnv:
    """Read rank/world from torchrun variables, else SLURM's, else a single process."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1:
        return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return DistEnv()


def job_label(environ=None) -> str:
    """The SLURM job ("JOBID", or "ARRAYJOB_TASK" for an array task) when under SLURM, else ""."""
    env = os.environ if environ is None else environ
    if env.get("SLURM_ARRAY_JOB_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '')}"
    return env.get("SLURM_JOB_ID", "")


def _slurm_master_addr(env) -> str:
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        return "127.0.0.1"
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return nodelist.split(",")[0]


def _tasks_on_this_node(env) -> int:
    """Ranks on this node under srun: SLURM_STEP_TASKS_PER_NODE is "8", "8(x2)" or "8,7" (one
    entry per node, in SLURM_NODEID order, a count "(xN)" repeating an entry N times)."""
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or ""
    counts = []
    for part in spec.split(","):
        number, _, repeat = part.partition("(x")
        if number.strip().isdigit():
            counts += [int(number)] * (int(repeat.rstrip(")")) if repeat else 1)
    node = int(env.get("SLURM_NODEID", "0") or 0)
    return counts[node] if node < len(counts) else int(env.get("SLURM_NTASKS", "1"))


def slurm_torch_env(env) -> dict:
    """torchrun's variables for an srun task: what torch.distributed and DeepSpeed read, and
    LOCAL_WORLD_SIZE / NODE_RANK, which mosaicml-streaming uses to tell the ranks of one node apart
    (without it every rank believes it is alone on its node and they collide in shared memory)."""
    dist_env = detect_env(env)
    return {"RANK": str(dist_env.rank), "WORLD_SIZE": str(dist_env.world_size), "LOCAL_RANK": str(dist_env.local_rank),
            "LOCAL_WORLD_SIZE": str(_tasks_on_this_node(env)), "NODE_RANK": env.get("SLURM_NODEID", "0"),
            "MASTER_ADDR": env.get("MASTER_ADDR") or _slurm_master_addr(env),
            "MASTER_PORT": env.get("MASTER_PORT") or str(29500 + int(env.get("SLURM_JOB_ID", "0") or 0) % 1000)}


def init_distributed(timeout_s: float = 1800.0) -> DistEnv:
    """Create the default process group when there is more than one rank (idempotent).

    `timeout_s` (launcher.collective_timeout_s) bounds the rendezvous and every collective: a rank
    whose peer node hangs fails after that long instead of waiting forever."""
    env = detect_env()
    if not env.is_distributed or torch_dist.is_initialized():
        return env
    if "RANK" not in os.environ:  # launched by srun: export what torch.distributed expects
        os.environ.update(slurm_torch_env(os.environ))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    torch_dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return env


def is_main_process() -> bool:
    """Rank 0 of the process group, or the only process."""
    return not (torch_dist.is_available() and torch_dist.is_initialized()) or torch_dist.get_rank() == 0


def barrier() -> None:
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.barrier()


def all_gather_objects(obj):
    """Gather one picklable object from every rank (a list of one when not distributed)."""
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return [obj]
    out = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=src)
    return box[0]


def device_for(env: DistEnv) -> torch.device:
    return torch.device("cuda", env.local_rank) if torch.cuda.is_available() else torch.device("cpu")


def resolve_precision(precision: str, device: torch.device) -> str:
    """A config's `precision` ("auto", "fp32" or "bf16") as "fp32" or "bf16": auto is bf16 on a
    GPU (autocast) and fp32 on the CPU."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision
