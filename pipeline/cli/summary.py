"""The table `tessera run` ends with: for each stage, what it produced (where the files are) and
the numbers a person checks first: codes per image, reconstruction PSNR and rFID, the prior's val
loss, sampling images/s, the score metrics (named *_uncalibrated without Inception weights) and
the probe classifier's accuracy on the samples next to its accuracy on real images.

Everything is read from the stages' done.json records, so `tessera status` and this table never
disagree, and the table can be printed for any run directory, finished or not.
"""
from __future__ import annotations

from pathlib import Path

from ..runner.rundir import RunDir
from ..runtime.progress import format_duration

# (stage, the files worth opening, in the stage folder)
OUTPUTS = {
    "shard": ("manifest.json",),
    "train_tokenizer": ("tokenizer.safetensors", "reconstructions.png"),
    "precompute_codes": ("manifest.json",),
    "train_prior": ("prior.safetensors", "samples.png"),
    "sample": ("samples.npz", "grid.png"),
    "score": ("metrics.json", "leaderboard.md"),
}


def _num(value, digits: int = 4) -> str:
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def _pick(metrics: dict, *names: str) -> tuple[str, object] | None:
    """The first of `names` present, so calibrated and *_uncalibrated metrics print under their own name."""
    for name in names:
        if name in metrics:
            return name, metrics[name]
    return None


def stage_results(name: str, done: dict) -> list[str]:
    """The key results of one finished stage as `name=value` strings."""
    m, c = done.get("metrics", {}), done.get("counts", {})
    out: list[str] = []
    if name == "shard":
        out.append(f"images: {c.get('train_images', '?')} train / {c.get('val_images', '?')} val")
        if c.get("rejected"):
            out.append(f"rejected={c['rejected']} (shard/rejected.jsonl)")
    elif name == "train_tokenizer":
        out.append(f"codes/image={_num(m.get('codes_per_image', '?'))}")
        if "psnr" in m:
            out.append(f"PSNR={m['psnr']:.2f} dB (mean-colour {m.get('psnr_baseline_mean_colour', 0):.2f}, "
                       f"same-bits downsample {m.get('psnr_baseline_downsample', 0):.2f})")
        rfid = _pick(m, "rfid", "rfid_uncalibrated")
        if rfid:
            out.append(f"{rfid[0]}={_num(rfid[1])} ({m.get('rfid_images', '?')} val images)")
        if "class_acc_reconstructions" in m:
            out.append(f"classifier on reconstructions {m['class_acc_reconstructions']:.3f} vs originals "
                       f"{m.get('class_acc_originals', 0):.3f}")
    elif name == "precompute_codes":
        out.append(f"images encoded={c.get('images', '?')}")
        if "verify_psnr" in m:
            out.append(f"decode check PSNR={m['verify_psnr']:.2f} dB")
    elif name == "train_prior":
        out.append(f"parameters={c.get('parameters', '?'):,}" if isinstance(c.get("parameters"), int)
                   else "parameters=?")
        if "val_loss" in m:
            out.append(f"val loss={m['val_loss']:.4f} nats/token")
    elif name == "sample":
        out.append(f"samples={c.get('samples', '?')}")
        if "images_per_s" in m:
            out.append(f"{m['images_per_s']:.1f} images/s")
    elif name == "score":
        for names in (("fid", "fid_uncalibrated"), ("inception_score", "inception_score_uncalibrated"),
                      ("kid", "kid_uncalibrated"), ("precision", "precision_uncalibrated"),
                      ("recall", "recall_uncalibrated")):
            found = _pick(m, *names)
            if found:
                out.append(f"{found[0]}={_num(found[1])}")
        if "classifier_accuracy_samples" in m:
            out.append(f"classifier on samples {m['classifier_accuracy_samples']:.3f} vs real val "
                       f"{m.get('classifier_accuracy_real_val', 0):.3f} (chance {m.get('classifier_chance', 0):.3f})")
    return out


def format_summary(run_dir: str | Path) -> str:
    """One block per stage: state and wall time, key results, output paths; then the grid to look at."""
    run = RunDir(run_dir)
    lines = [f"Summary of {run.root}"]
    total = 0.0
    for state in run.states():
        done = state.done or {}
        wall = done.get("wall_time_s")
        total += wall or 0.0
        details = stage_results(state.name, done) if state.state == "done" else []
        if state.state == "done":
            details += [f"-> {run.stage_dir(state.name) / f}" for f in OUTPUTS.get(state.name, ())
                        if (run.stage_dir(state.name) / f).exists()]
        lines.append(f"  {state.name:<17} {state.state:<8} {format_duration(wall):>7}  {details[0] if details else ''}")
        lines += [f"  {'':<17} {'':<8} {'':>7}  {detail}" for detail in details[1:]]
    lines.append(f"  {'total':<17} {'':<8} {format_duration(total):>7}")
    grid = run.stage_dir("sample") / "grid.png"
    if grid.exists():
        lines.append(f"Look at the samples: {grid} (rows are classes)")
    return "\n".join(lines)
