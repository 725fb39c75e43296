"""End-to-end wall time of the demo pipeline, per stage: runs `tessera run CONFIG` in a fresh run
directory and reads each stage's wall time and key numbers from its done.json.

    python benchmarks/demo_wall_time.py configs/demo-rq.yaml            # ~8-10 min on 2 CPU cores
    python benchmarks/demo_wall_time.py configs/demo-dq.yaml --run-dir /tmp/dq

Writes benchmarks/results/demo_wall_time_<config>.json, a section of BENCHMARKS.md (benchmarks/report.py).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from report import RESULTS, command_line, describe_machine, markdown_table, write_section  # noqa: E402

STAGES = ("shard", "train_tokenizer", "precompute_codes", "train_prior", "sample", "score")
# What each stage reached, in the table beside its wall time (done.json metric names).
KEY_METRICS = {
    "shard": ("images_written_this_run",),
    "train_tokenizer": ("codes_per_image", "psnr", "rfid_uncalibrated", "class_acc_reconstructions"),
    "precompute_codes": ("images_encoded_this_run", "verify_psnr"),
    "train_prior": ("val_loss",),
    "sample": ("samples_drawn_this_run", "images_per_s"),
    "score": ("fid_uncalibrated", "classifier_accuracy_samples", "classifier_accuracy_real_val"),
}


def reached(stage: str, metrics: dict) -> str:
    values = [(k, metrics[k]) for k in KEY_METRICS.get(stage, ()) if k in metrics]
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values)


def section(config: str, command_wall_s: float, rows: list[dict], command: str, machine: str) -> dict:
    """The BENCHMARKS.md section of one config's run (rows: stage, wall_time_s, metrics)."""
    table = [[r["stage"], round(r["wall_time_s"], 1), reached(r["stage"], r["metrics"])] for r in rows]
    table.append(["the whole command (start-up, summary)", round(command_wall_s), ""])
    return {
        "title": f"End-to-end demo: {Path(config).stem}",
        "order": 10,
        "measures": f"Wall time per stage of a fresh `tessera run {config}` (the six stages; the install "
                    "excluded: `make run` = install + this), read from each stage's done.json, with what "
                    "each stage reached.",
        "command": command,
        "machine": machine,
        "tables": [{"columns": ["stage", "wall time (s)", "reached"], "rows": table}],
        "data": {"config": config, "command_wall_s": command_wall_s, "stages": rows},
    }


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
    out = args.out or RESULTS / f"demo_wall_time_{Path(args.config).stem}.json"
    result = section(args.config, total, rows, command_line("benchmarks/demo_wall_time.py"), describe_machine("cpu"))
    print(markdown_table(result["tables"][0]["columns"], result["tables"][0]["rows"]))
    write_section(out, result)

if __name__ == "__main__":
    main()
