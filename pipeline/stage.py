"""Running one stage: the shared shape every stage has.

A stage module in `stages/` declares `NAME`, `SECTIONS` (config sections it depends on; optional
`IGNORED_KEYS`: dotted keys in them that do not affect its outputs),
`input_fingerprints(ctx)` (hashes of what it reads from earlier stages) and `run(ctx)`. The
runner here does everything around it, identically for every stage:

1. logging to RUN_DIR/<stage>/log.txt and the process group (torchrun / srun ranks);
2. skip when done.json matches the config and inputs; refuse when they changed (unless --force);
3. record attempt.json so a partial stage rerun with a different config is refused too;
4. call run(ctx) on every rank; rank 0 writes done.json last, atomically.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import platform
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch

from .config import Config
from .errors import StageError  # noqa: F401  (re-exported: stages raise it)
from .dist import DistEnv, barrier, broadcast_object, device_for, init_distributed
from .io import atomic_write_text
from .logs import setup_logging
from .rundir import STAGE_NAMES, RunDir

VERSIONED_PACKAGES = ("tessera", "torch", "deepspeed", "webdataset", "mosaicml-streaming", "torch-fidelity")


@dataclass
class StageResult:
    counts: dict = field(default_factory=dict)    # e.g. images, shards, rejected
    metrics: dict = field(default_factory=dict)   # e.g. psnr, throughput
    outputs: dict = field(default_factory=dict)   # file name -> sha256 of what later stages read


@dataclass
class StageContext:
    cfg: Config
    run_dir: Path
    stage_dir: Path
    env: DistEnv
    num_tasks: int
    task_id: int
    logger: logging.Logger
    device: torch.device

    @property
    def worker(self) -> int:
        """This process's index among all workers of the stage (array tasks x ranks)."""
        return self.task_id * self.env.world_size + self.env.rank

    @property
    def num_workers(self) -> int:
        return self.num_tasks * self.env.world_size


@dataclass
class StageOutcome:
    name: str
    status: str           # "done" | "skipped" | "task-done" (array task finished, stage still incomplete)
    record: dict | None = None


def load_stage_module(name: str):
    if name not in STAGE_NAMES:
        raise StageError(f"unknown stage {name!r}; stages are: {', '.join(STAGE_NAMES)}")
    try:
        return importlib.import_module(f"stages.{name}")
    except ModuleNotFoundError as err:
        if err.name == f"stages.{name}":
            raise StageError(f"stage {name!r} is not implemented in this version of tessera") from None
        raise


def available_stages() -> list[str]:
    return [n for n in STAGE_NAMES if importlib.util.find_spec(f"stages.{n}") is not None]


def package_versions() -> dict:
    versions = {"python": platform.python_version()}
    for pkg in VERSIONED_PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return versions


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.TimeoutExpired):
        return ""


def _fingerprint(module, ctx: StageContext) -> dict:
    config_hash = ctx.cfg.section_hash(module.SECTIONS, ignore=getattr(module, "IGNORED_KEYS", ()))
    return {"config_hash": config_hash, "inputs": module.input_fingerprints(ctx)}


def _changed_parts(old: dict, new: dict) -> list[str]:
    parts = []
    if old.get("config_hash") != new["config_hash"]:
        parts.append("config sections " + ", ".join(new.get("sections", [])))
    if old.get("inputs") != new["inputs"]:
        parts.append("inputs " + ", ".join(sorted(set(old.get("inputs", {})) | set(new["inputs"]))))
    return parts


def _clear_stage_dir(stage_dir: Path) -> None:
    for path in stage_dir.iterdir():
        if path.name == "log.txt":
            continue
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def run_stage(name: str, cfg: Config, run_dir: str | Path, *, force: bool = False, num_tasks: int = 1,
              task_id: int = 0) -> StageOutcome:
    module = load_stage_module(name)
    run = RunDir(run_dir)
    stage_dir = run.stage_dir(name)
    stage_dir.mkdir(parents=True, exist_ok=True)
    logger = setup_logging(stage_dir / "log.txt")
    env = init_distributed()
    if not 0 <= task_id < num_tasks:
        raise StageError(f"--task-id {task_id} must be in [0, {num_tasks}) for --num-tasks {num_tasks}")
    ctx = StageContext(cfg=cfg, run_dir=run.root, stage_dir=stage_dir, env=env, num_tasks=num_tasks,
                       task_id=task_id, logger=logger, device=device_for(env))
    fingerprint = {**_fingerprint(module, ctx), "sections": list(module.SECTIONS)}

    # Decide on rank 0 and broadcast, so all ranks agree even if the file system is racy.
    decision = None
    if env.is_main:
        decision = _decide(run, name, fingerprint, force)
    decision = broadcast_object(decision)
    if decision["action"] == "refuse":
        raise StageError(decision["message"])
    if decision["action"] == "skip":
        logger.info("stage %s: already done with the same config and inputs; skipped", name)
        return StageOutcome(name, "skipped", run.read_done(name))
    if decision["action"] == "clear" and env.is_main:
        logger.info("stage %s: --force given; clearing previous outputs", name)
        _clear_stage_dir(stage_dir)
    if env.is_main:
        run.write_attempt(name, fingerprint)
        atomic_write_text(run.root / "config.yaml", cfg.to_yaml())
    barrier()

    logger.info("stage %s: starting (rank %d/%d, task %d/%d, device %s)", name, env.rank, env.world_size,
                task_id, num_tasks, ctx.device)
    start = time.time()
    result = module.run(ctx)
    barrier()
    if result is None:
        logger.info("stage %s: this task's part is finished; the stage completes when all tasks are done", name)
        return StageOutcome(name, "task-done")
    record = {
        "stage": name,
        "config_hash": fingerprint["config_hash"],
        "sections": fingerprint["sections"],
        "inputs": fingerprint["inputs"],
        "counts": result.counts,
        "metrics": result.metrics,
        "outputs": result.outputs,
        "wall_time_s": round(time.time() - start, 3),
        "world_size": env.world_size,
        "num_tasks": num_tasks,
        "versions": package_versions(),
        "git_commit": git_commit(),
    }
    if env.is_main:
        run.write_done(name, record)
        logger.info("stage %s: done in %.1f s; %s", name, record["wall_time_s"], json.dumps(result.counts))
    barrier()
    return StageOutcome(name, "done", record)


def _decide(run: RunDir, name: str, fingerprint: dict, force: bool) -> dict:
    done = run.read_done(name)
    previous = done if done is not None else run.read_attempt(name)
    if previous is None:
        return {"action": "run"}
    if force:
        return {"action": "clear"}
    changed = _changed_parts(previous, fingerprint)
    if not changed:
        return {"action": "skip"} if done is not None else {"action": "run"}  # same work: resume it
    what = "finished" if done is not None else "partially run"
    return {"action": "refuse", "message": (
        f"stage {name} was {what} in {run.stage_dir(name)} with different {' and '.join(changed)}; "
        f"rerun with --force to discard its outputs and start over, or use another --run-dir")}
