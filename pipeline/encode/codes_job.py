"""Encoding a shard set into code units: the precompute_codes stage's plan, its per-unit encoding,
its manifest and the final check of stored codes against a fresh encode.

Code unit j of a split encodes input shard j of that split; batches never cross a unit boundary
and always start at its first image, so a unit's bytes do not depend on the number of workers.
Train images may get extra views (hflip / tencrop); val keeps the plain view.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..data.codes_writer import VIEW_NAMES, CodeEncoder, CodeLayout, UnitStats, make_views
from ..data.reader import ShardedImageDataset, indexes_urls
from ..data.stream_reader import shard_batches
from ..evaluation.metrics import psnr_per_image
from ..models.dq_order import dq_codes_from_tokens
from ..runner.artifacts import TOKENIZER_CONFIG, TOKENIZER_WEIGHTS, load_tokenizer
from ..runner.units import Unit
from ..runtime.cpus import capped_workers
from ..runtime.dist import resolve_precision
from ..runtime.errors import StageError
from ..runtime.io import read_json, sha256_file, sha256_json

MANIFEST_VERSION = 1
AUGMENTED_SPLITS = ("train",)  # val keeps the plain view only: its loss should measure real images
# Verification: stored codes vs a fresh encode of the same images. bf16 kernels may break argmin
# ties differently between batch shapes, so a few differing tokens are tolerated there (not in fp32).
_MAX_TOKEN_MISMATCH = {"fp32": 0.0, "bf16": 0.01}
_MAX_PSNR_GAP_DB = {"fp32": 1e-3, "bf16": 0.1}


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
    def create(cls, manifest_path: Path, tok_dir: Path, cfg, stage_dir: Path, device: torch.device) -> "CodesJob":
        """`manifest_path`: the shard stage's manifest; `tok_dir`: the exported tokenizer's folder."""
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
                                num_workers=capped_workers(self.cfg.data.num_workers))
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
                                 f"{row['view']}; the unit is out of order, rerun with --force")
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
        psnr_gap = abs(psnr_stored - psnr_direct)
        if mismatch > _MAX_TOKEN_MISMATCH[self.precision] or psnr_gap > _MAX_PSNR_GAP_DB[self.precision]:
            raise StageError(
                f"precompute_codes: verification failed on {n} {split} images: stored codes differ from a fresh "
                f"encode in {mismatch:.2%} of tokens (allowed {_MAX_TOKEN_MISMATCH[self.precision]:.2%}), PSNR of "
                f"stored codes {psnr_stored:.3f} dB vs direct {psnr_direct:.3f} dB. The code shards do not match "
                f"the tokenizer in {self.stage_dir.parent / 'train_tokenizer'}; rerun precompute_codes with --force")
        metrics = {"verify_images": n, "verify_split": split, "verify_psnr": round(psnr_stored, 4),
                   "verify_psnr_direct": round(psnr_direct, 4), "verify_token_mismatch": mismatch}
        return metrics
