"""Units of work: the pattern every data-parallel stage (shard, precompute_codes, sample) shares.

A stage's output is a fixed plan of units (shards of images, shards of codes, chunks of samples),
each a function of the config alone, so the bytes of every unit are the same however the stage
was launched. Worker w of W (W = array tasks x ranks) takes units w, w+W, w+2W, ...

    work = UnitWork(stage_dir, plan, plan_id, worker=ctx.worker, num_workers=ctx.num_workers)
    stats = work.run(write_one, logger, desc="shard")   # this worker's units; verified ones are kept
    done = work.finish(stats, finalize, is_main=...)    # None while another worker's unit is missing

A stage's run() hands those three steps to `run_units`, which owns the loop for every stage.

Publishing one unit (`publish_unit`) takes three steps: remove its sidecar, write the unit under a
temp name and rename it into place, then write the sidecar `<name>.json` (count, sha256, bytes,
plan id, stage-specific fields). A sidecar therefore exists only next to a complete unit: a killed
writer leaves at worst its own temp file (removed when that unit is rewritten) or a unit without a
sidecar (rewritten on the next run). A unit is kept on a rerun only when its sidecar belongs to the
same plan and its content hash still matches.
"""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..runtime.dist import all_gather_objects, barrier, broadcast_object
from ..runtime.errors import StageError
from ..runtime.io import atomic_write_json, read_json, sha256_file, sha256_json
from ..runtime.progress import progress

MANIFEST_NAME = "manifest.json"  # every unit stage's index of its units, written last by rank 0


@dataclass(frozen=True)
class Unit:
    split: str
    index: int      # position of the unit within its split
    start: int      # first item (image / sample) of the split held by this unit
    stop: int       # one past the last
    name: str       # path relative to the stage directory, e.g. train/train-000003.tar

    @property
    def size(self) -> int:
        return self.stop - self.start

    @property
    def sidecar_name(self) -> str:
        return self.name + ".json"


def unit_digest(path: Path) -> tuple[str, int]:
    """(sha256, bytes) of a unit file, or of a unit directory (hash over its sorted files)."""
    if path.is_file():
        return sha256_file(path), path.stat().st_size
    files = sorted(p for p in path.rglob("*") if p.is_file())
    listing = [(p.relative_to(path).as_posix(), sha256_file(p)) for p in files]
    return sha256_json(listing), sum(p.stat().st_size for p in files)


def _unit_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def read_sidecar(stage_dir: Path, unit: Unit, plan_id: str) -> dict | None:
    """The sidecar when it belongs to this plan and its unit exists with the recorded size."""
    try:
        sidecar = read_json(stage_dir / unit.sidecar_name)
    except (OSError, ValueError):  # ValueError: CorruptFileError
        return None
    path = stage_dir / unit.name
    if sidecar.get("plan") != plan_id or not path.exists():
        return None
    return sidecar if _unit_bytes(path) == sidecar.get("bytes") else None


def verified_sidecar(stage_dir: Path, unit: Unit, plan_id: str) -> dict | None:
    """Like read_sidecar, and the unit's content hash matches too (checked before keeping a unit)."""
    sidecar = read_sidecar(stage_dir, unit, plan_id)
    if sidecar is None:
        return None
    sha, _ = unit_digest(stage_dir / unit.name)
    return sidecar if sha == sidecar.get("sha256") else None


def remove_unit_temps(path: Path) -> None:
    """Temp files / dirs a killed writer of this unit left (only this unit's: others may be writing)."""
    if not path.parent.is_dir():
        return
    for stale in path.parent.glob(f".{path.name}.*"):
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink(missing_ok=True)


def publish_unit(stage_dir: Path, unit: Unit, plan_id: str, write: Callable[[Path], dict]) -> dict:
    """Write one unit through `write(path) -> {"count": rows, ...extra sidecar fields}`, then its sidecar.

    `write` must publish the unit atomically itself (a temp name renamed onto `path`)."""
    path = stage_dir / unit.name
    path.parent.mkdir(parents=True, exist_ok=True)
    (stage_dir / unit.sidecar_name).unlink(missing_ok=True)
    remove_unit_temps(path)
    fields = write(path)
    sha, size = unit_digest(path)
    sidecar = {"name": unit.name, "split": unit.split, "index": unit.index, "start": unit.start, "stop": unit.stop,
               "sha256": sha, "bytes": size, "plan": plan_id, **fields}
    atomic_write_json(stage_dir / unit.sidecar_name, sidecar)
    return sidecar


@dataclass
class UnitWork:
    stage_dir: Path
    plan: list[Unit]
    plan_id: str          # hash of everything that decides the units' bytes; sidecars of another plan are stale
    worker: int = 0
    num_workers: int = 1

    @property
    def mine(self) -> list[Unit]:
        return self.plan[self.worker::self.num_workers]

    def run(self, write_one: Callable[[Unit, object], dict], logger: logging.Logger, *, desc: str,
            progress_position: int = 0) -> dict:
        """Write this worker's units that have no verified sidecar; `write_one(unit, bar)` returns the
        unit's sidecar (through `publish_unit`) and advances `bar` by the items it consumed."""
        mine = self.mine
        todo = [unit for unit in mine if verified_sidecar(self.stage_dir, unit, self.plan_id) is None]
        for unit in mine:
            if unit not in todo:
                remove_unit_temps(self.stage_dir / unit.name)  # debris of an attempt that was killed late
        if len(todo) < len(mine):
            logger.info("worker %d: keeping %d verified unit(s) from an earlier attempt", self.worker,
                        len(mine) - len(todo))
        items = sum(unit.size for unit in todo)
        rows = done = 0
        start = time.perf_counter()
        with progress(items, unit="img", desc=f"{desc} worker {self.worker}", position=progress_position,
                      mininterval=2.0) as bar:
            for unit in todo:
                sidecar = write_one(unit, bar)
                rows += sidecar["count"]
                done += unit.size
                logger.info("wrote %s: %d row(s) from %d input(s)%s (%.1f inputs/s)", unit.name, sidecar["count"],
                            unit.size, f", {len(sidecar['rejected'])} rejected" if sidecar.get("rejected") else "",
                            done / max(time.perf_counter() - start, 1e-9))
        return {"written": len(todo), "kept": len(mine) - len(todo), "items": items, "rows": rows,
                "seconds": time.perf_counter() - start}

    def collect_sidecars(self) -> list[dict] | None:
        """Every unit's sidecar in plan order, or None while any unit is still missing."""
        sidecars = []
        for unit in self.plan:
            sidecar = read_sidecar(self.stage_dir, unit, self.plan_id)
            if sidecar is None:
                return None
            sidecars.append(sidecar)
        return sidecars

    def finish(self, stats: dict, finalize: Callable[[list[dict]], dict], *, is_main: bool
               ) -> tuple[dict, list[dict]] | None:
        """After every rank ran: rank 0 calls `finalize(sidecars)` (manifest etc.) once every unit of
        the plan exists; its result (or StageError) reaches every rank, so all return or raise alike.

        Returns (finalize's result, every rank's stats), or None while other tasks' units are missing
        (the task that completes the plan finalizes)."""
        all_stats = all_gather_objects(stats)
        barrier()
        outcome = None
        if is_main:
            sidecars = self.collect_sidecars()
            if sidecars is None:
                outcome = {"pending": True}
            else:
                try:
                    outcome = {"result": finalize(sidecars)}
                except StageError as err:
                    outcome = {"error": str(err)}
        outcome = broadcast_object(outcome)
        if "error" in outcome:
            raise StageError(outcome["error"])
        if outcome.get("pending"):
            return None
        return outcome["result"], all_stats


def run_units(ctx, plan: list[Unit], plan_id: str, *, desc: str, write_one: Callable[[Unit, object], dict],
              finalize: Callable[[list[dict]], dict], summarize: Callable[[dict, list[dict]], object]):
    """A unit stage's whole run(ctx): this worker's units of `plan` through `write_one`, then on
    the task that completes the plan `finalize(sidecars)` (rank 0: manifest etc.) and
    `summarize(finalized, all_stats)` (every rank: the StageResult). None while other tasks'
    units are missing: the stage is not finished by this task."""
    work = UnitWork(ctx.stage_dir, plan, plan_id, worker=ctx.worker, num_workers=ctx.num_workers)
    ctx.logger.info("%s: worker %d of %d takes %d of %d unit(s)", desc, ctx.worker, ctx.num_workers, len(work.mine),
                    len(plan))
    stats = work.run(write_one, ctx.logger, desc=desc, progress_position=ctx.env.local_rank)
    finished = work.finish(stats, finalize, is_main=ctx.env.is_main)
    if finished is None:
        ctx.logger.info("%s: other tasks' units are still missing; the task that completes the plan finishes the "
                        "stage", desc)
        return None
    return summarize(*finished)


def items_and_rate(all_stats: list[dict]) -> tuple[int, float]:
    """(items this run wrote over all workers, items per second of the slowest worker's wall time)."""
    seconds = max(max((s["seconds"] for s in all_stats), default=0.0), 1e-9)
    items = sum(s["items"] for s in all_stats)
    return items, items / seconds
