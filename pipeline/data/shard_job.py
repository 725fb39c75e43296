"""The shard stage's work, independent of how it was launched.

    job = ShardJob.create(cfg.data, cfg.seed, stage_dir)
    job.write_worker_shards(worker, num_workers)     # every worker: only its own shards
    sidecars = job.collect_sidecars()                # None while another worker's shard is missing
    summary = job.finalize(sidecars, max_reject_fraction, write=is_main)
"""
from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ..io import atomic_write_text, sha256_json
from ..stage import StageError
from . import manifest as manifest_lib
from . import shards as shards_lib
from .shards import ShardSpec, assigned_shards, plan_shards, samples_per_shard, verified_sidecar
from .sources import make_source

_LOAD_CHUNK = 32  # images decoded/rendered per task (bounds memory, keeps numpy batched)
_POOL_SOURCE = None  # the source, inherited by forked decode processes instead of pickled per task
# Config fields that change the shard bytes; the reader-only ones (hflip, num_workers...) do not.
_SHARD_FIELDS = ("source", "root", "resolution", "num_classes", "num_train", "num_val", "val_fraction", "format",
                 "image_encoding")


@dataclass
class ShardJob:
    source: object
    plan: list[ShardSpec]
    plan_id: str
    stage_dir: Path
    fmt: str
    encoding: str
    resolution: int
    decode_processes: int = 1

    @classmethod
    def create(cls, data_cfg, seed: int, stage_dir: str | Path) -> "ShardJob":
        source = make_source(data_cfg, seed)
        per_shard = samples_per_shard(data_cfg.resolution, data_cfg.shard_max_count, data_cfg.shard_max_bytes)
        plan_id = sha256_json({"seed": seed, "per_shard": per_shard, "inputs": source.fingerprint(),
                               **{name: getattr(data_cfg, name) for name in _SHARD_FIELDS}})
        return cls(source, plan_shards(source.split_sizes, per_shard, data_cfg.format), plan_id, Path(stage_dir),
                   data_cfg.format, data_cfg.image_encoding, data_cfg.resolution,
                   data_cfg.shard_decode_processes or default_decode_processes())

    def write_worker_shards(self, worker: int, num_workers: int, logger: logging.Logger | None = None,
                            progress_position: int = 0) -> dict:
        """Write this worker's shards, keeping verified ones from an earlier attempt."""
        logger = logger or logging.getLogger(__name__)
        mine = assigned_shards(self.plan, worker, num_workers)
        todo = [spec for spec in mine if verified_sidecar(self.stage_dir, spec, self.plan_id) is None]
        for spec in mine:
            if spec not in todo:
                shards_lib.remove_unit_temps(self.stage_dir / spec.name)  # debris of an attempt that was killed late
        if len(todo) < len(mine):
            logger.info("worker %d: keeping %d verified shard(s) from an earlier attempt", worker, len(mine) - len(todo))
        images_total = sum(spec.stop - spec.start for spec in todo)
        start = time.perf_counter()
        done = 0
        global _POOL_SOURCE
        _POOL_SOURCE = self.source
        pool = None
        if self.decode_processes > 1 and todo:
            # fork: children inherit the source (an ImageNet file list is large to pickle).
            pool = multiprocessing.get_context("fork").Pool(self.decode_processes)
        try:
            with tqdm(total=images_total, unit="img", desc=f"shard worker {worker}", position=progress_position,
                      dynamic_ncols=True, mininterval=2.0, disable=None) as bar:
                for spec in todo:
                    chunks = [(spec.split, lo, min(spec.stop, lo + _LOAD_CHUNK), self.encoding)
                              for lo in range(spec.start, spec.stop, _LOAD_CHUNK)]
                    # imap keeps chunk order, so the shard bytes do not depend on the process count.
                    results = pool.imap(_encode_chunk, chunks) if pool else map(_encode_chunk, chunks)
                    sidecar = shards_lib.write_unit(self.stage_dir, spec, _counted(results, bar), fmt=self.fmt,
                                                    encoding=self.encoding, plan_id=self.plan_id)
                    done += spec.stop - spec.start
                    logger.info("wrote %s: %d images, %d rejected (%.0f images/s)", spec.name, sidecar["count"],
                                len(sidecar["rejected"]), done / max(time.perf_counter() - start, 1e-9))
        finally:
            if pool is not None:
                pool.terminate()
            _POOL_SOURCE = None
        seconds = time.perf_counter() - start
        return {"written": len(todo), "kept": len(mine) - len(todo), "images": images_total,
                "images_per_s": images_total / seconds if seconds > 0 else 0.0}

    def collect_sidecars(self) -> list[dict] | None:
        """Every shard's sidecar in plan order, or None while any shard is still missing."""
        return shards_lib.collect_sidecars(self.stage_dir, self.plan, self.plan_id)

    def finalize(self, sidecars: list[dict], max_reject_fraction: float, *, write: bool = True) -> dict:
        """Write rejected.jsonl and manifest.json; fail when too many inputs were unreadable.

        Returns {"counts": ..., "outputs": ...}. The manifest is not written on failure, so a
        later stage never reads a dataset that failed its reject check.
        """
        rejected = manifest_lib.rejected_lines(self.plan, sidecars)
        manifest = manifest_lib.build_manifest(
            self.plan, sidecars, source_kind=self.source.kind, class_names=self.source.class_names,
            resolution=self.resolution, fmt=self.fmt, encoding=self.encoding,
            split_inputs=self.source.split_sizes, plan_id=self.plan_id)
        totals = manifest["totals"]
        fraction = totals["rejected"] / max(totals["inputs"], 1)
        if fraction > max_reject_fraction:
            if write:  # kept for inspection; no manifest, so the dataset cannot be used
                atomic_write_text(self.stage_dir / manifest_lib.REJECTED_NAME, rejected)
            examples = "; ".join(f"{s['rejected'][0]['path']} ({s['rejected'][0]['reason']})"
                                 for s in sidecars if s["rejected"])
            raise StageError(
                f"shard: {totals['rejected']} of {totals['inputs']} input images ({fraction:.1%}) are unreadable, "
                f"more than data.max_reject_fraction={max_reject_fraction}; see "
                f"{self.stage_dir / manifest_lib.REJECTED_NAME} (e.g. {examples[:500]}). Fix or remove them, or "
                f"raise data.max_reject_fraction.")
        if write:
            manifest_lib.remember_verified(self.stage_dir, manifest)
            manifest_lib.write_manifest(self.stage_dir, manifest, rejected)
        counts = {"shards": totals["shards"], "images": totals["samples"], "inputs": totals["inputs"],
                  "rejected": totals["rejected"], "bytes": totals["bytes"],
                  **{f"{split}_images": info["num_samples"] for split, info in manifest["splits"].items()}}
        # Hashes of the exact bytes written (atomic_write_json's canonical form), equal on every rank.
        outputs = {manifest_lib.MANIFEST_NAME: _sha256_bytes(manifest_lib.manifest_bytes(manifest)),
                   manifest_lib.REJECTED_NAME: _sha256_bytes(rejected.encode("utf-8"))}
        return {"counts": counts, "outputs": outputs, "manifest": manifest}


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def default_decode_processes() -> int:
    """The CPU cores this process may use, shared among the ranks on this node."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def _encode_chunk(task) -> list:
    split, start, stop, encoding = task
    return [shards_lib.encode_loaded(img, encoding) for img in _POOL_SOURCE.load(split, start, stop)]


def _counted(chunk_results, bar):
    for chunk in chunk_results:
        yield from chunk
        bar.update(len(chunk))
