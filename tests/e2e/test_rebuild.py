"""A finished stage whose outputs were lost or damaged is rebuilt from what it kept: a prior
re-exported from its final checkpoint (not retrained), samples.npz repacked from its intact chunks;
--force keeps checkpoints that match the config; a run directory that does not exist is not created."""
import shutil
from pathlib import Path

import pytest
from testkit import TINY_TOKENIZER, tessera

pytestmark = pytest.mark.e2e

RUN = [*TINY_TOKENIZER, "tokenizer_train.steps=6", "prior.embed_dim=32", "prior.spatial_layers=1",
       "prior.depth_layers=1", "prior_train.steps=6", "prior_train.checkpoint_every=3", "prior_train.batch_size=8",
       "prior_train.eval_images=16", "prior_train.engine=ddp", "prior_train.sample_every=0",
       "sample.num_samples=24", "sample.chunk_size=8", "sample.batch_size=8"]


def run_stages(run_dir, stages, *extra, check=True):
    return tessera("run", "configs/demo-rq.yaml", "--run-dir", str(run_dir), "--stages", stages, *RUN, *extra,
                   check=check)


@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("rebuild") / "run"
    run_stages(run_dir, "shard,train_tokenizer,precompute_codes,train_prior,sample")
    return run_dir


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run_dir, target, ignore=shutil.ignore_patterns("*.lock"))
    return target


def stamps(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def test_truncated_prior_export_is_reexported_from_its_checkpoint_not_retrained(sampled, tmp_path):
    run = copy_of(sampled, tmp_path)
    prior = run / "train_prior" / "prior.safetensors"
    original = prior.read_bytes()
    checkpoints = stamps(run / "train_prior" / "checkpoints")
    prior.write_bytes(original[:1000])
    shutil.rmtree(run / "sample")
    refused = run_stages(run, "sample", check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "prior.safetensors" in refused.stderr and "without --force" in refused.stderr
    assert "re-exports from its final checkpoint (step 6)" in refused.stderr
    # The printed advice: rerun train_prior. It resumes at the final step and exports the same weights.
    out = run_stages(run, "train_prior,sample")
    assert "train_prior: done" in out.stdout and "sample: done" in out.stdout
    log = (run / "train_prior" / "log.txt").read_text()
    assert "rebuilding it in place" in log and "resumed from checkpoint at step 6" in log
    assert prior.read_bytes() == original
    assert stamps(run / "train_prior" / "checkpoints") == checkpoints
    # --force with the same config keeps the checkpoints that match it (a re-export again) ...
    prior.write_bytes(original[:1000])
    run_stages(run, "train_prior", "--force")
    assert prior.read_bytes() == original and stamps(run / "train_prior" / "checkpoints") == checkpoints
    # ... and a changed config names what --force would delete.
    changed = run_stages(run, "train_prior", "prior_train.lr=0.01", check=False)
    assert changed.returncode == 2 and "deletes everything in" in changed.stderr
    assert "2 checkpoint(s) up to step 6" in changed.stderr


def test_corrupt_samples_npz_is_repacked_from_the_intact_chunks(sampled, tmp_path):
    run = copy_of(sampled, tmp_path)
    npz = run / "sample" / "samples.npz"
    original = npz.read_bytes()
    chunks = stamps(run / "sample" / "chunks")
    for extra in ((), ("--force",)):
        npz.write_bytes(original[: len(original) // 2])
        out = run_stages(run, "sample", *extra)
        assert "sample: done" in out.stdout
        assert npz.read_bytes() == original
        assert stamps(run / "sample" / "chunks") == chunks  # no chunk drawn again
    assert "keeping 3 verified unit(s)" in (run / "sample" / "log.txt").read_text()


def test_a_missing_run_directory_is_not_created_by_a_stage_that_needs_inputs(tmp_path):
    missing = tmp_path / "typo"
    out = run_stages(missing, "sample", check=False)
    assert out.returncode == 2 and "does not exist" in out.stderr and "Traceback" not in out.stderr
    assert not missing.exists()
