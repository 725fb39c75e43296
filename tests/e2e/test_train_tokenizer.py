"""train_tokenizer end to end on a tiny config: export, exact resume after a kill, preemption,
and data parallelism (a 2-process step equals a 1-process step on the same global batch)."""
import json
import signal
import subprocess
import time

import pytest
import torch
from PIL import Image
from testkit import (
    TINY_TOKENIZER,
    assert_bitwise_equal,
    run_tokenizer,
    run_tokenizer_signalled,
    tessera,
    tokenizer_weights,
)

from pipeline.runner.artifacts import load_tokenizer

TINY = TINY_TOKENIZER
REFERENCE = ["tokenizer_train.steps=12", "tokenizer_train.checkpoint_every=4", "tokenizer_train.eval_classifier=true"]
pytestmark = pytest.mark.e2e


def weights_at_init(run_dir) -> dict:
    """The model as built before any step (same seed => same initialisation)."""
    from pipeline.config.root import load_config
    from pipeline.models.registry import build_tokenizer

    cfg = load_config("configs/demo-rq.yaml", TINY)
    torch.manual_seed(cfg.seed)
    return build_tokenizer(cfg.tokenizer, cfg.data.resolution).state_dict()


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ref")
    run_tokenizer(run_dir, *REFERENCE)
    return run_dir


def test_export_done_and_skip(reference_run):
    done = json.loads((reference_run / "train_tokenizer/done.json").read_text())
    assert done["counts"]["steps"] == 12 and done["metrics"]["eval_images"] == 16
    assert done["metrics"]["psnr"] > 0 and "usage_d0" in done["metrics"]
    # The probe classifier ran in the final eval (the weights were final before it: the other
    # tests compare their weights with this run's).
    assert 0 <= done["metrics"]["class_acc_reconstructions"] <= 1 and done["metrics"]["class_acc_originals"] > 0.1
    assert (reference_run / "classifier/classifier.safetensors").is_file()
    model = load_tokenizer(reference_run / "train_tokenizer")
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    codes = model.encode(images)
    assert codes.shape == (2, 8, 8, 4) and model.decode(codes).shape == (2, 3, 16, 16)
    grid = Image.open(reference_run / "train_tokenizer/reconstructions.png")  # originals above reconstructions
    assert grid.format == "PNG" and grid.height >= 2 * 16 and grid.width > grid.height
    again = run_tokenizer(reference_run, *REFERENCE)
    assert "train_tokenizer: skipped" in again.stdout
    assert list((reference_run / "tensorboard/train_tokenizer").iterdir())


def test_kill_and_resume_is_bitwise_equal(reference_run, tmp_path):
    run_tokenizer(tmp_path, "--stages", "shard")  # shards first, so the kill lands in training
    proc = run_tokenizer(tmp_path, "tokenizer_train.steps=12", "tokenizer_train.checkpoint_every=4",
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt_dir = tmp_path / "train_tokenizer/checkpoints"
    deadline = time.time() + 300
    while not (ckpt_dir.is_dir() and any(p.name.startswith("step_") for p in ckpt_dir.iterdir())):
        assert proc.poll() is None and time.time() < deadline, "training ended before a checkpoint appeared"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "train_tokenizer/done.json").exists()
    out = run_tokenizer(tmp_path, "tokenizer_train.steps=12", "tokenizer_train.checkpoint_every=4")
    assert "resumed from checkpoint" in (tmp_path / "train_tokenizer/log.txt").read_text()
    assert "train_tokenizer: done" in out.stdout
    assert_bitwise_equal(tokenizer_weights(tmp_path), tokenizer_weights(reference_run))


def test_preemption_signal_checkpoints_and_resumes(reference_run, tmp_path):
    out = run_tokenizer_signalled(tmp_path, 5, signal.SIGUSR1, "tokenizer_train.steps=12",
                                  "tokenizer_train.checkpoint_every=4")
    assert out.returncode == 3, out.stderr
    assert "SIGUSR1 received: checkpoint saved at step 5" in out.stderr
    steps = sorted(p.name for p in (tmp_path / "train_tokenizer/checkpoints").iterdir())
    assert steps == ["step_00000004", "step_00000005"]  # saved at the signal, not at the next multiple
    assert not (tmp_path / "train_tokenizer/done.json").exists()
    run_tokenizer(tmp_path, "tokenizer_train.steps=12", "tokenizer_train.checkpoint_every=4")
    assert "resumed from checkpoint at step 5" in (tmp_path / "train_tokenizer/log.txt").read_text()
    assert_bitwise_equal(tokenizer_weights(tmp_path), tokenizer_weights(reference_run))


def test_two_process_step_equals_one_process(tmp_path):
    # No dead-code restarts: they pick replacement vectors from rank 0's half of the batch.
    common = ["tokenizer_train.steps=1", "tokenizer.dead_code_threshold=0", "tokenizer_train.grad_clip=0"]
    run_tokenizer(tmp_path / "one", *common)
    run_tokenizer(tmp_path / "two", *common, nproc=2)
    one, two = tokenizer_weights(tmp_path / "one"), tokenizer_weights(tmp_path / "two")
    init = weights_at_init(tmp_path / "one")
    assert one.keys() == two.keys()
    lr = 2e-3  # >= demo-rq's lr (2e-4): Adam's first step moves each weight by at most lr
    for key in one:
        if one[key].dtype == torch.bool:
            assert torch.equal(one[key], two[key]), key
            continue
        # Biases that feed a GroupNorm have an exactly-zero true gradient; Adam's first step turns
        # their rounding noise into updates up to ~lr * noise / eps, so allow 5% of one step there.
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=0.05 * lr, msg=f"{key} differs")
    moved = [k for k in one if one[k].is_floating_point() and not torch.equal(one[k], init[k])]
    assert len(moved) > len(one) // 2  # the step really trained something


def test_missing_shard_stage_is_a_clear_error(tmp_path):
    out = tessera("stage", "train_tokenizer", "configs/demo-rq.yaml", "--run-dir", str(tmp_path), *TINY, check=False)
    assert out.returncode == 2 and "needs the shard stage first" in out.stderr and "Traceback" not in out.stderr


def test_dq_entropy_router_is_calibrated_before_training(tmp_path):
    run_tokenizer(tmp_path, "tokenizer_train.steps=2", "tokenizer.router=entropy", "tokenizer.target_ratio=0.25",
                  config="configs/demo-dq.yaml")
    model = load_tokenizer(tmp_path / "train_tokenizer")
    assert torch.isfinite(model.entropy_threshold)
    metrics = json.loads((tmp_path / "train_tokenizer/done.json").read_text())["metrics"]
    coarse = model.coarse_side ** 2  # each fine region costs 4 codes instead of 1
    # The threshold is a percentile of the train images, so on val the fine fraction is near the target.
    fine_ratio = (metrics["codes_per_image"] - coarse) / (3 * coarse)
    assert abs(fine_ratio - 0.25) < 0.15
