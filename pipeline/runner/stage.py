"""Running one stage: the shared shape every stage has.

A stage module in `stages/` is wiring that declares its contract; the runner enforces it:

    NAME = "precompute_codes"
    INPUTS = {"shard": ("manifest.json",), "train_tokenizer": ("tokenizer.safetensors",)}
    def run(ctx) -> StageResult | None

INPUTS names the earlier stages it reads and, for each, the output files it reads: the stage runs
only when they are done, and the hashes their done.json recorded for those files are its input
fingerprints. The config it reads is declared on the config keys themselves (option(affects=...)
in pipeline/config): the runner hashes exactly the keys that name the stage. Optional:
`external_inputs(ctx)` (fingerprints of what it reads from outside the run: source images, a
reference file), `check_inputs(ctx)` (raises StageError for a bad user-supplied file; run before
the attempt is recorded, so it does not block the corrected rerun), `check_config(cfg)` (raises
ConfigError; run for every stage of `tessera run` before the first starts) and
`verify_outputs(stage_dir)` (raises StageError; run when a finished stage is skipped and by
`tessera verify`, after the files done.json hashed were checked).

The runner does everything around them, identically for every stage:

1. logging to RUN_DIR/<stage>/log.txt and the process group (torchrun / srun ranks);
2. the stage lock (pipeline/runner/lock.py): one job per stage (per array task) at a time;
3. skip when done.json matches the config and inputs (after verifying the outputs); refuse,
   naming the changed keys with old and new values, when they changed (unless --force);
4. record attempt.json (with the stage's effective config) so a partial stage rerun with a
   different config is refused too;
5. call run(ctx) on every rank; rank 0 writes done.json last, atomically;
6. OS errors (read-only or full disk, ...) become one clear StageError line, also in log.txt.
"""
from __future__ import annotations

import importlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config.root import Config
from ..data.urls import FetchOptions, set_fetch_options
from ..runtime.dist import DistEnv, barrier, broadcast_object, device_for, init_distributed
from ..runtime.errors import StageError, describe_os_error
from ..runtime.io import atomic_write_text, sha256_file
from ..runtime.logs import setup_logging
from ..train.signals import Interrupted, Preempted, PreemptionGuard
from .external_files import check_external_files
from .fingerprint import (
    changed_parts,
    git_commit,
    package_versions,
    stage_fingerprint,
    stage_inputs,
)
from .lock import StageLock, is_lock_file
from .repair import describe_discard, rebuild_plan, remedy
from .rundir import STAGE_NAMES, RunDir


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

    def input_path(self, stage: str, file: str) -> Path:
        """A file of an earlier stage's outputs (declared in the stage's INPUTS)."""
        return self.run_dir / stage / file

    def input_record(self, stage: str) -> dict:
        """An earlier stage's done.json ({} when it has none)."""
        return RunDir(self.run_dir).read_done(stage) or {}


@dataclass
class StageOutcome:
    name: str
    status: str           # "done" | "skipped" | "task-done" (array task finished, stage still incomplete)
    record: dict | None = None


def load_stage_module(name: str):
    if name not in STAGE_NAMES:
        raise StageError(f"unknown stage {name!r}; stages are: {', '.join(STAGE_NAMES)}")
    return importlib.import_module(f"stages.{name}")


def _clear_stage_dir(stage_dir: Path) -> None:
    for path in stage_dir.iterdir():
        if path.name == "log.txt" or is_lock_file(path.name):
            continue
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def verify_stage(name: str, run: RunDir) -> None:
    """Check a finished stage's outputs: every file done.json hashed, then the stage's own
    `verify_outputs(stage_dir)` (e.g. every shard against its manifest). StageError names the file."""
    done = run.read_done(name)
    if done is None:
        raise StageError(f"stage {name} is not finished in {run.root} (no {run.done_path(name)})")
    module = load_stage_module(name)
    try:
        _check_outputs(module, run, done)
    except StageError as err:
        raise StageError(f"{err}; {remedy(module, run, name)}") from None


def _check_outputs(module, run: RunDir, done: dict) -> None:
    name, stage_dir = module.NAME, run.stage_dir(module.NAME)
    for file, sha in sorted(done.get("outputs", {}).items()):
        path = stage_dir / file
        if not path.is_file():
            raise StageError(f"{path} (an output of the finished stage {name}) is missing")
        if sha256_file(path) != sha:
            raise StageError(f"{path} (an output of the finished stage {name}) differs from the hash in "
                             f"{run.done_path(name)}: it was modified or corrupted")
    verify = getattr(module, "verify_outputs", None)
    if verify is not None:
        verify(stage_dir)


def preflight(cfg: Config, names: list[str], *, run_dir: str | Path | None = None, force: bool = False,
              external_files: bool = True) -> None:
    """Check the whole config for every stage about to run, before the first one starts (a model
    that cannot be built for this resolution, or a missing weights file, must not surface after
    hours of sharding). Outside files are checked for the stages that will run: not for one already
    finished in `run_dir` (it is skipped, or refused if its config changed) unless `force`."""
    for name in names:
        check = getattr(load_stage_module(name), "check_config", None)
        if check is not None:
            check(cfg)
    if external_files:
        run = RunDir(run_dir) if run_dir is not None and not force else None
        check_external_files(cfg, [n for n in names if run is None or run.read_done(n) is None])


def run_stage(name: str, cfg: Config, run_dir: str | Path, *, force: bool = False, num_tasks: int = 1,
              task_id: int = 0, module=None, from_scratch: bool = False) -> StageOutcome:
    """Run one stage on every rank: lock, decide (run / skip / rebuild / refuse / clear), run, record.

    `module` stands in for the stage's own module (same NAME): `tessera import`
    produces a stage's outputs from foreign checkpoints through the same lock and records.
    `force` clears the stage when its config or inputs changed, and otherwise rebuilds it in place
    from what still matches (pipeline/runner/repair.py); `from_scratch` clears it always."""
    imported = module is not None  # its outputs come from foreign files, not from the config's inputs
    module = load_stage_module(name) if module is None else module
    preflight(cfg, [name], run_dir=run_dir, force=force, external_files=not imported)
    if not 0 <= task_id < num_tasks:
        raise StageError(f"--task-id {task_id} must be in [0, {num_tasks}) for --num-tasks {num_tasks}")
    run = RunDir(run_dir)
    stage_dir = run.stage_dir(name)
    inputs = list(stage_inputs(module))
    if inputs and not run.root.is_dir():
        # Refused before anything is created: a typo in --run-dir must not leave a new run behind.
        raise StageError(f"run directory {run.root} does not exist, and stage {name} reads the outputs of "
                         f"{', '.join(inputs)} from it: check --run-dir, or run those stages first")
    try:
        stage_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StageError(describe_os_error(err, f"creating the stage folder {stage_dir}")) from None
    logger = setup_logging(stage_dir / "log.txt")
    env = init_distributed(cfg.launcher.collective_timeout_s)
    # Every shard stream a stage opens (shard, train_tokenizer, ...) retries and trusts CAs as configured.
    set_fetch_options(FetchOptions(retries=cfg.data.fetch_retries, ca_bundle=cfg.data.ca_bundle))
    ctx = StageContext(cfg=cfg, run_dir=run.root, stage_dir=stage_dir, env=env, num_tasks=num_tasks,
                       task_id=task_id, logger=logger, device=device_for(env))
    lock = StageLock(stage_dir, task_id=task_id, num_tasks=num_tasks, logger=logger)
    try:
        # Rank 0 takes the lock for the job and decides; every rank follows its answer.
        _on_main_then_broadcast(env, lock.acquire)
        try:
            return _run_locked(module, ctx, run, force, from_scratch)
        finally:
            if env.is_main:
                lock.release()
    except OSError as err:
        message = describe_os_error(err, f"running stage {name}")
        logger.error("%s", message)
        raise StageError(message) from None
    except StageError as err:
        logger.error("%s", err)
        raise
    except (Preempted, Interrupted) as stop:  # the CLI turns it into exit code 3
        logger.warning("%s", stop)
        raise


def _on_main_then_broadcast(env: DistEnv, action) -> None:
    """Run `action` on rank 0; a StageError (or OSError) it raises is raised on every rank."""
    error = None
    if env.is_main:
        try:
            action()
        except StageError as err:
            error = str(err)
        except OSError as err:
            error = describe_os_error(err, "taking the stage lock")
    error = broadcast_object(error)
    if error is not None:
        raise StageError(error)


def _run_locked(module, ctx: StageContext, run: RunDir, force: bool, from_scratch: bool) -> StageOutcome:
    name, env, logger, stage_dir = module.NAME, ctx.env, ctx.logger, ctx.stage_dir
    fingerprint = stage_fingerprint(module, ctx, run)
    decision = broadcast_object(_decide(run, name, fingerprint, force, from_scratch) if env.is_main else None)
    if decision["action"] == "refuse":
        raise StageError(decision["message"])
    if decision["action"] == "skip":
        # "done" is a claim about files: check it (cheap: hashes of shards are cached by stat).
        decision = broadcast_object(_verify_or_rebuild(module, run, logger) if env.is_main else None)
        if decision["action"] == "refuse":
            raise StageError(decision["message"])
        if decision["action"] == "skip":
            logger.info("stage %s: already done with the same config and inputs (outputs verified); skipped", name)
            return StageOutcome(name, "skipped", run.read_done(name))
    if decision["action"] == "rebuild" and env.is_main:
        run.done_path(name).unlink(missing_ok=True)  # not done until the rebuilt outputs are recorded
    if decision["action"] == "clear" and env.is_main:
        logger.info("stage %s: clearing %s", name, describe_discard(stage_dir))
        _clear_stage_dir(stage_dir)
    # Every input, every split, before the first step: a bad val shard must not surface after training.
    for earlier in stage_inputs(module):
        _on_main_then_broadcast(env, lambda: verify_stage(earlier, run))
    # User-supplied files (e.g. score.reference) before the attempt is recorded: a bad one must not
    # pin the attempt's config, which would refuse the corrected rerun.
    check_inputs = getattr(module, "check_inputs", None)
    if check_inputs is not None:
        _on_main_then_broadcast(env, lambda: check_inputs(ctx))
    if env.is_main:
        run.write_attempt(name, fingerprint)
        atomic_write_text(run.root / "config.yaml", ctx.cfg.to_yaml())
    barrier()

    logger.info("stage %s: starting (rank %d/%d, task %d/%d, device %s)", name, env.rank, env.world_size,
                ctx.task_id, ctx.num_tasks, ctx.device)
    start = time.time()
    # Every phase of every stage stops at once on a preemption signal (exit 3, no traceback);
    # training loops defer it to their next step boundary (pipeline/train/signals.py).
    with PreemptionGuard(at_once=True, doing=f"stage {name}"):
        result = module.run(ctx)
    barrier()
    if result is None:
        logger.info("stage %s: this task's part is finished; the stage completes when all tasks are done", name)
        return StageOutcome(name, "task-done")
    record = {
        **fingerprint,
        "stage": name,
        "counts": result.counts,
        "metrics": result.metrics,
        "outputs": result.outputs,
        "wall_time_s": round(time.time() - start, 3),
        "world_size": env.world_size,
        "num_tasks": ctx.num_tasks,
        "versions": package_versions(),
        "git_commit": git_commit(),
    }
    if env.is_main:
        run.write_done(name, record)
        logger.info("stage %s: done in %.1f s; %s", name, record["wall_time_s"], json.dumps(result.counts))
    barrier()
    return StageOutcome(name, "done", record)


def _verify_or_rebuild(module, run: RunDir, logger: logging.Logger) -> dict:
    """Skip a finished stage whose outputs verify; rebuild one in place when a rerun can (a
    re-export from its final checkpoint, the units that fail their hash); else refuse, saying why."""
    name = module.NAME
    module = load_stage_module(name)  # the stage's own checks, also for an imported stage
    try:
        _check_outputs(module, run, run.read_done(name))
        return {"action": "skip"}
    except OSError as err:
        return {"action": "refuse", "message": describe_os_error(err, f"verifying the outputs of stage {name}")}
    except StageError as err:
        plan = rebuild_plan(module, run, name)
        if plan is None:
            return {"action": "refuse", "message": f"{err}; {remedy(module, run, name)}"}
        logger.warning("stage %s: %s; rebuilding it in place: it %s", name, err, plan)
        return {"action": "rebuild"}


def _decide(run: RunDir, name: str, fingerprint: dict, force: bool, from_scratch: bool = False) -> dict:
    done = run.read_done(name)
    previous = done if done is not None else run.read_attempt(name)
    if previous is None:
        return {"action": "run"}
    changed = changed_parts(previous, fingerprint, run)
    if force:
        # Same config and inputs: the checkpoints and verified units still match; keep them.
        return {"action": "clear" if changed or from_scratch else "rebuild"}
    if not changed:
        return {"action": "skip"} if done is not None else {"action": "run"}  # same work: resume it
    what = "finished" if done is not None else "partially run"
    return {"action": "refuse", "message": (
        f"stage {name} was {what} in {run.stage_dir(name)} with different {' and '.join(changed)}; "
        f"rerun with --force to start it over, which deletes {describe_discard(run.stage_dir(name))}; "
        f"or use another --run-dir")}
