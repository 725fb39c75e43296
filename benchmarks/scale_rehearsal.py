"""Scale rehearsal: each shipped ImageNet preset through all six stages at its real shapes, for a
couple of steps, on a generated 256 px ImageFolder; then the largest priors (rq-1.4b, rq-3.8b) built
for real as full-width, depth-reduced slices, one forward and backward each.

    python benchmarks/scale_rehearsal.py [--presets imagenet256-rq,imagenet256-rq-3.8b,imagenet256-dq]
                                         [--work-dir DIR] [--per-class 4] [--out FILE] [--no-slices]

What is real: every preset's tokenizer architecture and codebook (RQ: K=16384, 8x8x4 codes), its
data/precompute/prior_train/sample/score settings (DeepSpeed ZeRO-2, soft targets, 1000 classes,
activation checkpointing, ...) and a prior at full width (PRIORS says which). What is not: the
data (10 generated classes, a few images each), the step counts and batch sizes (2), the LPIPS
VGG16 weights and the Inception (seeded random: none can be downloaded here) and the sample count.
Each preset runs `tessera run` in its own process; the seconds of a stage come from its
done.json, its peak RSS from `tessera run`'s per-stage line (the peak is reset at every stage).
Results: benchmarks/results/scale_rehearsal.json (docs/rehearsal.md explains how to read them).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STAGES = ("shard", "train_tokenizer", "precompute_codes", "train_prior", "sample", "score")
# The prior each preset rehearses with: the largest of its family whose fp32 training state fits a
# 24 GB CPU machine at full width (rq-821m: ~13 GB of weights, gradients and AdamW moments before
# DeepSpeed's flat copies and activations does not; rq-480m measured 12 GB).
PRIORS = {
    "imagenet256-rq": (["prior.preset=rq-480m"], "rq-480m (12+4 layers, width 1536)"),
    "imagenet256-rq-3.8b": (["prior.spatial_layers=4", "prior.depth_layers=2"],
                            "rq-3.8b slice: 4+2 of its 42+6 layers at full width 2560 (518M)"),
    "imagenet256-dq": ([], "dq-large, the preset's own (6+24 layers, width 1280, 604M)"),
}
# Full width, a few layers: the per-layer shapes, the embeddings and the K=16384 heads are real.
SLICES = {
    "rq-1.4b": ("imagenet256-rq", ["prior.preset=rq-1.4b", "prior.spatial_layers=4", "prior.depth_layers=2"]),
    "rq-3.8b": ("imagenet256-rq-3.8b", ["prior.spatial_layers=4", "prior.depth_layers=2"]),
}
REHEARSAL = [
    "data.val_fraction=0.25",
    "tokenizer_train.steps=2", "tokenizer_train.batch_size=2", "tokenizer_train.warmup_steps=0",
    "tokenizer_train.eval_images=2", "tokenizer_train.rfid_images=0", "tokenizer_train.checkpoint_every=1000",
    "precompute.batch_size=4", "precompute.verify_images=2",
    "prior_train.steps=2", "prior_train.batch_size=2", "prior_train.warmup_steps=0", "prior_train.eval_images=2",
    "prior_train.eval_every=0", "prior_train.sample_every=0", "prior_train.checkpoint_every=1000",
    "prior_train.checkpoint_every_min=0",
    "sample.num_samples=8", "sample.chunk_size=8", "sample.batch_size=8",
    "score.allow_uncalibrated=true", "score.download_weights=false", "score.kid_subset_size=4", "score.batch_size=8",
]
STAGE_LINE = re.compile(r"\[tessera\] (\w+): (\w[\w-]*) \(peak RSS ([\d.]+) GiB, after release ([\d.]+) GiB\)")
GIB = 2 ** 30


def make_image_folder(root: Path, classes: int = 10, per_class: int = 4, side: int = 256) -> Path:
    """Seeded 256 px JPEGs, one folder per class: smooth colour fields plus noise."""
    import numpy as np
    from PIL import Image

    if root.is_dir():
        return root
    rng = np.random.default_rng(0)
    tmp = root.with_name(root.name + ".tmp")
    for c in range(classes):
        (tmp / f"n{c:08d}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            ramp = np.linspace(0, 1, side, dtype=np.float32)
            base = rng.uniform(0, 255, 3) * ramp[:, None, None] + rng.uniform(0, 255, 3) * ramp[None, :, None] / 2
            pixels = np.clip(base + rng.normal(0, 12, (side, side, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp / f"n{c:08d}" / f"{i}.JPEG", quality=90)
    tmp.rename(root)
    return root


def make_lpips_weights(path: Path) -> Path:
    """A seeded random VGG16 state_dict in torchvision's layout (no real weights can be fetched)."""
    import torch
    import torchvision

    if not path.is_file():
        torch.manual_seed(0)
        features = torchvision.models.vgg16(weights=None).features.state_dict()
        torch.save({f"features.{k}": v for k, v in features.items()}, path)
    return path


def run_preset(preset: str, work: Path, root: Path, lpips: Path) -> dict:
    extra, prior_name = PRIORS[preset]
    run_dir = work / preset
    cmd = [sys.executable, "-m", "pipeline.cli", "run", f"configs/{preset}.yaml", "--run-dir", str(run_dir),
           f"data.root={root}", f"tokenizer.lpips_weights={lpips}", *REHEARSAL, *extra]
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get(
                             "OMP_NUM_THREADS", "2")})
    seconds = time.perf_counter() - start
    (work / f"{preset}.log").write_text(out.stdout + "\n" + out.stderr)
    peaks = {m[1]: (float(m[3]), float(m[4])) for m in STAGE_LINE.findall(out.stdout)}
    stages = {}
    for stage in STAGES:
        done = run_dir / stage / "done.json"
        record = json.loads(done.read_text()) if done.is_file() else None
        stages[stage] = {"seconds": record and record["wall_time_s"], "peak_rss_gib": peaks.get(stage, (None,))[0],
                         "rss_after_release_gib": peaks.get(stage, (None, None))[1]}
    error = None
    if out.returncode != 0:
        lines = [line for line in out.stderr.strip().splitlines() if line.strip()]
        error = f"exit {out.returncode}: {lines[-1] if lines else 'no message'}"
    return {"prior": prior_name, "seconds": round(seconds, 1), "stages": stages, "error": error}


def run_slice(name: str) -> dict:
    """One forward + backward of a full-width slice, in a fresh process (its own peak RSS)."""
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--slice", name], cwd=REPO,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    if out.returncode != 0:
        lines = out.stderr.strip().splitlines()
        return {"error": f"exit {out.returncode}: {lines[-1] if lines else ''}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def slice_forward_backward(name: str) -> dict:
    import torch

    from pipeline.config.root import load_config
    from pipeline.losses.prior_loss import rq_prior_loss
    from pipeline.models.prior_config import CodeSpec
    from pipeline.models.registry import build_prior, build_tokenizer
    from pipeline.runtime.memory import peak_rss_bytes

    preset, overrides = SLICES[name]
    cfg = load_config(f"configs/{preset}.yaml", overrides)
    full = load_config(f"configs/{preset}.yaml", [o for o in overrides if "layers" not in o])
    with torch.device("meta"):
        spec = CodeSpec.from_tokenizer(build_tokenizer(cfg.tokenizer, cfg.data.resolution))
        full_params = sum(p.numel() for p in build_prior(full.prior, spec).parameters())
    torch.manual_seed(0)
    start = time.perf_counter()
    model = build_prior(cfg.prior, spec).train()
    codes = torch.randint(0, spec.codebook_size, (1, spec.height, spec.width, spec.depth))
    loss, _ = rq_prior_loss(model(codes, torch.tensor([3])), codes, None)
    loss.backward()
    return {"slice": name, "width": cfg.prior.embed_dim,
            "layers": f"{cfg.prior.spatial_layers}+{cfg.prior.depth_layers} of "
                      f"{full.prior.spatial_layers}+{full.prior.depth_layers}",
            "parameters": sum(p.numel() for p in model.parameters()), "full_parameters": full_params,
            "loss": round(float(loss), 4), "seconds": round(time.perf_counter() - start, 1),
            "peak_rss_gib": round(peak_rss_bytes() / GIB, 2)}


def fmt(value) -> str:
    return "-" if value is None else f"{value}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default=",".join(PRIORS), help="comma-separated presets to rehearse")
    parser.add_argument("--work-dir", default="runs/scale_rehearsal", help="run directories and the image tree")
    parser.add_argument("--per-class", type=int, default=4, help="generated images per class (10 classes)")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/scale_rehearsal.json"))
    parser.add_argument("--no-slices", action="store_true", help="skip the rq-1.4b / rq-3.8b slices")
    parser.add_argument("--prior", action="append", default=[], metavar="PRESET=OVERRIDES",
                        help="replace a preset's prior, e.g. imagenet256-dq=prior.preset=dq-base (repeatable)")
    parser.add_argument("--slice", default=None, help=argparse.SUPPRESS)  # internal: one slice, JSON on stdout
    args = parser.parse_args()
    if args.slice:
        print(json.dumps(slice_forward_backward(args.slice)))
        return
    for item in args.prior:
        preset, _, overrides = item.partition("=")
        PRIORS[preset] = (overrides.split(), overrides)
    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    root = make_image_folder(work / f"imagefolder256_{args.per_class}", per_class=args.per_class)
    lpips = make_lpips_weights(work / "lpips_vgg16_random.pth")
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    rows, notes, results = [], [], {}

    def write() -> None:
        """After every preset and slice: an interrupted rehearsal keeps what it measured."""
        from pipeline.runtime.io import atomic_write_json

        pending = [p for p in presets if p not in results]
        atomic_write_json(Path(args.out), {
            "title": "Scale rehearsal: ImageNet presets at their real shapes, two steps per training stage",
            "command": "python benchmarks/scale_rehearsal.py" + (f" --presets {args.presets}" if args.presets != ",".join(
                PRIORS) else "") + "".join(f" --prior '{p}'" for p in args.prior),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared), "
                       f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GIB:.0f} GiB, no GPU; "
                       f"{platform.platform()}",
            "columns": ["preset", "prior", "stage", "seconds", "peak RSS (GiB)", "RSS after release (GiB)"],
            "rows": rows,
            "notes": "; ".join(notes + ([f"not run yet: {', '.join(pending)}"] if pending else []) + [
                f"10 generated classes x {args.per_class} images at 256 px; tokenizer and prior 2 steps at batch 2; "
                f"8 samples; random LPIPS/Inception weights; 'whole run' peak = the largest stage peak of the one "
                f"process"]),
            "results": results,
        })

    # The slices first: minutes, and they say whether the largest priors build at all.
    if not args.no_slices:
        for name in SLICES:
            s = results[name] = run_slice(name)
            if "error" in s:
                notes.append(f"slice {name} failed: {s['error']}")
            else:
                rows.append([f"{name} slice (one fwd+bwd, batch 1)", f"{s['parameters'] / 1e6:.0f}M of "
                             f"{s['full_parameters'] / 1e9:.2f}B, width {s['width']}, layers {s['layers']}", "-",
                             fmt(s["seconds"]), fmt(s["peak_rss_gib"]), "-"])
            print(f"[rehearsal] slice {name}: {s}", flush=True)
            write()
    for preset in presets:
        print(f"[rehearsal] {preset} ...", flush=True)
        result = results[preset] = run_preset(preset, work, root, lpips)
        for stage, s in result["stages"].items():
            rows.append([preset, result["prior"], stage, fmt(s["seconds"]), fmt(s["peak_rss_gib"]),
                         fmt(s["rss_after_release_gib"])])
        known = [s["peak_rss_gib"] for s in result["stages"].values() if s["peak_rss_gib"] is not None]
        rows.append([preset, result["prior"], "whole run", fmt(result["seconds"]), fmt(max(known, default=None)),
                     "-"])
        if result["error"]:
            notes.append(f"{preset} did not complete: {result['error']} (log: {work / preset}.log)")
        print(f"[rehearsal] {preset}: {result['error'] or 'all six stages done'} in {result['seconds']} s", flush=True)
        write()
    write()
    print(Path(args.out).read_text())


if __name__ == "__main__":
    main()
