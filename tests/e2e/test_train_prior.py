"""train_prior end to end on tiny codes: ZeRO-2/3 on 2 ranks, exact resume after a kill, elastic
resume 2 -> 1 rank, preemption, incomplete-newest fallback, export, soft targets, `tessera estimate`."""
import json
import shutil
import signal
from pathlib import Path

import pytest
import torch
from testkit import REPO, TINY_TOKENIZER, assert_bitwise_equal, prior_weights, run_signalled, tessera

from pipeline.config.root import load_config
from pipeline.losses.prior_loss import rq_prior_loss, soft_target_cross_entropy
from pipeline.runner.artifacts import load_prior

pytestmark = pytest.mark.e2e

CODES = [*TINY_TOKENIZER, "tokenizer_train.steps=10", "precompute.store_latents=true"]
# A small prior that learns visibly in 20 steps; no dropout, so 2-rank and 1-rank runs draw the same.
PRIOR = ["prior.preset=rq-demo", "prior.num_classes=10", "prior.embed_dim=32", "prior.n_head=4",
         "prior.spatial_layers=2", "prior.depth_layers=1", "prior_train.batch_size=8", "prior_train.lr=3e-3",
         "prior_train.eval_images=16", "prior_train.warmup_steps=0"]


def run_prior(run_dir, *extra, nproc=1, **kw):
    return tessera("run", "configs/demo-rq.yaml", "--run-dir", str(run_dir), "--stages", "train_prior", *CODES,
                   *PRIOR, *extra, nproc=nproc, **kw)


@pytest.fixture(scope="module")
def codes_run(tmp_path_factory):
    """shard -> train_tokenizer -> precompute_codes once; each test copies it."""
    run_dir = tmp_path_factory.mktemp("codes")
    tessera("run", "configs/demo-rq.yaml", "--run-dir", str(run_dir), "--stages",
            "shard,train_tokenizer,precompute_codes", *CODES)
    return run_dir


def fresh(codes_run, tmp_path, name="run") -> Path:
    target = tmp_path / name
    shutil.copytree(codes_run, target, ignore=shutil.ignore_patterns("*.lock"))
    return target


def done(run_dir) -> dict:
    return json.loads((Path(run_dir) / "train_prior" / "done.json").read_text())


@pytest.fixture(scope="module")
def reference_zero2(codes_run, tmp_path_factory):
    """2 ranks, ZeRO-2, 12 steps, uninterrupted."""
    run_dir = fresh(codes_run, tmp_path_factory.mktemp("ref2"))
    run_prior(run_dir, "prior_train.steps=12", "prior_train.checkpoint_every=4", "prior_train.zero_stage=2", nproc=2)
    return run_dir


def test_zero2_two_ranks_learns_exports_and_skips(reference_zero2):
    record = done(reference_zero2)
    assert record["counts"]["steps"] == 12 and record["metrics"]["val_samples"] == 16
    # Uniform guessing over K=32 codes is ln 32 = 3.47 nats: 12 steps already do better.
    assert record["metrics"]["train_loss"] < 3.35 and record["metrics"]["val_loss"] < 3.4
    assert {"val_loss_d0", "val_loss_d3"} <= set(record["metrics"])
    config = json.loads((reference_zero2 / "train_prior/deepspeed_config.json").read_text())
    assert config["zero_optimization"]["stage"] == 2 and config["train_micro_batch_size_per_gpu"] == 4
    assert (reference_zero2 / "train_prior/samples.png").stat().st_size > 0
    again = run_prior(reference_zero2, "prior_train.steps=12", "prior_train.checkpoint_every=4",
                      "prior_train.zero_stage=2", nproc=2)
    assert "train_prior: skipped" in again.stdout


def test_exported_prior_loads_into_a_fresh_model_with_identical_outputs(reference_zero2):
    from pipeline.generation.rq_sampler import sample_rq

    model = load_prior(reference_zero2 / "train_prior")
    state = prior_weights(reference_zero2)
    assert_bitwise_equal({k: v for k, v in model.state_dict().items()}, state)
    codes = torch.randint(0, 32, (2, 8, 8, 4))
    labels = torch.tensor([1, 2])
    again = load_prior(reference_zero2 / "train_prior")
    assert torch.equal(model(codes, labels), again(codes, labels))
    samples = sample_rq(model, labels, [0, 1], seed=0)
    assert samples.shape == (2, 8, 8, 4) and int(samples.max()) < 32


def run_prior_signalled(run_dir, at_step, sig, *extra, nproc=1, **harness):
    """train_prior with `sig` sent after step `at_step`: by rank 0, or by every rank for SIGKILL (as
    a node failure would take them all)."""
    return run_signalled("train_prior", at_step, sig, "run", "configs/demo-rq.yaml", "--run-dir", str(run_dir),
                         "--stages", "train_prior", *CODES, *PRIOR, *extra,
                         rank=None if sig == signal.SIGKILL else 0, nproc=nproc, script_dir=Path(run_dir).parent,
                         **harness)


def test_zero2_kill_and_resume_is_bitwise_equal(reference_zero2, codes_run, tmp_path):
    """Both ranks killed at step 6 (checkpoint at 4): the rerun resumes and ends bit-identical."""
    run_dir = fresh(codes_run, tmp_path)
    args = ("prior_train.steps=12", "prior_train.checkpoint_every=4", "prior_train.zero_stage=2")
    out = run_prior_signalled(run_dir, 6, signal.SIGKILL, *args, nproc=2)
    assert out.returncode != 0 and not (run_dir / "train_prior/done.json").exists()
    run_prior(run_dir, *args, nproc=2)
    assert "resumed from checkpoint at step 4" in (run_dir / "train_prior/log.txt").read_text()
    assert_bitwise_equal(prior_weights(run_dir), prior_weights(reference_zero2))


def test_elastic_resume_two_ranks_to_one_keeps_the_data_order(reference_zero2, codes_run, tmp_path):
    """A ZeRO-2 checkpoint of 2 ranks resumes on 1 rank (DeepSpeed universal checkpoint): same
    global batches, so the weights end within float rounding of the uninterrupted 2-rank run."""
    run_dir = fresh(codes_run, tmp_path)
    args = ("prior_train.steps=12", "prior_train.checkpoint_every=4", "prior_train.zero_stage=2")
    out = run_prior_signalled(run_dir, 6, signal.SIGUSR1, *args, nproc=2)
    # Each rank exits 3 (torchrun itself reports 1 for any failed worker).
    assert out.returncode != 0 and "SIGUSR1 received: checkpoint saved at step 6" in out.stderr, out.stderr[-3000:]
    run_prior(run_dir, *args, nproc=1)
    log = (run_dir / "train_prior/log.txt").read_text()
    assert "elastic resume" in log and "written by 2 rank(s), this run has 1" in log
    ours, ref = prior_weights(run_dir), prior_weights(reference_zero2)
    for key in ref:
        torch.testing.assert_close(ours[key], ref[key], atol=2e-4, rtol=1e-3)
    assert abs(done(run_dir)["metrics"]["val_loss"] - done(reference_zero2)["metrics"]["val_loss"]) < 2e-3


def test_elastic_resume_one_rank_to_two_keeps_the_data_order(reference_zero2, codes_run, tmp_path):
    """The other direction: a 1-rank checkpoint resumes on 2 ranks and ends within float rounding
    of the uninterrupted 2-rank run (the global batches do not depend on the rank count)."""
    run_dir = fresh(codes_run, tmp_path)
    args = ("prior_train.steps=12", "prior_train.checkpoint_every=4", "prior_train.zero_stage=2")
    out = run_prior_signalled(run_dir, 6, signal.SIGUSR1, *args, nproc=1)
    assert out.returncode == 3 and "SIGUSR1 received: checkpoint saved at step 6" in out.stderr, out.stderr[-3000:]
    run_prior(run_dir, *args, nproc=2)
    log = (run_dir / "train_prior/log.txt").read_text()
    assert "elastic resume" in log and "written by 1 rank(s), this run has 2" in log
    ours, ref = prior_weights(run_dir), prior_weights(reference_zero2)
    for key in ref:
        torch.testing.assert_close(ours[key], ref[key], atol=2e-4, rtol=1e-3)
    assert abs(done(run_dir)["metrics"]["val_loss"] - done(reference_zero2)["metrics"]["val_loss"]) < 2e-3


def test_zero3_two_ranks_trains_and_exports(codes_run, tmp_path):
    run_dir = fresh(codes_run, tmp_path)
    run_prior(run_dir, "prior_train.steps=12", "prior_train.checkpoint_every=12", "prior_train.zero_stage=3", nproc=2)
    record = done(run_dir)
    assert record["counts"]["parameters"] > 10_000 and record["metrics"]["train_loss"] < 3.35
    model = load_prior(run_dir / "train_prior")  # gathered from the ZeRO-3 partitions
    assert all(v.numel() > 0 for v in model.state_dict().values())


@pytest.mark.parametrize("offload", [("prior_train.zero_stage=2", "prior_train.offload_optimizer=true"),
                                     ("prior_train.zero_stage=3", "prior_train.offload_optimizer=true",
                                      "prior_train.offload_params=true")], ids=["zero2-optimizer", "zero3-params"])
def test_zero_offload_trains_resumes_bitwise_after_a_kill_and_exports(codes_run, tmp_path, offload):
    """ZeRO-Offload (DeepSpeedCPUAdam on the CPU partitions) on 2 ranks: both ranks killed at step 6
    (checkpoint at 4), the rerun ends bit-identical to an uninterrupted run; the export loads."""
    args = ("prior_train.steps=8", "prior_train.checkpoint_every=4", *offload)
    reference = fresh(codes_run, tmp_path, "reference")
    run_prior(reference, *args, nproc=2)
    assert done(reference)["metrics"]["train_loss"] < 3.4
    config = json.loads((reference / "train_prior/deepspeed_config.json").read_text())
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    run_dir = fresh(codes_run, tmp_path)
    out = run_prior_signalled(run_dir, 6, signal.SIGKILL, *args, nproc=2)
    assert out.returncode != 0 and not (run_dir / "train_prior/done.json").exists()
    run_prior(run_dir, *args, nproc=2)
    assert "resumed from checkpoint at step 4" in (run_dir / "train_prior/log.txt").read_text()
    assert_bitwise_equal(prior_weights(run_dir), prior_weights(reference))
    assert all(v.numel() > 0 for v in load_prior(run_dir / "train_prior").state_dict().values())


def test_signal_checkpoints_exit_3_and_incomplete_newest_falls_back(codes_run, tmp_path):
    run_dir = fresh(codes_run, tmp_path)
    args = ("prior_train.steps=8", "prior_train.checkpoint_every=4", "prior_train.engine=ddp")
    out = run_prior_signalled(run_dir, 6, signal.SIGTERM, *args)
    assert out.returncode == 3 and "SIGTERM received: checkpoint saved at step 6" in out.stderr
    steps = sorted(p.name for p in (run_dir / "train_prior/checkpoints").iterdir())
    assert steps == ["step_00000004", "step_00000006"]
    # Damage the newest: the rerun warns, resumes from step 4 and still finishes.
    (run_dir / "train_prior/checkpoints/step_00000006/complete.json").unlink()
    run_prior(run_dir, *args)
    log = (run_dir / "train_prior/log.txt").read_text()
    assert "step_00000006 skipped" in log and "resumed from checkpoint at step 4" in log
    assert done(run_dir)["counts"]["steps"] == 8


def test_signal_to_the_process_group_stops_quietly(codes_run, tmp_path):
    """SLURM signals the whole process group: the stage checkpoints and exits 3, and neither it nor
    its helper processes (multiprocessing's resource tracker of the streaming reader) print a
    traceback or a leak warning."""
    run_dir = fresh(codes_run, tmp_path)
    args = ("prior_train.steps=8", "prior_train.checkpoint_every=4")
    out = run_prior_signalled(run_dir, 5, signal.SIGUSR1, *args, group=True)
    assert out.returncode == 3 and "SIGUSR1 received: checkpoint saved at step 5" in out.stderr
    assert "Traceback" not in out.stderr and "resource_tracker" not in out.stderr, out.stderr[-3000:]
    run_prior(run_dir, *args)
    assert done(run_dir)["counts"]["steps"] == 8


def test_signal_during_the_final_evaluation_stops_at_once(codes_run, tmp_path):
    """After the final checkpoint a signal is not left for a step boundary that never comes: the
    evaluation stops at once with exit 3, and the rerun evaluates from that checkpoint."""
    run_dir = fresh(codes_run, tmp_path)
    args = ("prior_train.steps=4", "prior_train.checkpoint_every=4", "prior_train.engine=ddp")
    out = run_prior_signalled(run_dir, 4, signal.SIGTERM, *args, group=True, phase="eval")
    assert out.returncode == 3 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "SIGTERM received during the evaluation after the final checkpoint (step 4)" in out.stderr
    assert not (run_dir / "train_prior/done.json").exists()
    run_prior(run_dir, *args)
    assert "resumed from checkpoint at step 4" in (run_dir / "train_prior/log.txt").read_text()
    assert done(run_dir)["counts"]["steps"] == 4


def scalar_steps(run_dir, tag: str) -> list[int]:
    """The steps of one TensorBoard scalar as TensorBoard shows them (purged events dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(Path(run_dir) / "tensorboard" / "train_prior"), purge_orphaned_data=True)
    events.Reload()
    return [e.step for e in events.Scalars(tag)]


def test_tensorboard_has_each_step_once_after_a_kill_and_resume(codes_run, tmp_path):
    """Killed after step 5 (checkpoint at 3; steps 4-5 already logged and flushed by the eval at 4):
    the resumed run logs 4-8 again, and TensorBoard shows every step once."""
    run_dir = fresh(codes_run, tmp_path)
    args = ("prior_train.steps=8", "prior_train.checkpoint_every=3", "prior_train.engine=ddp",
            "prior_train.log_every=1", "prior_train.eval_every=4")
    out = run_prior_signalled(run_dir, 5, signal.SIGKILL, *args)
    assert out.returncode != 0
    assert scalar_steps(run_dir, "eval/val_loss") == [4]
    run_prior(run_dir, *args)
    assert "resumed from checkpoint at step 3" in (run_dir / "train_prior/log.txt").read_text()
    assert scalar_steps(run_dir, "train/loss") == list(range(1, 9))
    assert scalar_steps(run_dir, "eval/val_loss") == [4, 8]


def test_config_mistakes_are_clear(codes_run, tmp_path):
    run_dir = fresh(codes_run, tmp_path)
    out = run_prior(run_dir, "prior.num_classes=7", check=False)
    assert out.returncode != 0 and "prior.num_classes" in out.stderr and "data.num_classes" in out.stderr
    out = run_prior(run_dir, "prior_train.targets=soft", "precompute.store_latents=false", check=False)
    assert out.returncode != 0 and "store_latents" in out.stderr


def recomputed_val_losses(run_dir, tau: float) -> tuple[float, float]:
    """(soft-target loss against Q_tau of the stored latents, cross-entropy on the stored codes) of
    the exported prior over every val sample, computed here from the files."""
    from pipeline.data.code_reader import make_code_loader
    from pipeline.runner.artifacts import load_tokenizer

    tok, prior = load_tokenizer(run_dir / "train_tokenizer"), load_prior(run_dir / "train_prior")
    loader = make_code_loader(run_dir / "precompute_codes", "val", 16, shuffle=False, drop_last=False)
    batch = next(iter(loader))
    assert len(batch["label"]) == 16  # the whole val split, as prior_train.eval_images=16 evaluates
    codes = batch["codes_HWD"]
    with torch.no_grad():
        soft_targets, _ = tok.quantizer.soft_codes(batch["latent_CHW"].float(), tau)
        logits = prior(codes, batch["label"])
        soft, _ = rq_prior_loss(logits, codes, soft_targets)
        hard, _ = rq_prior_loss(logits, codes)
    return float(soft), float(hard)


def test_soft_targets_are_the_validation_loss(codes_run, tmp_path):
    """With soft targets val_loss is the loss against Q_tau of the stored latents (recomputed here
    from the files), not the cross-entropy on the stored codes."""
    run_dir = fresh(codes_run, tmp_path)
    run_prior(run_dir, "prior_train.steps=4", "prior_train.targets=soft", "prior_train.engine=ddp")
    tau = load_config(str(REPO / "configs/demo-rq.yaml"), CODES).tokenizer.soft_tau
    soft_loss, hard_loss = recomputed_val_losses(run_dir, tau)
    assert done(run_dir)["metrics"]["val_loss"] == pytest.approx(soft_loss, rel=1e-4)
    assert hard_loss != pytest.approx(soft_loss, rel=1e-2)  # so the check above tells the two apart


@pytest.mark.parametrize("stochastic", [True, False])
def test_stochastic_codes_are_the_training_inputs(codes_run, tmp_path, stochastic):
    """prior_train.stochastic_codes: in training the prior reads codes drawn from Q_tau with the
    step's per-sample uniforms (not the stored argmin codes); in evaluation, and with the option
    off, it reads the stored codes."""
    import logging

    from pipeline.data.loaders import CodeLoaders
    from pipeline.runner.artifacts import load_tokenizer
    from pipeline.runtime.dist import DistEnv
    from pipeline.train.prior_trainer import PriorTrainer

    run_dir = fresh(codes_run, tmp_path)
    cfg = load_config(str(REPO / "configs/demo-rq.yaml"), [*CODES, *PRIOR, "prior_train.targets=soft",
                                                           "prior_train.engine=ddp",
                                                           f"prior_train.stochastic_codes={str(stochastic).lower()}"])
    codes = CodeLoaders(run_dir / "precompute_codes", cfg.seed)
    trainer = PriorTrainer(cfg, DistEnv(), torch.device("cpu"), run_dir / "train_prior",
                           load_tokenizer(run_dir / "train_tokenizer"), codes, logging.getLogger("test_train_prior"))
    seen = []
    forward = trainer.model.forward
    trainer.model.forward = lambda codes, labels=None: forward(seen.append(codes) or codes, labels)
    batch = next(iter(trainer.train_loader))
    stored = batch["codes_HWD"]
    draws = trainer._draws(batch)
    with torch.no_grad():
        trainer.batch_loss(batch, draws, train=True)
        trainer.batch_loss(batch, None, train=False)
    _, drawn = trainer.tokenizer.quantizer.soft_codes(batch["latent_CHW"].float(), cfg.tokenizer.soft_tau,
                                                      sample=True, uniforms_BHWD=draws[:, 1:].reshape(stored.shape))
    assert not torch.equal(drawn, stored)  # Q_tau is not one-hot here: the draws leave the argmin codes
    assert torch.equal(seen[0], drawn if stochastic else stored)
    assert torch.equal(seen[1], stored)


def test_soft_targets_equal_cross_entropy_as_tau_goes_to_0(codes_run):
    # Q_tau -> one-hot at the argmin codes as tau -> 0, so the soft loss becomes plain CE.
    from pipeline.runner.artifacts import load_tokenizer

    tok = load_tokenizer(codes_run / "train_tokenizer")
    latent = tok.encode_latent(torch.rand(2, 3, 16, 16) * 2 - 1)
    probs, codes = tok.quantizer.soft_codes(latent, 1e-6)
    logits = torch.randn(*codes.shape, 32)
    ce, _ = rq_prior_loss(logits, codes)
    soft, _ = rq_prior_loss(logits, codes, probs)
    torch.testing.assert_close(soft, ce, atol=1e-4, rtol=1e-4)
    uniform = torch.full((3, 5), 0.2)
    torch.testing.assert_close(soft_target_cross_entropy(torch.zeros(3, 5), uniform), torch.full((3,), 1.6094),
                               atol=1e-4, rtol=0)


def test_dq_prior_trains_on_dq_codes(tmp_path):
    out = tessera("run", "configs/demo-dq.yaml", "--run-dir", str(tmp_path), "--stages",
                  "shard,train_tokenizer,precompute_codes,train_prior", *TINY_TOKENIZER,
                  "tokenizer_train.steps=6", "prior.preset=dq-demo", "prior.num_classes=10", "prior.embed_dim=32",
                  "prior.position_layers=1", "prior.content_layers=1", "prior_train.steps=6",
                  "prior_train.batch_size=8", "prior_train.eval_images=16", "prior_train.engine=ddp")
    assert "train_prior: done" in out.stdout
    metrics = done(tmp_path)["metrics"]
    assert {"val_content_loss", "val_position_loss", "val_coarse_position_loss"} <= set(metrics)
    model = load_prior(tmp_path / "train_prior")
    assert model.spec.kind == "dq"


def test_estimate_counts_the_paper_model_and_zero3_shrinks_with_ranks():
    from pipeline.cli.estimate import estimate, model_state_bytes
    from pipeline.config.root import load_config

    cfg = load_config("configs/imagenet256-rq.yaml", ["prior.preset=rq-1.4b"])
    one, many = estimate(cfg, 8), estimate(cfg, 64)
    assert abs(one["parameters"] - 1.4e9) / 1.4e9 < 0.02
    z3 = {r["world"]: next(x for x in r["res"]["rows"] if x.zero_stage == 3 and x.offload == "none")
          for r in ({"world": 8, "res": one}, {"world": 64, "res": many})}
    assert z3[64].gpu_model_states_gib < z3[8].gpu_model_states_gib / 7
    assert one["activations_gib"][True] < one["activations_gib"][False]
    out = tessera("estimate", "configs/imagenet256-rq.yaml", "prior.preset=rq-1.4b", "--world-size", "16")
    assert "1,387,531,264 parameters" in out.stdout and "recommendation" in out.stdout
    # Wall time: every one of the 256 codes of an image passes the 1.4B parameters at most once and the
    # depth stack (a fraction of them) four times per position; 6 FLOPs per parameter and token.
    c = one["compute"]
    bound = 6 * one["parameters"] * 256 * c["batch"] * c["steps"]
    assert bound / 4 < c["total_flops"] < bound
    assert many["compute"]["hours"] == pytest.approx(c["hours"] * 8 / 64)
    assert "GPU-hours" in out.stdout
    # Against a measured model: fp32 AdamW in one process holds weights + grads + 2 moments = 16 B/param.
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 64)).sum().backward()
    opt.step()
    measured = sum(p.numel() * p.element_size() * 2 for p in model.parameters())  # weights + grads
    measured += sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if t.dim() > 0)
    n = sum(p.numel() for p in model.parameters())
    assert model_state_bytes(n, 1, 0, bf16=False)[0] == measured
