"""train_tokenizer with tokenizer_train.engine=deepspeed: ZeRO-1 and ZeRO-2 on 2 CPU processes
under torchrun, preempted or killed at a known step and resumed with weights bitwise equal to an
uninterrupted run; an incomplete newest step folder falls back to the previous one; ZeRO-3 with
the tokenizer is a config error. (The DDP back end is covered by test_train_tokenizer.py.)"""
import json
import signal

import pytest
from testkit import TINY_TOKENIZER as TINY
from testkit import assert_bitwise_equal, run_tokenizer, run_tokenizer_signalled, tessera, tokenizer_weights

pytestmark = pytest.mark.e2e

# GAN on from step 0 so the discriminator's engine is trained, saved and resumed as well.
COMMON = ["tokenizer_train.steps=12", "tokenizer_train.checkpoint_every=4", "tokenizer.dead_code_threshold=0",
          "tokenizer.gan_weight=0.5", "tokenizer.disc_start_step=0", "tokenizer.disc_ndf=8",
          "tokenizer_train.engine=deepspeed"]
# ZeRO-1 also runs with two micro-batches per step (DeepSpeed scales the loss by 1/grad_accum).
VARIANTS = {1: ["tokenizer_train.zero_stage=1", "tokenizer_train.grad_accum=2"], 2: ["tokenizer_train.zero_stage=2"]}


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Uninterrupted 2-process runs, one per ZeRO stage (built on first use)."""
    cache = {}

    def get(stage):
        if stage not in cache:
            run_dir = tmp_path_factory.mktemp(f"ds_ref_zero{stage}")
            run_tokenizer(run_dir, *COMMON, *VARIANTS[stage], nproc=2)
            cache[stage] = run_dir
        return cache[stage]
    return get


@pytest.mark.parametrize("stage", [1, 2])
def test_preempted_on_one_rank_and_resumed_is_bitwise_equal(references, tmp_path, stage):
    # SIGUSR1 reaches rank 1 only: the flag is all-reduced, so both ranks save step 5 and stop.
    out = run_tokenizer_signalled(tmp_path, 5, signal.SIGUSR1, *COMMON, *VARIANTS[stage], rank=1, nproc=2)
    assert out.returncode != 0 and "checkpoint saved at step 5" in out.stderr, out.stderr[-3000:]
    folder = tmp_path / "train_tokenizer/checkpoints/step_00000005"
    record = json.loads((folder / "complete.json").read_text())
    assert (record["engine"], record["world_size"], record["zero_stage"]) == ("deepspeed", 2, stage)
    assert {"client_rank_00000.pt", "client_rank_00001.pt", "generator/zero_pp_rank_1_mp_rank_00_optim_states.pt",
            "discriminator/mp_rank_00_model_states.pt"} <= set(record["files"])
    ds_config = json.loads((tmp_path / "train_tokenizer/deepspeed_config.json").read_text())
    assert ds_config["zero_optimization"]["stage"] == stage and ds_config["train_batch_size"] == 8
    assert ds_config["gradient_accumulation_steps"] == (2 if stage == 1 else 1)
    assert ds_config["bf16"]["enabled"] is False
    run_tokenizer(tmp_path, *COMMON, *VARIANTS[stage], nproc=2)
    assert "resumed from checkpoint at step 5" in (tmp_path / "train_tokenizer/log.txt").read_text()
    assert_bitwise_equal(tokenizer_weights(tmp_path), tokenizer_weights(references(stage)))


def test_killed_then_incomplete_newest_falls_back_and_is_bitwise_equal(references, tmp_path):
    out = run_tokenizer_signalled(tmp_path, 10, signal.SIGKILL, *COMMON, *VARIANTS[2], rank=0, nproc=2)
    assert out.returncode != 0
    ckpts = tmp_path / "train_tokenizer/checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if not p.name.startswith(".")) == ["step_00000004", "step_00000008"]
    (ckpts / "step_00000008/generator/zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()  # one rank's shard
    run_tokenizer(tmp_path, *COMMON, *VARIANTS[2], nproc=2)
    log = (tmp_path / "train_tokenizer/log.txt").read_text()
    assert "step_00000008 skipped: generator/zero_pp_rank_1_mp_rank_00_optim_states.pt is missing" in log
    assert "resumed from checkpoint at step 4" in log
    assert_bitwise_equal(tokenizer_weights(tmp_path), tokenizer_weights(references(2)))


def test_zero3_with_the_tokenizer_is_a_config_error(tmp_path):
    out = tessera("run", "configs/demo-rq.yaml", "--run-dir", str(tmp_path), "--stages", "shard,train_tokenizer",
                  *TINY, "tokenizer_train.engine=deepspeed", "tokenizer_train.zero_stage=3", check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "tokenizer_train.zero_stage: 3 is not allowed with tokenizer_train.engine=deepspeed" in out.stderr
    assert "choose one of 0, 1, 2" in out.stderr
    assert not (tmp_path / "shard").exists()  # rejected before any stage ran
