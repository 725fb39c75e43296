"""The precompute_codes stage's work, independent of how it was launched.

    job = CodesJob.create(run_dir, cfg, stage_dir, device)
    job.write_worker_units(worker, num_workers)   # every worker: its own code units (one per input shard)
    sidecars = job.collect_sidecars()             # None while another worker's unit is missing
    manifest = job.build_manifest(sidecars)
    metrics = job.verify(sidecars)                # decode a seeded sample; StageError on mismatch

Unit j of a split encodes input shard j of that split; workers take every W-th unit of the plan,
as in the shard stage, so the bytes of a unit do not depend on the number of workers: batches
never cross a unit boundary and always start at the unit's first image.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..artifacts import TOKENIZER_CONFIG, TOKENIZER_WEIGHTS, load_tokenizer
from ..io import read_json, sha256_file, sha256_json
from ..rundir import RunDir
from ..stage import StageError
from ..train.tokenizer_eval import psnr_per_image
from .codes_writer import VIEW_NAMES, CodeEncoder, CodeLayout, UnitStats, make_views, write_code_unit
from .dq_sequence import dq_codes_from_tokens
from .reader import ShardedImageDataset
from . import shards as shards_lib
from .shards import ShardSpec, assigned_shards, verified_sidecar

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
AUGMENTED_SPLITS = ("train",)  # val keeps the plain view only: its loss should measure real images
# Verification: stored codes vs a fresh encode of the same images. bf16 kernels may break argmin
# ties differently between batch shapes, so a few differing tokens are tolerated there (not in fp32).
_MAX_TOKEN_MISMATCH = {"fp32": 0.0, "bf16": 0.01}
_MAX_PSNR_GAP_DB = {"fp32": 1e-3, "bf16": 0.1}


def input_paths(run_dir: Path) -> tuple[Path, Path]:
    """(shard manifest, tokenizer folder); StageError when an earlier stage is not done."""
    run = RunDir(run_dir)
    for stage in ("shard", "train_tokenizer"):
        if run.read_done(stage) is None:
            raise StageError(f"precompute_codes needs the {stage} stage first: run `tessera run CONFIG --run-dir "
                             f"{run_dir} --stages shard,train_tokenizer` (no {run.done_path(stage)})")
    return run.stage_dir("shard") / "manifest.json", run.stage_dir("train_tokenizer")


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


@dataclass
class CodesJob:
    stage_dir: Path
    datasets: dict                       # split -> ShardedImageDataset over the input shards
    plan: list[ShardSpec]
    plan_id: str
    layout: CodeLayout
    encoder: CodeEncoder
    cfg: object                          # the whole Config (precompute, data, seed)
    precision: str
    fingerprints: dict

    @classmethod
    def create(cls, run_dir: Path, cfg, stage_dir: Path, device: torch.device) -> "CodesJob":
        manifest_path, tok_dir = input_paths(run_dir)
        pc = cfg.precompute
        meta = read_json(tok_dir / TOKENIZER_CONFIG)
        if pc.store_latents and meta["tokenizer"]["kind"] == "dq":
            raise StageError("precompute.store_latents=true applies to RQ/VQ tokenizers (soft labels); this run's "
                             "tokenizer is DQ: set precompute.store_latents=false")
        model = load_tokenizer(tok_dir, device)
        layout = CodeLayout.for_tokenizer(model, meta, store_latents=pc.store_latents)
        precision = resolve_precision(pc.precision, device)
        shard_manifest = read_json(manifest_path)
        datasets = {split: ShardedImageDataset(manifest_path, split) for split in shard_manifest["splits"]}
        plan = []
        for split, info in shard_manifest["splits"].items():
            start = 0
            for j, shard in enumerate(info["shards"]):
                plan.append(ShardSpec(split, j, start, start + shard["count"], f"{split}/{split}-{j:06d}"))
                start += shard["count"]
        fingerprints = {"shard_manifest_sha256": sha256_file(manifest_path),
                        "tokenizer_sha256": sha256_file(tok_dir / TOKENIZER_WEIGHTS)}
        plan_id = sha256_json({**fingerprints, "columns": layout.columns, "precision": precision,
                               "batch_size": pc.batch_size, "augment": pc.augment, "crop_range": pc.crop_range,
                               "augmented_splits": AUGMENTED_SPLITS})
        return cls(Path(stage_dir), datasets, plan, plan_id, layout,
                   CodeEncoder(model, layout, device, precision), cfg, precision, fingerprints)

    def views_per_image(self, split: str) -> int:
        return len(VIEW_NAMES[self.cfg.precompute.augment]) if split in AUGMENTED_SPLITS else 1

    # ---- encoding ------------------------------------------------------------------------
    def write_worker_units(self, worker: int, num_workers: int, logger: logging.Logger | None = None,
                           progress_position: int = 0) -> dict:
        """Encode this worker's units, keeping verified ones from an earlier attempt."""
        logger = logger or logging.getLogger(__name__)
        mine = assigned_shards(self.plan, worker, num_workers)
        todo = [spec for spec in mine if verified_sidecar(self.stage_dir, spec, self.plan_id) is None]
        if len(todo) < len(mine):
            logger.info("worker %d: keeping %d verified code unit(s) from an earlier attempt", worker, len(mine) - len(todo))
        images_total = sum(spec.stop - spec.start for spec in todo)
        samples = images_done = 0
        start = time.perf_counter()
        with tqdm(total=images_total, unit="img", desc=f"precompute worker {worker}", position=progress_position,
                  dynamic_ncols=True, mininterval=2.0, disable=None) as bar:
            for spec in todo:
                stats = UnitStats(self.layout)
                sidecar = write_code_unit(self.stage_dir, spec, self._unit_rows(spec, stats, bar), self.layout,
                                          self.plan_id, stats)
                samples += sidecar["count"]
                images_done += sidecar["images"]
                logger.info("wrote codes %s: %d images, %d samples (%.1f images/s)", spec.name, sidecar["images"],
                            sidecar["count"], images_done / max(time.perf_counter() - start, 1e-9))
        seconds = time.perf_counter() - start
        return {"written": len(todo), "kept": len(mine) - len(todo), "images": images_total, "samples": samples,
                "seconds": seconds}

    def _unit_rows(self, spec: ShardSpec, stats: UnitStats, bar):
        pc = self.cfg.precompute
        augment = pc.augment if spec.split in AUGMENTED_SPLITS else "none"
        bs = pc.batch_size
        batches = [list(range(lo, min(spec.stop, lo + bs))) for lo in range(spec.start, spec.stop, bs)]
        loader = DataLoader(self.datasets[spec.split], batch_sampler=batches, num_workers=self.cfg.data.num_workers)
        for (images, labels, keys), indices in zip(loader, batches):
            views = make_views(images, augment, pc.crop_range)
            yield from self.encoder.encode(images, labels, indices, list(keys), views, stats)
            bar.update(len(indices))

    # ---- completion ----------------------------------------------------------------------
    def collect_sidecars(self) -> list[dict] | None:
        """Every unit's sidecar in plan order, or None while any unit is still missing."""
        return shards_lib.collect_sidecars(self.stage_dir, self.plan, self.plan_id)

    def build_manifest(self, sidecars: list[dict]) -> dict:
        """Content only (no times, hosts, paths): an interrupted and an uninterrupted run give the same bytes."""
        layout, splits = self.layout, {}
        for split in self.datasets:
            mine = [s for spec, s in zip(self.plan, sidecars) if spec.split == split]
            hist = np.zeros((len(layout.histogram_rows), layout.codebook_size), dtype=np.int64)
            for s in mine:
                hist += np.asarray(s["histogram"], dtype=np.int64)
            samples = sum(s["count"] for s in mine)
            info = {"num_images": sum(s["images"] for s in mine), "num_samples": samples,
                    "views_per_image": self.views_per_image(split),
                    "shards": [{"name": s["name"], "count": s["count"], "images": s["images"], "sha256": s["sha256"],
                                "bytes": s["bytes"]} for s in mine],
                    "code_histogram": hist.tolist()}
            if layout.kind == "dq":
                info["mean_length"] = round(sum(s["length_sum"] for s in mine) / max(samples, 1), 4)
                info["max_length"] = max((s["length_max"] for s in mine), default=0)
            splits[split] = info
        return {
            "version": MANIFEST_VERSION, "kind": layout.kind, "codebook_size": layout.codebook_size,
            "code_dtype": layout.columns.get("codes_HWD", layout.columns.get("contents_L")).split(":")[1],
            "code_shape": list(layout.code_shape), "fine_shape": ([2 * n for n in layout.code_shape]
                                                                 if layout.kind == "dq" else None),
            "latent_shape": list(layout.latent_shape) if layout.latent_shape else None,
            "columns": layout.columns, "histogram_rows": layout.histogram_rows,
            "augment": self.cfg.precompute.augment, "crop_range": self.cfg.precompute.crop_range,
            "views": VIEW_NAMES[self.cfg.precompute.augment], "precision": self.precision,
            "resolution": self.cfg.data.resolution, "plan": self.plan_id, **self.fingerprints,
            "splits": splits,
            "totals": {"images": sum(s["num_images"] for s in splits.values()),
                       "samples": sum(s["num_samples"] for s in splits.values()), "units": len(sidecars),
                       "bytes": sum(s["bytes"] for s in sidecars)},
        }

    # ---- verification --------------------------------------------------------------------
    @torch.no_grad()
    def verify(self, sidecars: list[dict], num_images: int, seed: int) -> dict:
        """Decode a seeded sample of stored codes; they must equal a fresh encode of the same images.

        Checks, per sampled image: stored index/view, codes (DQ: granularity map too) against the
        tokenizer run directly, and the PSNR of the decode against the PSNR of the direct round trip.
        """
        from streaming.base import LocalDataset

        split = "val" if any(spec.split == "val" and spec.stop > spec.start for spec in self.plan) else "train"
        units = [(spec, s) for spec, s in zip(self.plan, sidecars) if spec.split == split]
        total = sum(spec.stop - spec.start for spec, _ in units)
        n = min(num_images, total)
        if n == 0:
            return {"verify_images": 0}
        picks = np.sort(np.random.default_rng([seed, 0xC0DE5]).choice(total, size=n, replace=False))
        views, stored, images = self.views_per_image(split), [], []
        for i in picks.tolist():
            spec, _ = next((spec, s) for spec, s in units if spec.start <= i < spec.stop)
            row = LocalDataset(local=str(self.stage_dir / spec.name))[(i - spec.start) * views]
            if int(row["index"]) != i or int(row["view"]) != 0:
                raise StageError(f"precompute_codes: {spec.name} row for image {i} holds image {row['index']} view "
                                 f"{row['view']}; the unit is out of order, rerun with --force")
            stored.append(row)
            images.append(self.datasets[split][i][0])
        images_BCHW = torch.stack(images)
        model, bs, dev = self.encoder.model, self.cfg.precompute.batch_size, self.encoder.device
        recon_stored, recon_direct, mismatched, tokens = [], [], 0, 0
        for lo in range(0, n, bs):
            rows, x = stored[lo:lo + bs], images_BCHW[lo:lo + bs]
            fresh = self.encoder.encode_view(x)
            if self.layout.kind == "dq":
                codes_s = dq_codes_from_tokens([(torch.tensor(r["positions_L"]), torch.tensor(r["contents_L"]),
                                                 torch.tensor(r["granularity_L"])) for r in rows],
                                               self.layout.code_shape[0])
                mismatched += int((codes_s.code_map_BHW != fresh.code_map_BHW).sum())
                mismatched += int((codes_s.granularity_BHcWc != fresh.granularity_BHcWc).sum())
                tokens += codes_s.code_map_BHW.numel() + codes_s.granularity_BHcWc.numel()
                # decode reads only the code map (coarse codes already copied to their 4 cells)
                pair = [type(c)([], c.granularity_BHcWc.to(dev), c.code_map_BHW.to(dev)) for c in (codes_s, fresh)]
            else:
                codes_s = torch.stack([torch.from_numpy(r["codes_HWD"].astype(np.int64)) for r in rows])
                mismatched += int((codes_s != fresh[0]).sum())
                tokens += codes_s.numel()
                pair = [codes_s.to(dev), fresh[0].to(dev)]
            with self.encoder.autocast():
                recon_stored.append(model.decode(pair[0]).float().cpu())
                recon_direct.append(model.decode(pair[1]).float().cpu())
        psnr_stored = float(psnr_per_image(torch.cat(recon_stored), images_BCHW).mean())
        psnr_direct = float(psnr_per_image(torch.cat(recon_direct), images_BCHW).mean())
        mismatch = min(1.0, mismatched / max(tokens, 1))
        if mismatch > _MAX_TOKEN_MISMATCH[self.precision] or abs(psnr_stored - psnr_direct) > _MAX_PSNR_GAP_DB[self.precision]:
            raise StageError(
                f"precompute_codes: verification failed on {n} {split} images: stored codes differ from a fresh "
                f"encode in {mismatch:.2%} of tokens (allowed {_MAX_TOKEN_MISMATCH[self.precision]:.2%}), PSNR of "
                f"stored codes {psnr_stored:.3f} dB vs direct {psnr_direct:.3f} dB. The code shards do not match "
                f"the tokenizer in {self.stage_dir.parent / 'train_tokenizer'}; rerun precompute_codes with --force")
        metrics = {"verify_images": n, "verify_split": split, "verify_psnr": round(psnr_stored, 4),
                   "verify_psnr_direct": round(psnr_direct, 4), "verify_token_mismatch": mismatch}
        tok_done = RunDir(self.stage_dir.parent).read_done("train_tokenizer") or {}
        if "psnr" in tok_done.get("metrics", {}):
            # Informational: the tokenizer's eval used other images, so only a large gap means anything.
            metrics["tokenizer_eval_psnr"] = tok_done["metrics"]["psnr"]
        return metrics
