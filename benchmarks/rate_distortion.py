"""Benchmark: rate-distortion of the tokenizers (VQ / RQ / DQ) on the embedded dataset, equal budget.

    python benchmarks/rate_distortion.py [--steps N] [--force] [--resolution 32] [--out-dir runs/rate-distortion]
                                         [--variants vq-fine,vq-coarse,rq-d2,rq-d4,dq-r0.5] [--quick]

Everything goes through the real pipeline: `run_stage("shard", ...)` once into OUT_DIR/shared, then
`run_stage("train_tokenizer", ...)` per variant in OUT_DIR/<variant> (whose `shard` folder is a
symlink to the shared one), configs from `load_config("configs/demo-rq.yaml", overrides)`. All
variants share steps, batch, lr, schedule, seed, base width (ch, z_channels), codebook size and the
reconstruction loss (l2, so PSNR compares like with like).
The budget (steps, batch, lr, warm-up) defaults to configs/demo-rq.yaml's; options override it.

Per variant: codes per image, bits per image (codes x log2 K), val PSNR, codebook usage per depth
and the two trivial baselines (from the train_tokenizer stage's own evaluation); the accuracy of
the run's probe classifier (pipeline/train/classifier.py, trained once on the shared train
shards) on the reconstructions, beside its accuracy on the originals and on the same-bits
downsample: whether the codes keep what makes each class, which PSNR does not tell; plus a Frechet
distance between reconstructions and originals on the val split (pipeline.evaluation.metrics.frechet_distance,
the formula FID uses) over the 256-d features of a FIXED, seeded, RANDOMLY INITIALISED 4-layer conv
net at native resolution (no Inception weights can be downloaded here). That "random-feature FD"
is only comparable within one results table.

Reruns are resumable: finished stages are skipped by the pipeline. Writes RESULTS_DIR/
rate_distortion.json and rate_distortion.png (RESULTS_DIR: benchmarks/results/<style>, or
OUT_DIR/results with --quick), prints a markdown table, and writes the BENCHMARKS.md section
(benchmarks/report.py) to benchmarks/results/rate_distortion_<RESULTS_DIR name>.json (with --quick:
RESULTS_DIR/section.json).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from pipeline.config.root import load_config  # noqa: E402
from pipeline.data.reader import make_image_loader  # noqa: E402
from pipeline.evaluation.metrics import (  # noqa: E402
    downsample_baseline,
    downsample_side_for_bits,
    frechet_distance,
    mean_colour_baseline,
    psnr_per_image,
)
from pipeline.runner.artifacts import load_tokenizer  # noqa: E402
from pipeline.runner.stage import run_stage  # noqa: E402
from pipeline.train.classifier import classifier_for_run  # noqa: E402

from rate_distortion_report import publish  # noqa: E402
from report import RESULTS  # noqa: E402

BASE_CONFIG = REPO / "configs" / "demo-rq.yaml"
FEATURE_SEED = 20240617
FEATURE_DIM = 256

# name -> (kind of plot point, tokenizer overrides). Grids are those at 32 px; `label()` derives
# the actual grid side from the resolution.
VARIANTS: dict[str, list[str]] = {
    "vq-fine": ["tokenizer.preset=vq-demo", "tokenizer.patch_size=2"],           # 2 x 2**1 downsampling: 8x8 at 32 px
    "vq-coarse": ["tokenizer.preset=vq-demo"],                                   # 4 x 2**1: 4x4
    "rq-d2": ["tokenizer.preset=rq-demo", "tokenizer.depth=2"],                  # 4x4x2
    "rq-d4": ["tokenizer.preset=rq-demo", "tokenizer.depth=4"],                  # 4x4x4
    "dq-r0.5": ["tokenizer.preset=dq-demo", "tokenizer.target_ratio=0.5"],       # coarse 4x4 / fine 8x8
    # Not in the default set: DQ with an l1 reconstruction loss (the paper preset's).
    "dq-r0.5-l1": ["tokenizer.preset=dq-demo", "tokenizer.target_ratio=0.5", "tokenizer.recon_loss=l1"],
}
DEFAULT_VARIANTS = ["vq-fine", "vq-coarse", "rq-d2", "rq-d4", "dq-r0.5"]


def label(name: str, cfg) -> str:
    t = cfg.tokenizer
    side = cfg.data.resolution // t.downsample_factor
    if t.kind == "vq":
        return f"VQ {side}x{side}"
    if t.kind == "rq":
        return f"RQ {side}x{side}x{t.depth}"
    extra = " (l1)" if t.recon_loss == "l1" else ""
    return f"DQ {side}x{side}/{2 * side}x{2 * side} r={t.target_ratio:g}{extra}"


# ---------------------------------------------------------------------------------------------
# Random-feature Frechet distance
# ---------------------------------------------------------------------------------------------
def random_feature_net(seed: int = FEATURE_SEED) -> nn.Module:
    """4 conv layers (3->32->64->128->256, ReLU, strides 1,2,2,2) + global average pool -> 256-d.

    Weights: Kaiming-normal from a private generator seeded by `seed` (independent of the global
    RNG), biases zero; never trained. Fixed across variants, so distances are comparable in a table.
    """
    widths = [3, 32, 64, 128, FEATURE_DIM]
    layers: list[nn.Module] = []
    for i in range(4):
        layers += [nn.Conv2d(widths[i], widths[i + 1], 3, stride=1 if i == 0 else 2, padding=1), nn.ReLU()]
    net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net:
            if isinstance(module, nn.Conv2d):
                fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * math.sqrt(2.0 / fan_in))
                module.bias.zero_()
    return net.eval()


# ---------------------------------------------------------------------------------------------
# Pipeline
# ---------------------------------------------------------------------------------------------
def common_overrides(args) -> list[str]:
    tc = "tokenizer_train"
    return [f"data.resolution={args.resolution}", f"data.num_train={args.num_train}", f"data.num_val={args.num_val}",
            f"{tc}.steps={args.steps}", f"{tc}.batch_size={args.batch_size}", f"{tc}.lr={args.lr}",
            f"{tc}.warmup_steps={min(args.warmup_steps, max(0, args.steps - 1))}",
            f"{tc}.checkpoint_every={max(1, args.steps // 3)}", f"{tc}.eval_images={args.num_val}",
            f"data.synthetic_style={args.style}",
            # The benchmark scores every variant with one shared classifier and its own random-feature FD
            # (evaluate() below); the stage's rFID would add an Inception pass per variant that no table reads.
            f"{tc}.eval_classifier=false", f"{tc}.rfid_images=0", f"seed={args.seed}", "name=rate-distortion"]


def run_variant(name: str, args, shard_dir: Path) -> dict:
    cfg = load_config(BASE_CONFIG, [*common_overrides(args), *VARIANTS[name]])
    run_dir = args.out_dir / name
    run_dir.mkdir(parents=True, exist_ok=True)
    link = run_dir / "shard"
    if not link.is_symlink():
        link.symlink_to(shard_dir.resolve(), target_is_directory=True)
    print(f"[rate-distortion] {name} ({label(name, cfg)}): train_tokenizer in {run_dir}", flush=True)
    outcome = run_stage("train_tokenizer", cfg, run_dir, force=args.force)
    record = outcome.record
    t = cfg.tokenizer
    return {"name": name, "label": label(name, cfg), "overrides": VARIANTS[name], "kind": t.kind,
            "ch_mult": list(t.ch_mult), "patch_size": t.patch_size, "depth": t.depth, "codebook_size": t.codebook_size,
            "recon_loss": t.recon_loss, "grid": cfg.data.resolution // t.downsample_factor,
            "stage_status": outcome.status, "train_wall_time_s": record["wall_time_s"],
            "parameters": record["counts"]["parameters"], "stage_metrics": record["metrics"],
            "run_dir": str(run_dir)}


@torch.no_grad()
def first_images(shard_dir: Path, split: str, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `limit` images of a split in stored order, and their labels."""
    loader = make_image_loader(shard_dir, split, 100, shuffle=False, drop_last=False)
    chunks, labels, n = [], [], 0
    for batch in loader:
        chunks.append(batch[0])
        labels.append(batch[1])
        n += batch[0].shape[0]
        if n >= limit:
            break
    return torch.cat(chunks)[:limit], torch.cat(labels)[:limit]


def class_accuracy(classifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    return float((classifier.predict(images.clamp(-1, 1)) == labels).double().mean())


@torch.no_grad()
def features(net: nn.Module, images: torch.Tensor, batch: int = 200) -> torch.Tensor:
    return torch.cat([net(images[i:i + batch].clamp(-1, 1)) for i in range(0, images.shape[0], batch)])


@torch.no_grad()
def reconstruct(run_dir: Path, images: torch.Tensor, codebook_size: int, batch: int = 100):
    model = load_tokenizer(run_dir / "train_tokenizer")
    recons, lengths, hist = [], [], None
    for i in range(0, images.shape[0], batch):
        codes = model.encode(images[i:i + batch])
        recons.append(model.decode(codes).float())
        lengths.append(model.codes_per_image(codes).double())
        flat = codes.reshape(-1) if isinstance(codes, torch.Tensor) else torch.cat(
            [s.reshape(-1) for s in codes.sequences])
        h = torch.bincount(flat, minlength=codebook_size)
        hist = h if hist is None else hist + h
    return torch.cat(recons), torch.cat(lengths), hist


def evaluate(variants: list[dict], shard_dir: Path, args) -> dict:
    net = random_feature_net()
    originals, labels = first_images(shard_dir, "val", args.num_val)
    feats_orig = features(net, originals)
    classifier, meta = classifier_for_run(shard_dir.parent, shard_dir / "manifest.json", seed=args.seed)
    reference = {"val_images": int(originals.shape[0]), "class_acc_originals": class_accuracy(classifier, originals,
                                                                                               labels),
                 "classifier": {k: meta[k] for k in ("steps", "batch_size", "train_seconds")}}
    # Sampling-noise floor: the same number of *train* originals vs the val originals.
    train, _ = first_images(shard_dir, "train", originals.shape[0])
    reference["fd_train_vs_val_originals"] = frechet_distance(features(net, train), feats_orig)
    mean_colour = mean_colour_baseline(originals)
    reference["fd_mean_colour"] = frechet_distance(features(net, mean_colour), feats_orig)
    reference["psnr_mean_colour"] = float(psnr_per_image(mean_colour, originals).mean())
    reference["class_acc_mean_colour"] = class_accuracy(classifier, mean_colour, labels)
    for v in variants:
        recon, lengths, hist = reconstruct(Path(v["run_dir"]), originals, v["codebook_size"])
        bits = lengths * math.log2(v["codebook_size"])
        down = torch.cat([downsample_baseline(img[None], float(b)) for img, b in zip(originals, bits)])
        m = v["stage_metrics"]
        depth_usage = [m[k] for k in sorted(m) if k.startswith("usage_d")]
        v.update({
            "codes_per_image": float(lengths.mean()),
            "codes_per_image_min_max": [float(lengths.min()), float(lengths.max())],
            "bits_per_image": float(bits.mean()),
            # DQ also needs its granularity map (1 bit per coarse region) to decode; reported apart.
            "side_info_bits": float(v["grid"] ** 2) if v["kind"] == "dq" else 0.0,
            "psnr": m["psnr"],
            "psnr_recheck": float(psnr_per_image(recon, originals).mean()),
            "usage_per_depth": depth_usage,
            "usage_all_depths": float((hist > 0).double().mean() * 100),
            "fd_random_features": frechet_distance(features(net, recon), feats_orig),
            "class_acc": class_accuracy(classifier, recon, labels),
            "class_acc_baseline_downsample": class_accuracy(classifier, down, labels),
            "psnr_baseline_mean_colour": m["psnr_baseline_mean_colour"],
            "psnr_baseline_downsample": m["psnr_baseline_downsample"],
            "downsample_side": downsample_side_for_bits(float(bits.mean())),
            "fd_baseline_downsample": frechet_distance(features(net, down), feats_orig),
        })
        if v["kind"] == "dq":
            v["fine_ratio"] = (float(lengths.mean()) - v["grid"] ** 2) / (3 * v["grid"] ** 2)
    # Time-sharing reference for DQ: a fixed-length coder that codes a fraction of the images on the
    # coarse grid and the rest on the fine grid reaches any average length between the two; its mean
    # per-image PSNR is then linear in the average length.
    by_name = {v["name"]: v for v in variants}
    if {"vq-coarse", "vq-fine"} <= set(by_name):
        c, f = by_name["vq-coarse"], by_name["vq-fine"]
        for v in variants:
            if v["kind"] == "dq":
                w = (v["codes_per_image"] - c["codes_per_image"]) / (f["codes_per_image"] - c["codes_per_image"])
                v["psnr_time_sharing_vq"] = (1 - w) * c["psnr"] + w * f["psnr"]
    return reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps per variant, equal for all (default: the base config's)")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--style", choices=("shapes", "textures"), default=None,
                        help="embedded dataset style (default: the base config's data.synthetic_style)")
    parser.add_argument("--out-dir", type=Path, default=None, help="run dirs (default runs/rate-distortion)")
    parser.add_argument("--results-dir", type=Path, default=None,
                        help="JSON + PNG (default benchmarks/results/STYLE; OUT_DIR/results with --quick)")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help=f"comma-separated subset of {', '.join(VARIANTS)}")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the base config's")
    parser.add_argument("--lr", type=float, default=None, help="default: the base config's")
    parser.add_argument("--warmup-steps", type=int, default=None, help="default: the base config's")
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--num-val", type=int, default=1000,
                        help="val images (PSNR and FD use all of them; > 256 keeps the feature covariance full rank)")
    parser.add_argument("--seed", type=int, default=0,
                        help="master seed (data, init, order): a replicate with another seed also renders other images")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: on a shared 2-core machine, 2 threads per process "
                             "oversubscribe the cores and a step gets 2-4x slower)")
    parser.add_argument("--force", action="store_true",
                        help="discard train_tokenizer outputs in OUT_DIR trained with a different config")
    parser.add_argument("--replot", action="store_true",
                        help="only redraw the PNG, reprint the table and rewrite the section from "
                             "RESULTS_DIR/rate_distortion.json")
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 steps, 64 val images, own out dir")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.num_val, args.num_train, args.warmup_steps = 4, 64, 256, 1
    # The training budget defaults to the demo config's, identical for every variant.
    demo_cfg = load_config(BASE_CONFIG)
    demo = demo_cfg.tokenizer_train
    for name in ("steps", "batch_size", "lr", "warmup_steps"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(demo, name))
    args.style = args.style or demo_cfg.data.synthetic_style
    args.out_dir = args.out_dir or REPO / ("runs/rate-distortion-quick" if args.quick else "runs/rate-distortion")
    results_dir = args.results_dir or (args.out_dir / "results" if args.quick else RESULTS / args.style)
    section_path = results_dir / "section.json" if args.quick else RESULTS / f"rate_distortion_{results_dir.name}.json"
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")

    if args.replot:
        publish(json.loads((results_dir / "rate_distortion.json").read_text()), results_dir, section_path)
        return
    torch.set_num_threads(args.threads)
    start = time.time()
    base_cfg = load_config(BASE_CONFIG, common_overrides(args))
    shard_run = args.out_dir / "shared"
    print(f"[rate-distortion] shard stage in {shard_run}", flush=True)
    run_stage("shard", base_cfg, shard_run)
    shard_dir = shard_run / "shard"
    variants = [run_variant(name, args, shard_dir) for name in names]
    print("[rate-distortion] evaluating reconstructions (random-feature FD)", flush=True)
    reference = evaluate(variants, shard_dir, args)
    elapsed = time.time() - start

    results_dir.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/rate_distortion.py " + " ".join(sys.argv[1:])
    tc = base_cfg.tokenizer_train
    result = {
        "command": command.strip(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
        "budget": {"steps": tc.steps, "batch_size": tc.batch_size, "lr": tc.lr, "betas": tc.betas,
                   "warmup_steps": tc.warmup_steps, "schedule": "warmup + cosine to 0", "seed": base_cfg.seed,
                   "resolution": base_cfg.data.resolution, "num_train": base_cfg.data.num_train,
                   "num_val": base_cfg.data.num_val, "synthetic_style": base_cfg.data.synthetic_style,
                   "base_config": "configs/demo-rq.yaml",
                   "common_overrides": common_overrides(args)},
        "feature_net": {"description": "random-feature Frechet distance: 4 conv layers 3-32-64-128-256 (3x3, "
                                       "strides 1,2,2,2, ReLU), global average pool, Kaiming-normal init seeded "
                                       f"{FEATURE_SEED}, untrained; pipeline.evaluation.metrics.frechet_distance",
                        "dim": FEATURE_DIM, "seed": FEATURE_SEED},
        "reference": reference,
        "variants": variants,
        "total_wall_time_s": round(elapsed, 1),
    }
    (results_dir / "rate_distortion.json").write_text(json.dumps(result, indent=1) + "\n")
    publish(result, results_dir, section_path)
    print(f"[rate-distortion] total {elapsed:.0f} s; results in {results_dir}", flush=True)


if __name__ == "__main__":
    main()
