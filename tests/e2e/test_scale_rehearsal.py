"""The scale rehearsal, reduced for CI: imagenet256-rq with its real tokenizer (100M parameters,
K=16384, 8x8x4 codes at 256 px) and a full-width (1536) 1+1-layer prior, through all six stages
on 20 generated 256 px images; every stage's seconds and peak RSS are recorded."""
import json
import subprocess
import sys

import pytest
from testkit import REPO

pytestmark = pytest.mark.e2e


def test_reduced_rehearsal_runs_all_six_stages(tmp_path):
    out_json = tmp_path / "rehearsal.json"
    cmd = [sys.executable, "benchmarks/scale_rehearsal.py", "--presets", "imagenet256-rq", "--per-class", "2",
           "--prior", "imagenet256-rq=prior.spatial_layers=1 prior.depth_layers=1", "--no-slices",
           "--work-dir", str(tmp_path / "work"), "--out", str(out_json)]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=3000,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "2"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    record = json.loads(out_json.read_text())
    result = record["data"]["imagenet256-rq"]
    assert result["error"] is None, result["error"]
    for stage, s in result["stages"].items():
        assert s["seconds"] is not None and s["peak_rss_gib"] > 0, stage
    rows = {row[1]: row for row in record["tables"][0]["rows"]}  # preset, stage, seconds, peak RSS, after
    assert rows["whole run"][3] == max(s["peak_rss_gib"] for s in result["stages"].values())
    done = json.loads((tmp_path / "work/imagenet256-rq/train_tokenizer/done.json").read_text())
    assert done["counts"]["parameters"] > 90_000_000 and done["metrics"]["codes_per_image"] == 8 * 8 * 4
    config = json.loads((tmp_path / "work/imagenet256-rq/train_prior/deepspeed_config.json").read_text())
    assert config["zero_optimization"]["stage"] == 2
