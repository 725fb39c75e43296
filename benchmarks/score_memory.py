"""Peak RSS of the score stage's metrics at ImageNet scale: N generated vs N reference Inception
features (synthetic, seeded), FID + KID + precision/recall as the score stage computes them
(pipeline/evaluation/scoring.py: precision/recall in blocks of ~1 GiB of distances).

    python benchmarks/score_memory.py [--num 50000] [--dim 2048] [--device cpu]

Writes benchmarks/results/score_memory_<device>.json. The Inception forward passes are not
included (their memory does not depend on N: batches of score.batch_size images).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config.root import load_config  # noqa: E402
from pipeline.evaluation.scoring import compute_metrics, statistics  # noqa: E402
from pipeline.runtime.io import atomic_write_json  # noqa: E402
from pipeline.runtime.memory import current_rss_bytes, peak_rss_bytes, reset_peak_rss  # noqa: E402

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
    result = {
        "title": f"Score metrics at {args.num:,} vs {args.num:,} features (dim {args.dim}), {args.device}",
        "command": f"python benchmarks/score_memory.py --num {args.num} --dim {args.dim} --device {args.device}",
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), {platform.platform()}",
        "columns": ["metric", "seconds", "peak RSS so far (GiB)", "values"],
        "rows": rows,
        "notes": (f"process RSS before the metrics (features of both sets loaded): {baseline / GIB:.2f} GiB; "
                  f"peak {peak:.2f} GiB vs launcher.score.mem_gb={limit} (imagenet256-rq.yaml): "
                  f"{'fits' if peak < limit else 'DOES NOT FIT'}. Synthetic Gaussian features, seeded."),
    }
    out = Path(args.out or Path(__file__).parent / "results" / f"score_memory_{args.device}.json")
    atomic_write_json(out, result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
