"""`tessera status RUN_DIR`: one row per stage with state, counts, wall time and key metrics.

A stage that is not done shows how far it got (checkpoint step, units written) and whether a
live process holds it (its lock lease: host, pid, SLURM job).
"""
from __future__ import annotations

from pathlib import Path

from ..runner.lock import describe_holder, live_holder
from ..runner.rundir import RunDir
from ..runtime.progress import format_duration
from ..train.checkpoint import CheckpointManager

# Shown first when a stage reports them (done.json stores keys sorted, which would bury them).
KEY_METRICS = ("psnr", "rfid", "rfid_uncalibrated", "class_acc_reconstructions", "class_acc_originals",
               "psnr_baseline_mean_colour", "psnr_baseline_downsample", "fid", "fid_uncalibrated", "inception_score",
               "classifier_accuracy_samples", "val_loss", "images_per_s", "tokenizer_eval_psnr")
_KEY_RANK = {key: i for i, key in enumerate(KEY_METRICS)}


def _fmt_mapping(d: dict, limit: int = 4) -> str:
    items = []
    ordered = sorted(d.items(), key=lambda kv: _KEY_RANK.get(kv[0], len(KEY_METRICS)))  # stable: others keep order
    for key, value in ordered[:limit]:
        if isinstance(value, float):
            value = f"{value:.4g}"
        items.append(f"{key}={value}")
    return " ".join(items) or "-"


def progress(stage_dir: Path) -> str:
    """What a partial stage has on disk: its newest checkpoint step, or the units with a sidecar."""
    steps = CheckpointManager(stage_dir / "checkpoints").steps()  # newest first
    if steps:
        return f"checkpoint step={steps[0]}"
    units = list(stage_dir.glob("*/*.json"))
    return f"units written={len(units)}" if units else "-"


def status_rows(run_dir: str | Path) -> list[list[str]]:
    rows = []
    run = RunDir(run_dir)
    for st in run.states():
        done = st.done or {}
        state, counts = st.state, _fmt_mapping(done.get("counts", {}))
        if st.state != "done":
            holder = live_holder(run.stage_dir(st.name))
            if holder is not None:
                state = f"running ({describe_holder(holder)})"
            if st.state == "partial":
                counts = progress(run.stage_dir(st.name))
        rows.append([st.name, state, counts, format_duration(done.get("wall_time_s")),
                     _fmt_mapping(done.get("metrics", {}))])
    return rows


def format_status(run_dir: str | Path, jobs: dict[str, str] | None = None) -> str:
    """The table; `jobs` (stage -> "job 123 COMPLETED", launchers/job_records.py) adds a SLURM column."""
    header = ["stage", "state", "counts", "wall time", "metrics"]
    rows = status_rows(run_dir)
    if jobs:
        header.append("slurm")
        rows = [row + [jobs.get(row[0], "-")] for row in rows]
    rows = [header] + rows
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [f"run directory: {run_dir}"]
    for i, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
