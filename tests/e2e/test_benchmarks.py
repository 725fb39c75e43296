"""Smoke runs of the benchmark scripts, so they cannot rot unnoticed (timings are never asserted)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]


def test_rate_distortion_quick(tmp_path):
    variants = "vq-coarse,rq-d2,dq-r0.5"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/rate_distortion.py"), "--quick",
                           "--out-dir", str(tmp_path), "--variants", variants],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "results/rate_distortion.json").read_text())
    by_name = {v["name"]: v for v in result["variants"]}
    assert sorted(by_name) == sorted(variants.split(","))
    assert by_name["vq-coarse"]["codes_per_image"] == 16 and by_name["rq-d2"]["codes_per_image"] == 32
    assert 16 <= by_name["dq-r0.5"]["codes_per_image"] <= 64          # between all-coarse and all-fine
    assert by_name["rq-d2"]["bits_per_image"] == 32 * 8                # K = 256
    for v in result["variants"]:
        assert v["psnr"] > 5 and v["fd_random_features"] > 0 and v["train_wall_time_s"] > 0
        assert 0 <= v["class_acc"] <= 1 and 0 <= v["class_acc_baseline_downsample"] <= 1
    # The probe classifier recognises the originals by shape and colour
    # (quick: 256 train images; colour alone would give at most 0.5, chance is 0.1)
    assert result["reference"]["class_acc_originals"] > 0.6 and result["budget"]["synthetic_style"] == "shapes"
    assert (tmp_path / "results/rate_distortion.png").stat().st_size > 10_000
    assert "| RQ 4x4x2 |" in proc.stdout                              # the markdown table is printed
    section = json.loads((tmp_path / "results/section.json").read_text())  # the report's section, valid
    assert section["tables"][0]["rows"][1][0] == "RQ 4x4x2" and section["images"][0]["path"].endswith(".png")


def test_prior_training_step_benchmark_runs_the_gpu_suite_code_path_on_cpu(tmp_path):
    """benchmarks/gpu_suite.sh runs `prior_training.py step` on rq-1.4b; the same code on a tiny model."""
    out = tmp_path / "step.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/prior_training.py"), "step", "--device", "cpu",
                           "--preset", "rq-demo", "--micro-batch", "4", "--steps", "1", "--warmup", "0",
                           "--codebook-size", "64", "--code-dim", "16", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    section = json.loads(out.read_text())
    (row,) = section["data"]["rows"]
    assert section["tables"][0]["rows"][0][0] == row["backend"]
    assert row["tokens_per_s"] > 0 and row["zero_stage"] == 2 and row["grad_checkpointing"] is True
    assert abs(row["loss"] - 4.16) < 0.5  # ln 64 at initialisation


def test_data_throughput_quick(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/data_throughput.py"), "--num-64", "48",
                           "--num-256", "8", "--workers", "0,1", "--out", str(tmp_path / "data_throughput.json")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    section = json.loads((tmp_path / "data_throughput.json").read_text())
    rows = section["data"]["rows"]
    assert len(rows) == 2 * 5 * 2  # resolutions x readers x worker counts
    # Every reader delivered the whole split (timings are not asserted).
    assert all(r["images"] == (48 if r["resolution"] == 64 else 8) and r["images_per_s"] > 0 for r in rows)
    # One table row per reader, one column per resolution x worker count.
    assert len(section["tables"][0]["rows"]) == 5 and len(section["tables"][0]["columns"]) == 1 + 2 * 2
    assert "| stream reader, pipe:cat URL |" in proc.stdout
