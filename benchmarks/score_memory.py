"""Peak RSS of the score stage's metrics at ImageNet scale: N generated vs N reference Inception
features (synthetic, seeded), FID + KID + precision/recall as the score stage computes them
(pipeline/evaluation/scoring.py: precision/recall in blocks of ~1 GiB of distances).

    python benchmarks/score_memory.py [--num 50000] [--dim 2048] [--device cpu]

Writes benchmarks/results/score_memory_<device>.json, a section of BENCHMARKS.md
(benchmarks/report.py). The Inception forward passes are not included (their memory does not
depend on N: batches of score.batch_size images).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline.config.root import load_config  # noqa: E402
from pipeline.evaluation.scoring import compute_metrics, statistics  # noqa: E402
from pipeline.runtime.memory import current_rss_bytes, peak_rss_bytes, reset_peak_rss  # noqa: E402

from report import RESULTS, command_line, describe_machine, write_section  # noqa: E402

GIB = 2 ** 30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num", type=int, default=50000, help="generated and reference feature vectors each")
    parser.add_argument("--dim", type=int, default=2048, help="feature dimension (Inception pool: 2048)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    generated = torch.randn(args.num, args.dim)
    real = torch.randn(args.num, args.dim) + 0.05
    reference = {**statistics(real), "features": real, "source": "synthetic"}
    baseline = current_rss_bytes()
    reset_peak_rss()
    rows = []
    for metric in ("fid", "kid", "prc"):
        start = time.perf_counter()
        values = compute_metrics({"2048": generated}, reference, [metric], source="synthetic",
                                 device=torch.device(args.device))
        rows.append([metric, round(time.perf_counter() - start, 1), round(peak_rss_bytes() / GIB, 2),
                     {k: round(v, 5) for k, v in values.items()}])
        print(rows[-1], flush=True)
    limit = load_config("configs/imagenet256-rq.yaml", []).launcher.score.mem_gb
    peak = max(r[2] for r in rows)
    section = {
        "title": f"Score stage memory: {args.num:,} vs {args.num:,} features ({args.device})",
        "measures": ("Peak resident memory of the score stage's FID, KID and precision/recall (blocked, "
                     "~1 GiB of distances at a time) on synthetic seeded features, against the ImageNet "
                     "preset's launcher.score.mem_gb."),
        "command": command_line("benchmarks/score_memory.py"),
        "machine": describe_machine(args.device, torch.get_num_threads()) + " (shared with other jobs)",
        "tables": [{"columns": ["metric", "seconds", "peak RSS so far (GiB)", "values"],
                    "rows": [[m, sec, rss, ", ".join(f"{k}={v}" for k, v in values.items())]
                             for m, sec, rss, values in rows]}],
        "reading": (f"Peak {peak:.2f} GiB (features of both sets loaded: {baseline / GIB:.2f} GiB) against "
                    f"launcher.score.mem_gb={limit}: {'fits' if peak < limit else 'DOES NOT FIT'}."),
        "order": 75,
        "data": {"num": args.num, "dim": args.dim, "peak_gib": peak, "baseline_gib": baseline / GIB,
                 "mem_gb": limit},
    }
    write_section(Path(args.out) if args.out else RESULTS / f"score_memory_{args.device}.json", section)


if __name__ == "__main__":
    main()
