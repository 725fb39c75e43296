"""End-to-end wall time of the demo pipeline, per stage: runs `tessera run CONFIG` in a fresh run
directory and reads each stage's wall time and key numbers from its done.json.

    python benchmarks/demo_wall_time.py configs/demo-rq.yaml            # ~8-10 min on 2 CPU cores
    python benchmarks/demo_wall_time.py configs/demo-dq.yaml --run-dir /tmp/dq

Writes benchmarks/results/demo_wall_time_<config>.json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
STAGES = ("shard", "train_tokenizer", "precompute_codes", "train_prior", "sample", "score")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="e.g. configs/demo-rq.yaml")
    ap.add_argument("--run-dir", type=Path, default=None, help="fresh run directory (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="tessera-demo-")) / "run"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a timing needs every stage to run, none skipped
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline.cli", "run", args.config, "--run-dir", str(run_dir)],
                   cwd=REPO, check=True)
    total = time.perf_counter() - start
    rows = []
    for stage in STAGES:
        done = json.loads((run_dir / stage / "done.json").read_text())
        rows.append({"stage": stage, "wall_time_s": done["wall_time_s"], "metrics": done["metrics"]})
    print(f"\n# {args.config} on {platform.node()} ({platform.processor() or 'cpu'})")
    print("| stage | wall time (s) |\n|---|---|")
    for row in rows:
        print(f"| {row['stage']} | {row['wall_time_s']:.1f} |")
    print(f"| total (the command, with start-up) | {total:.1f} |")
    out = args.out or RESULTS / f"demo_wall_time_{Path(args.config).stem}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": args.config, "command_wall_s": total, "stages": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
