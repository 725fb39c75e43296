"""The main job end to end at the smallest size: `tessera run` through all six stages checks every
stage's outputs and ends with the summary table; a run SIGKILLed in the middle of each stage in
turn (mid-unit, mid-training, mid-scoring), then rerun, ends with the same outputs and metrics."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from testkit import REPO, TINY_TOKENIZER, tessera

pytestmark = pytest.mark.e2e

STAGES = ("shard", "train_tokenizer", "precompute_codes", "train_prior", "sample", "score")
TINY = [*TINY_TOKENIZER, "data.num_train=96", "data.num_val=32", "data.shard_max_count=16",
        "tokenizer_train.steps=8", "tokenizer_train.checkpoint_every=3", "tokenizer_train.rfid_images=32",
        "precompute.batch_size=8",
        "prior.embed_dim=32", "prior.spatial_layers=1", "prior.depth_layers=1", "prior_train.engine=ddp",
        "prior_train.steps=8", "prior_train.batch_size=8", "prior_train.checkpoint_every=3",
        "prior_train.eval_every=0", "prior_train.eval_images=16", "prior_train.sample_every=0",
        "sample.num_samples=30", "sample.chunk_size=10", "sample.batch_size=10",
        "score.download_weights=false", "score.kid_subset_size=10", "score.batch_size=16"]

# Runs the CLI with a SIGKILL planted inside KILL_STAGE: while the second unit of a unit stage is
# being written, after step 5 of a training stage (its checkpoint is at step 3), and while the score
# stage featurises the samples (after the reference was cached).
KILL_SCRIPT = r'''
import os, runpy, signal
from pathlib import Path

target = os.environ["KILL_STAGE"]
die = lambda: os.kill(os.getpid(), signal.SIGKILL)

import pipeline.runner.units as units
publish, published = units.publish_unit, []
def publish_unit(stage_dir, unit, plan_id, write):
    if Path(stage_dir).name == target:
        published.append(unit.name)
        if len(published) == 2:
            def write_then_die(tmp):
                write(tmp)
                die()
            return publish(stage_dir, unit, plan_id, write_then_die)
    return publish(stage_dir, unit, plan_id, write)
units.publish_unit = publish_unit

from testkit import TRAINERS, signal_after_step
if target in TRAINERS:
    signal_after_step(target, 5, signal.SIGKILL, rank=None)

import pipeline.evaluation.scoring as scoring
features = scoring.inception_features
def inception_features(*args, **kwargs):
    if target == "score" and kwargs.get("desc") == "samples":
        die()
    return features(*args, **kwargs)
scoring.inception_features = inception_features

runpy.run_module("pipeline.cli", run_name="__main__", alter_sys=True)
'''


def run_all(run_dir, *extra, check=True):
    return tessera("run", "configs/demo-rq.yaml", "--run-dir", str(run_dir), *TINY, *extra, check=check)


def done(run_dir, stage) -> dict:
    return json.loads((Path(run_dir) / stage / "done.json").read_text())


def results(run_dir) -> dict:
    """What must not depend on interruptions: every output hash and every metric but the rates."""
    out = {}
    for stage in STAGES:
        record = done(run_dir, stage)
        metrics = {k: v for k, v in record["metrics"].items() if not k.endswith(("_per_s", "_this_run"))}
        # score's files name the run directory; its metrics are compared instead of their hashes.
        out[stage] = (metrics, None if stage == "score" else record["outputs"])
    return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("main") / "run"
    out = run_all(run_dir)
    return run_dir, out.stdout


def test_every_stage_finishes_with_its_outputs_and_the_summary(finished):
    run_dir, stdout = finished
    for stage in STAGES:
        assert f"[tessera] {stage}: done" in stdout
    assert (run_dir / "shard" / "manifest.json").is_file()
    assert done(run_dir, "shard")["counts"]["train_images"] == 96
    tok = done(run_dir, "train_tokenizer")["metrics"]
    assert tok["codes_per_image"] == 8 * 8 * 4 and tok["rfid_images"] == 32 and tok["rfid_uncalibrated"] > 0
    assert 5 < tok["psnr"] < 60  # 8 steps: a number, not quality (BENCHMARKS.md reports the demo quality)
    assert done(run_dir, "precompute_codes")["counts"]["images"] == 128
    assert np.isfinite(done(run_dir, "train_prior")["metrics"]["val_loss"])
    with np.load(run_dir / "sample" / "samples.npz") as archive:
        assert archive["arr_0"].shape == (30, 16, 16, 3) and archive["arr_0"].dtype == np.uint8
        assert np.bincount(archive["arr_1"], minlength=10).tolist() == [3] * 10
    score = done(run_dir, "score")["metrics"]
    assert {"fid_uncalibrated", "classifier_accuracy_samples", "classifier_accuracy_real_val"} <= set(score)
    assert "fid" not in score
    # The summary: outputs, codes per image, PSNR and rFID, val loss, images/s, metrics, the grid.
    summary = stdout[stdout.index("Summary of"):]
    for text in ("codes/image=256", "PSNR=", "rfid_uncalibrated=", "val loss=", "images/s", "fid_uncalibrated=",
                 "classifier on samples", f"-> {run_dir / 'train_tokenizer' / 'tokenizer.safetensors'}",
                 f"Look at the samples: {run_dir / 'sample' / 'grid.png'}"):
        assert text in summary, text
    assert tessera("verify", str(run_dir)).returncode == 0


def test_a_kill_inside_each_stage_then_a_rerun_ends_with_the_same_results(finished, tmp_path):
    reference, _ = finished
    run_dir = tmp_path / "run"
    script = tmp_path / "kill_in_stage.py"
    script.write_text(KILL_SCRIPT)
    for stage in STAGES:
        env = {**os.environ, "KILL_STAGE": stage, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}
        out = subprocess.run([sys.executable, str(script), "run", "configs/demo-rq.yaml", "--run-dir", str(run_dir),
                              *TINY], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == -signal.SIGKILL, (stage, out.stderr[-2000:])
        assert not (run_dir / stage / "done.json").exists(), stage  # killed inside it, not after
        assert all((run_dir / s / "done.json").is_file() for s in STAGES[:STAGES.index(stage)])
    out = run_all(run_dir)
    assert "score: done" in out.stdout
    assert results(run_dir) == results(reference)
    # Training resumed from its checkpoints rather than starting over.
    for stage in ("train_tokenizer", "train_prior"):
        assert "resumed from checkpoint at step 3" in (run_dir / stage / "log.txt").read_text(), stage
