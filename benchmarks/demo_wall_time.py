"""End-to-end wall time of the demo pipeline, per stage: runs `tessera run CONFIG` in a fresh run
directory and reads each stage's wall time and key numbers from its done.json.

    python benchmarks/demo_wall_time.py configs/demo-rq.yaml            # ~8-10 min on 2 CPU cores
    python benchmarks/demo_wall_time.py configs/demo-dq.yaml --run-dir /tmp/dq

Writes benchmarks/results/demo_wall_time_<config>[_cuda].json (the suffix when a GPU ran it), a
section of BENCHMARKS.md (benchmarks/report.py). Stopped by SIGTERM or SIGINT (a time limit), it passes
the signal on to the run, waits for it to stop, and still writes the stages that finished, as a
pending section that names the ones that did not; its exit status is then the run's.
"""
from __future__ import annotations

import argparse
import json
import shutil
import signal
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


def section(config: str, command_wall_s: float, rows: list[dict], command: str, machine: str,
            stopped_by: str | None = None) -> dict:
    """The BENCHMARKS.md section of one config's run (rows: stage, wall_time_s, metrics; wall_time_s is
    None for a stage that did not finish before the run was stopped)."""
    table = [[r["stage"], round(r["wall_time_s"], 1), reached(r["stage"], r["metrics"])] if r["wall_time_s"] is not None
             else [r["stage"], "-", "not finished"] for r in rows]
    table.append(["the whole command (start-up, summary)", round(command_wall_s), ""])
    device = " on the GPU" if "CUDA" in machine else ""
    result = {
        "title": f"End-to-end demo: {Path(config).stem}{device}",
        "order": 10,
        "measures": f"Wall time per stage of a fresh `tessera run {config}` (the six stages; the install "
                    "excluded: `make run` = install + this), read from each stage's done.json, with what "
                    "each stage reached.",
        "command": command,
        "machine": machine,
        "tables": [{"columns": ["stage", "wall time (s)", "reached"], "rows": table}],
        "data": {"config": config, "command_wall_s": command_wall_s, "stages": rows},
    }
    unfinished = [r["stage"] for r in rows if r["wall_time_s"] is None]
    if unfinished:
        result["status"] = "pending"
        result["pending"] = (f"the run was stopped ({stopped_by or 'it failed'}) after {round(command_wall_s)} s, "
                             f"before {', '.join(unfinished)} finished; the table holds the stages that did.")
    return result


def run_demo(config: str, run_dir: Path) -> tuple[int, float, str | None]:
    """Run the six stages; a SIGTERM / SIGINT here is passed on to the run, which stops at a safe point.
    Returns (exit status, wall seconds, the signal's name if one stopped it)."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", config, "--run-dir", str(run_dir)],
                            cwd=REPO)
    stopped_by: list[str] = []

    def pass_on(signum, frame):
        stopped_by.append(signal.Signals(signum).name)
        proc.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, pass_on)
    rc = proc.wait()
    return rc, time.perf_counter() - start, (stopped_by[0] if stopped_by else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="e.g. configs/demo-rq.yaml")
    ap.add_argument("--run-dir", type=Path, default=None, help="fresh run directory (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="tessera-demo-")) / "run"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a timing needs every stage to run, none skipped
    rc, total, stopped_by = run_demo(args.config, run_dir)
    rows = []
    for stage in STAGES:
        done_path = run_dir / stage / "done.json"
        if done_path.is_file():
            done = json.loads(done_path.read_text())
            rows.append({"stage": stage, "wall_time_s": done["wall_time_s"], "metrics": done["metrics"]})
        else:
            rows.append({"stage": stage, "wall_time_s": None, "metrics": {}})
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    suffix = "_cuda" if device == "cuda" else ""
    out = args.out or RESULTS / f"demo_wall_time_{Path(args.config).stem}{suffix}.json"
    result = section(args.config, total, rows, command_line("benchmarks/demo_wall_time.py"), describe_machine(device),
                     stopped_by)
    print(markdown_table(result["tables"][0]["columns"], result["tables"][0]["rows"]))
    write_section(out, result)
    sys.exit(rc)

if __name__ == "__main__":
    main()
