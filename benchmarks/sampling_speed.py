"""Sampling speed of the RQ-Transformer (8x8x4 codes) vs a plain raster transformer of the same
parameter count on 16x16x1 codes: the paper's comparison (the authors' measure_throughput/,
which builds the raster model as an RQ-Transformer with depth 1 and no depth layers, as here).

Images/s of the prior alone (code generation; the tokenizer decode is the same kind of cost for
both and is left out), KV cache on vs off, several batch sizes. Random weights: speed does not
depend on them. Median of --repeats timed runs after one warm-up.

    python benchmarks/sampling_speed.py --device cpu             # small models, minutes on 2 cores
    python benchmarks/sampling_speed.py --device cuda            # rq-1.4b vs a 1.4B raster model, bf16
    python benchmarks/sampling_speed.py --plot RESULTS.json      # redraw the PNG of saved results

Writes benchmarks/results/sampling_speed_<device>.json (a section of BENCHMARKS.md, benchmarks/report.py)
and the PNG beside it.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402

from pipeline.config.schema import build_section  # noqa: E402
from pipeline.generation.rq_sampler import sample_rq  # noqa: E402
from pipeline.generation.sampling import SamplingOptions  # noqa: E402
from pipeline.models.prior_config import CodeSpec, PriorConfig  # noqa: E402
from pipeline.models.registry import build_prior  # noqa: E402

from report import RESULTS, command_line, describe_machine, write_section  # noqa: E402

# name -> (prior config values, code spec). Raster = RQ layers all spatial, depth 1, no depth layers.
SETUPS = {
    "cpu": {
        "rq 8x8x4": (dict(kind="rq", embed_dim=256, n_head=8, spatial_layers=6, depth_layers=2, num_classes=10),
                     CodeSpec("rq", 1024, 64, 8, 8, 4)),
        "raster 16x16x1": (dict(kind="rq", embed_dim=256, n_head=8, spatial_layers=8, depth_layers=0,
                                num_classes=10), CodeSpec("rq", 1024, 64, 16, 16, 1)),
    },
    "cuda": {
        "rq-1.4b 8x8x4": (dict(preset="rq-1.4b"), CodeSpec("rq", 16384, 256, 8, 8, 4)),
        "raster-1.4b 16x16x1": (dict(preset="rq-1.4b", spatial_layers=48, depth_layers=0),
                                CodeSpec("rq", 16384, 256, 16, 16, 1)),
    },
}


def build(values: dict, spec: CodeSpec, device: str) -> torch.nn.Module:
    cfg = build_section(PriorConfig, dict(values, grad_checkpointing=False), "prior")
    torch.manual_seed(0)
    with torch.device(device):
        model = build_prior(cfg, spec, torch.randn(spec.codebook_size, spec.code_dim))
    return model.eval()


def time_sampling(model, batch: int, device: str, use_cache: bool, repeats: int) -> float:
    labels = torch.arange(batch) % max(model.num_classes, 1) if model.num_classes else None
    opts = SamplingOptions(top_k=[model.K], top_p=[0.92])

    def once() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            sample_rq(model, labels, range(batch), seed=0, opts=opts, use_cache=use_cache)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    once()  # warm-up
    return statistics.median(once() for _ in range(repeats))


def plot(results: dict, path: Path) -> None:
    """Images/s per batch size (log scale), one bar per model x KV cache, as a PNG next to the JSON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    series = sorted({(r["model"], r["kv_cache"]) for r in rows}, key=lambda k: (k[0], not k[1]))
    batches = sorted({r["batch"] for r in rows})
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(8.5, 3.6))
    for i, (model, cache) in enumerate(series):
        xs, ys = [], []
        for j, batch in enumerate(batches):
            row = next((r for r in rows if (r["model"], r["kv_cache"], r["batch"]) == (model, cache, batch)), None)
            if row:
                xs.append(j + (i - (len(series) - 1) / 2) * width)
                ys.append(row["images_per_s"])
        ax.bar(xs, ys, width, label=f"{model}, KV cache {'on' if cache else 'off'}")
    ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
    ax.set_yscale("log")
    ax.set_ylabel("images / s (codes only)")
    ax.set_title(f"Prior sampling speed on {results['device']} (torch {results['torch']})")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def section(results: dict, command: str, machine: str, image: Path) -> dict:
    """The BENCHMARKS.md section of one device's rows, with the RQ / raster ratio per batch.

    The plot is referred to where it belongs, beside the result file in benchmarks/results/, even when
    the run wrote both elsewhere (gpu_suite.sh writes to its OUT_DIR: copy the PNG with the JSON)."""
    rows = results["rows"]
    table = [[r["model"], f"{r['params'] / 1e6:.1f}M", r["codes"], r["batch"], "on" if r["kv_cache"] else "off",
              f"{r['images_per_s']:.3g}"] for r in rows]
    models = list(dict.fromkeys(r["model"] for r in rows))
    ratios = []
    for batch in dict.fromkeys(r["batch"] for r in rows):
        cached = {r["model"]: r["images_per_s"] for r in rows if r["batch"] == batch and r["kv_cache"]}
        if len(models) == 2 and all(m in cached for m in models):
            ratios.append([batch, f"{cached[models[0]] / cached[models[1]]:.2f}x"])
    device = results["device"]
    return {
        "title": f"Prior sampling speed, {device.upper()}: RQ 8x8x4 vs raster 16x16x1",
        "order": 40,
        "measures": "Images/s of code generation alone (random weights, median of repeats after a warm-up), "
                    "the RQ-Transformer on 8x8x4 codes against a raster transformer of about the same "
                    "parameter count on 16x16x1 codes (an RQ-Transformer with depth 1 and no depth layers, "
                    "as the authors' measure_throughput/ builds it), KV cache on and off.",
        "command": command,
        "machine": machine,
        "tables": [{"columns": ["model", "params", "codes", "batch", "KV cache", "images/s"], "rows": table},
                   {"caption": "RQ over raster, KV cache on:", "columns": ["batch", "speed-up"], "rows": ratios}],
        "images": [{"path": str((RESULTS / image.name).relative_to(REPO)),
                    "alt": f"Sampling speed on {device}: RQ vs raster, KV cache on and off"}],
        "data": results,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    ap.add_argument("--uncached-batch-sizes", type=int, nargs="+", default=None,
                    help="batch sizes also timed without the KV cache (slow)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None, metavar="RESULTS_JSON",
                    help="only redraw the PNG of saved results")
    args = ap.parse_args()
    if args.plot:
        plot(json.loads(args.plot.read_text())["data"], args.plot.with_suffix(".png"))
        print(f"wrote {args.plot.with_suffix('.png')}")
        return
    dev = args.device
    batches = args.batch_sizes or ([1, 8, 32] if dev == "cpu" else [16, 64, 256])
    uncached = args.uncached_batch_sizes if args.uncached_batch_sizes is not None else ([8] if dev == "cpu" else [64])
    rows = []
    device_name = torch.cuda.get_device_name() if dev == "cuda" else platform.processor() or "cpu"
    print(f"# sampling speed on {dev}: {device_name}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print("| model | params | codes | batch | KV cache | images/s |")
    print("|---|---|---|---|---|---|")
    for name, (values, spec) in SETUPS[dev].items():
        model = build(values, spec, dev)
        n_params = sum(p.numel() for p in model.parameters())
        for batch in batches:
            for use_cache in ((True, False) if batch in uncached else (True,)):
                seconds = time_sampling(model, batch, dev, use_cache, args.repeats)
                row = dict(model=name, params=n_params, codes=f"{spec.height}x{spec.width}x{spec.depth}",
                           batch=batch, kv_cache=use_cache, seconds=seconds, images_per_s=batch / seconds)
                rows.append(row)
                print(f"| {name} | {n_params / 1e6:.1f}M | {row['codes']} | {batch} | {'on' if use_cache else 'off'} "
                      f"| {row['images_per_s']:.2f} |", flush=True)
        del model
    out = args.out or RESULTS / f"sampling_speed_{dev}.json"
    results = {"device": dev, "torch": torch.__version__, "rows": rows}
    result = section(results, command_line("benchmarks/sampling_speed.py"),
                     describe_machine(dev, torch.get_num_threads()), out.resolve().with_suffix(".png"))
    speedups = ", ".join(f"batch {b}: {x}" for b, x in result["tables"][1]["rows"])
    print(f"\nRQ / raster speed-up (KV cache on): {speedups}")
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(results, out.with_suffix(".png"))
    write_section(out, result)

if __name__ == "__main__":
    main()
