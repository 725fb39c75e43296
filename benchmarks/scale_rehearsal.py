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
Results: benchmarks/results/scale_rehearsal.json, a section of BENCHMARKS.md (benchmarks/report.py;
docs/rehearsal.md explains how to read it).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

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
    peaks = {stage: (float(peak), float(after)) for stage, _, peak, after in STAGE_LINE.findall(out.stdout)}
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


def machine_load() -> str:
    """The load average when the result is written; above the core count other jobs shared the machine."""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    shared = " (more than the cores: shared with other jobs, the seconds are upper bounds)" if load > cores + 0.5 \
        else ""
    return f"; load average {load:.1f} when written{shared}"


def section(results: dict, presets: list[str], command: str, per_class: int) -> dict:
    """The BENCHMARKS.md section (benchmarks/README.md's schema) of what has been measured so far."""
    from report import describe_machine

    rows, slices, failed = [], [], []
    for preset in presets:
        if preset not in results:
            continue
        r = results[preset]
        for stage, s in r["stages"].items():
            rows.append([preset, stage, s["seconds"], s["peak_rss_gib"], s["rss_after_release_gib"]])
        known = [s["peak_rss_gib"] for s in r["stages"].values() if s["peak_rss_gib"] is not None]
        rows.append([preset, "whole run", r["seconds"], max(known, default=None), None])
        if r["error"]:
            failed.append(f"{preset}: {r['error']}")
    for name in SLICES:
        s = results.get(name)
        if s is None:
            continue
        if "error" in s:
            failed.append(f"slice {name}: {s['error']}")
            continue
        slices.append([name, s["width"], s["layers"], s["parameters"], s["full_parameters"], s["loss"], s["seconds"],
                       s["peak_rss_gib"]])
    pending = [p for p in presets if p not in results]
    priors = "; ".join(f"{p}: {PRIORS[p][1]}" for p in presets)
    reading = (f"{len(presets) - len(pending) - len([f for f in failed if not f.startswith('slice')])} of "
               f"{len(presets)} presets ran all six stages" + (f"; not run: {', '.join(pending)}" if pending else "")
               + (f"; failed: {' | '.join(failed)}" if failed else "") + ".")
    return {
        "title": "Scale rehearsal: the ImageNet presets at their real shapes",
        "measures": ("Seconds and peak RSS per stage of `tessera run` on each ImageNet preset with its real tokenizer "
                     "and codebook and a full-width prior, two steps per training stage, on a generated 256 px "
                     "ImageFolder; and one forward+backward of full-width slices of rq-1.4b and rq-3.8b."),
        "command": command,
        "machine": describe_machine("cpu") + machine_load(),
        "tables": [
            {"caption": f"Priors: {priors}. 10 classes x {per_class} images; 8 samples; random LPIPS/Inception "
                        f"weights. The whole run's peak is its largest stage's (memory released between stages).",
             "columns": ["preset", "stage", "seconds", "peak RSS (GiB)", "RSS after release (GiB)"], "rows": rows},
            {"caption": "Full-width slices, one forward + backward at batch 1, fp32, in a fresh process",
             "columns": ["prior", "width", "layers", "parameters", "full model", "loss", "seconds", "peak RSS (GiB)"],
             "rows": slices},
        ],
        "reading": reading,
        "order": 70,
        "data": results,
    }


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
    from report import command_line, write_section

    for item in args.prior:
        preset, _, overrides = item.partition("=")
        PRIORS[preset] = (overrides.split(), overrides)
    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    root = make_image_folder(work / f"imagefolder256_{args.per_class}", per_class=args.per_class)
    lpips = make_lpips_weights(work / "lpips_vgg16_random.pth")
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    command = command_line("benchmarks/scale_rehearsal.py")
    results: dict = {}

    def write() -> None:  # after every preset and slice: an interrupted rehearsal keeps what it measured
        write_section(Path(args.out), section(results, presets, command, args.per_class))

    if not args.no_slices:  # first: minutes, and they say whether the largest priors build at all
        for name in SLICES:
            results[name] = run_slice(name)
            print(f"[rehearsal] slice {name}: {results[name]}", flush=True)
            write()
    for preset in presets:
        print(f"[rehearsal] {preset} ...", flush=True)
        results[preset] = run_preset(preset, work, root, lpips)
        print(f"[rehearsal] {preset}: {results[preset]['error'] or 'all six stages done'} in "
              f"{results[preset]['seconds']} s", flush=True)
        write()


if __name__ == "__main__":
    main()
