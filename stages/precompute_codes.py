"""Stage `precompute_codes`: every train/val image encoded once by the trained tokenizer ->
MDS code shards under RUN_DIR/precompute_codes/<split>/ plus manifest.json.

1. Inputs: the shard manifest and the exported tokenizer (both earlier stages must be done).
2. Plan: code unit j of a split encodes input shard j of that split; batches never cross a unit
   boundary and always start at its first image, so a unit's bytes do not depend on the number
   of workers. Train images may get extra views (hflip / tencrop); val keeps the plain view.
3. Work: worker w of W (array tasks x ranks) encodes units w, w+W, ... (pipeline.runner.units), keeping
   units an earlier attempt finished.
4. Finish: the task that finds every unit present decodes a seeded sample of stored codes, checks
   them against a fresh encode, and writes manifest.json last (under torchrun: rank 0).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from pipeline.config.schema import ConfigError
from pipeline.data.codes_writer import VIEW_NAMES, CodeEncoder, CodeLayout, UnitStats, make_views, write_code_unit
from pipeline.data.manifest import verify_shards
from pipeline.data.reader import ShardedImageDataset, indexes_urls
from pipeline.data.stream_reader import shard_batches
from pipeline.evaluation.metrics import psnr_per_image
from pipeline.models.dq_order import dq_codes_from_tokens
from pipeline.runner.artifacts import TOKENIZER_CONFIG, TOKENIZER_WEIGHTS, load_tokenizer
from pipeline.runner.rundir import RunDir
from pipeline.runner.stage import StageContext, StageError, StageResult
from pipeline.runner.units import MANIFEST_NAME, Unit, UnitWork, publish_unit
from pipeline.runtime.dist import resolve_precision
from pipeline.runtime.io import atomic_write_json, json_bytes, read_json, sha256_file, sha256_json

NAME = "precompute_codes"
SECTIONS = ("data", "tokenizer", "tokenizer_train", "precompute")
INPUT_STAGES = ("shard", "train_tokenizer")
IGNORED_KEYS = ("precompute.verify_images",)  # how much is checked at the end, not what is written
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
    return run.stage_dir("shard") / MANIFEST_NAME, run.stage_dir("train_tokenizer")


def input_fingerprints(ctx: StageContext) -> dict[str, str]:
    manifest_path, tok_dir = input_paths(ctx.run_dir)
    run = RunDir(ctx.run_dir)
    # The hashes the earlier stages recorded for exactly these files (hashing a large tokenizer again is slow).
    shard_out = run.read_done("shard").get("outputs", {})
    tok_out = run.read_done("train_tokenizer").get("outputs", {})
    return {"shard/manifest.json": shard_out.get(MANIFEST_NAME) or sha256_file(manifest_path),
            "train_tokenizer/tokenizer.safetensors": (tok_out.get(TOKENIZER_WEIGHTS)
                                                      or sha256_file(tok_dir / TOKENIZER_WEIGHTS))}


def check_config(cfg) -> None:
    if cfg.precompute.store_latents and cfg.tokenizer.kind == "dq":
        raise ConfigError("precompute.store_latents: true applies to RQ/VQ tokenizers (soft labels); this config's "
                          "tokenizer.kind is 'dq': set precompute.store_latents=false")


def verify_outputs(stage_dir: Path) -> None:
    """Every code unit against the manifest (a missing or altered one is named)."""
    manifest = read_json(stage_dir / MANIFEST_NAME)
    verify_shards(manifest, stage_dir, stage=NAME)


def run(ctx: StageContext) -> StageResult | None:
    cfg = ctx.cfg
    job = CodesJob.create(ctx.run_dir, cfg, ctx.stage_dir, ctx.device)
    work = UnitWork(ctx.stage_dir, job.plan, job.plan_id, worker=ctx.worker, num_workers=ctx.num_workers)
    ctx.logger.info("precompute plan: %d code unit(s) (%s codes, %s precision, augment=%s); worker %d of %d "
                    "encodes %d", len(job.plan), job.layout.kind, job.precision, cfg.precompute.augment, ctx.worker,
                    ctx.num_workers, len(work.mine))

    def write_one(unit: Unit, bar) -> dict:
        stats = UnitStats(job.layout)
        return publish_unit(ctx.stage_dir, unit, job.plan_id,
                            lambda path: write_code_unit(path, job.unit_rows(unit, stats, bar), job.layout, stats))

    stats = work.run(write_one, ctx.logger, desc="precompute", progress_position=ctx.env.local_rank)

    def finalize(sidecars: list[dict]) -> dict:
        checks = job.verify(sidecars, cfg.precompute.verify_images, cfg.seed)
        manifest = job.build_manifest(sidecars)
        atomic_write_json(ctx.stage_dir / MANIFEST_NAME, manifest)  # last: its presence means complete
        return {"manifest": manifest, "checks": checks}

    finished = work.finish(stats, finalize, is_main=ctx.env.is_main)
    if finished is None:
        ctx.logger.info("precompute_codes: other tasks' units are still missing; the last task writes the manifest")
        return None
    outcome, all_stats = finished
    manifest, totals = outcome["manifest"], outcome["manifest"]["totals"]
    seconds = max(max(s["seconds"] for s in all_stats), 1e-9)
    images_now = sum(s["items"] for s in all_stats)
    metrics = {"images_encoded_this_run": images_now, "images_per_s": round(images_now / seconds, 1),
               "samples_per_s": round(sum(s["rows"] for s in all_stats) / seconds, 1), **outcome["checks"]}
    counts = {"images": totals["images"], "views": totals["samples"], "units": totals["units"], "bytes": totals["bytes"],
              **{f"{split}_images": info["num_images"] for split, info in manifest["splits"].items()},
              **{f"{split}_views": info["num_samples"] for split, info in manifest["splits"].items()}}
    if job.layout.kind == "dq":
        metrics.update({f"{split}_mean_length": info["mean_length"] for split, info in manifest["splits"].items()})
    ctx.logger.info("precompute_codes: manifest written: %s; verification %s", counts, outcome["checks"])
    return StageResult(counts=counts, metrics=metrics,
                       outputs={MANIFEST_NAME: hashlib.sha256(json_bytes(manifest)).hexdigest()})


@dataclass
class CodesJob:
    stage_dir: Path
    manifest_path: Path                  # the shard stage's manifest
    datasets: dict                       # split -> ShardedImageDataset over the input shards ({}: indexed by URL)
    plan: list[Unit]
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
        model = load_tokenizer(tok_dir, device)
        layout = CodeLayout.for_tokenizer(model, meta, store_latents=pc.store_latents)
        precision = resolve_precision(pc.precision, device)
        shard_manifest = read_json(manifest_path)
        # Shards indexed by URL (data.wds_mode=index) are streamed, one unit per shard, front to back.
        datasets = {} if indexes_urls(shard_manifest) else {
            split: ShardedImageDataset(manifest_path, split) for split in shard_manifest["splits"]}
        plan = []
        for split, info in shard_manifest["splits"].items():
            start = 0
            for j, shard in enumerate(info["shards"]):
                plan.append(Unit(split, j, start, start + shard["count"], f"{split}/{split}-{j:06d}"))
                start += shard["count"]
        fingerprints = {"shard_manifest_sha256": sha256_file(manifest_path),
                        "tokenizer_sha256": sha256_file(tok_dir / TOKENIZER_WEIGHTS)}
        plan_id = sha256_json({**fingerprints, "columns": layout.columns, "precision": precision,
                               "batch_size": pc.batch_size, "augment": pc.augment, "crop_range": pc.crop_range,
                               "augmented_splits": AUGMENTED_SPLITS})
        return cls(Path(stage_dir), manifest_path, datasets, plan, plan_id, layout,
                   CodeEncoder(model, layout, device, precision), cfg, precision, fingerprints)

    def views_per_image(self, split: str) -> int:
        return len(VIEW_NAMES[self.cfg.precompute.augment]) if split in AUGMENTED_SPLITS else 1

    # ---- encoding ------------------------------------------------------------------------
    def unit_rows(self, unit: Unit, stats: UnitStats, bar):
        pc = self.cfg.precompute
        augment = pc.augment if unit.split in AUGMENTED_SPLITS else "none"
        bs = pc.batch_size
        batches = [list(range(lo, min(unit.stop, lo + bs))) for lo in range(unit.start, unit.stop, bs)]
        if self.datasets:
            loader = DataLoader(self.datasets[unit.split], batch_sampler=batches,
                                num_workers=self.cfg.data.num_workers)
        else:  # the same batches, streamed from the unit's shard
            loader = shard_batches(self.manifest_path, unit.split, unit.index, bs)
        for (images, labels, keys), indices in zip(loader, batches, strict=True):
            views = make_views(images, augment, pc.crop_range)
            yield from self.encoder.encode(images, labels, indices, list(keys), views, stats)
            bar.update(len(indices))

    def images_at(self, split: str, units: list[Unit], indices: list[int]) -> list[torch.Tensor]:
        """The unaugmented images at sorted `indices` of the split: read at random, or (shards indexed by
        URL) by streaming each unit's shard that holds one of them."""
        if self.datasets:
            return [self.datasets[split][i][0] for i in indices]
        wanted, images = set(indices), {}
        for unit in units:
            if not any(unit.start <= i < unit.stop for i in indices):
                continue
            position = unit.start
            for batch in shard_batches(self.manifest_path, split, unit.index, self.cfg.precompute.batch_size):
                for k in range(len(batch.keys)):
                    if position + k in wanted:
                        images[position + k] = batch.images[k]
                position += len(batch.keys)
        return [images[i] for i in indices]

    # ---- completion ----------------------------------------------------------------------
    def build_manifest(self, sidecars: list[dict]) -> dict:
        """Content only (no times, hosts, paths): an interrupted and an uninterrupted run give the same bytes."""
        layout, splits = self.layout, {}
        for split in read_json(self.manifest_path)["splits"]:  # every split, in the shard manifest's order
            mine = [s for unit, s in zip(self.plan, sidecars) if unit.split == split]
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

        split = "val" if any(unit.split == "val" and unit.stop > unit.start for unit in self.plan) else "train"
        units = [(unit, s) for unit, s in zip(self.plan, sidecars) if unit.split == split]
        total = sum(unit.stop - unit.start for unit, _ in units)
        n = min(num_images, total)
        if n == 0:
            return {"verify_images": 0}
        picks = np.sort(np.random.default_rng([seed, 0xC0DE5]).choice(total, size=n, replace=False))
        views, stored = self.views_per_image(split), []
        for i in picks.tolist():
            unit, _ = next((unit, s) for unit, s in units if unit.start <= i < unit.stop)
            row = LocalDataset(local=str(self.stage_dir / unit.name))[(i - unit.start) * views]
            if int(row["index"]) != i or int(row["view"]) != 0:
                raise StageError(f"precompute_codes: {unit.name} row for image {i} holds image {row['index']} view "
                                 f"{row['view']}; the unit is out of order; rerun precompute_codes with --force --from-scratch, which deletes its "
                                 f"code shards and encodes them again")
            stored.append(row)
        images_BCHW = torch.stack(self.images_at(split, [unit for unit, _ in units], picks.tolist()))
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
                f"the tokenizer in {self.stage_dir.parent / 'train_tokenizer'}; rerun precompute_codes with --force "
                f"--from-scratch, which deletes its code shards and encodes them again")
        metrics = {"verify_images": n, "verify_split": split, "verify_psnr": round(psnr_stored, 4),
                   "verify_psnr_direct": round(psnr_direct, 4), "verify_token_mismatch": mismatch}
        tok_done = RunDir(self.stage_dir.parent).read_done("train_tokenizer") or {}
        if "psnr" in tok_done.get("metrics", {}):
            # Informational: the tokenizer's eval used other images, so only a large gap means anything.
            metrics["tokenizer_eval_psnr"] = tok_done["metrics"]["psnr"]
        return metrics
