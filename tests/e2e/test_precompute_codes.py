"""precompute_codes end to end on a tiny RQ and DQ run: codes equal the tokenizer's own, 2 ranks /
2 array tasks / kill + rerun give byte-identical shards and manifest, augmentation views, latents,
verification failures, missing inputs."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from testkit import REPO, TINY_TOKENIZER, free_port, tessera

from pipeline.config.root import load_config
from pipeline.data.reader import ShardedImageDataset
from pipeline.encode.codes_job import CodesJob
from pipeline.models.dq_order import dq_codes_from_tokens
from pipeline.runner.artifacts import load_tokenizer
from pipeline.runner.stage import StageError, run_stage
from pipeline.runner.units import UnitWork, unit_digest
from pipeline.runtime.io import sha256_file

TINY = [*TINY_TOKENIZER, "tokenizer_train.steps=2", "precompute.batch_size=8", "precompute.verify_images=8"]
CONFIGS = {"rq": "configs/demo-rq.yaml", "dq": "configs/demo-dq.yaml"}
pytestmark = pytest.mark.e2e


def cfg_for(kind, *extra):
    return load_config(str(REPO / CONFIGS[kind]), [*TINY, *extra])


def copy_inputs(src: Path, dst: Path) -> Path:
    for stage in ("shard", "train_tokenizer"):
        shutil.copytree(src / stage, dst / stage)
    return dst


def unit_hashes(stage_dir: Path) -> dict:
    return {str(p.relative_to(stage_dir)): unit_digest(p)[0] for p in sorted(stage_dir.glob("*/*-0*")) if p.is_dir()}


def read_rows(stage_dir: Path, split: str) -> list[dict]:
    from streaming.base import LocalDataset

    manifest = json.loads((stage_dir / "manifest.json").read_text())
    rows = []
    for shard in manifest["splits"][split]["shards"]:
        ds = LocalDataset(local=str(stage_dir / shard["name"]))
        rows.extend(ds[i] for i in range(len(ds)))
    return rows


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tokenizer runs (shard + train_tokenizer) and a reference precompute_codes for each kind."""
    out = {}
    for kind in ("rq", "dq"):
        base = tmp_path_factory.mktemp(f"{kind}-base")
        tessera("run", CONFIGS[kind], "--run-dir", str(base), "--stages", "shard,train_tokenizer", *TINY)
        ref = copy_inputs(base, tmp_path_factory.mktemp(f"{kind}-ref"))
        outcome = run_stage("precompute_codes", cfg_for(kind), ref)
        assert outcome.status == "done"
        out[kind] = {"base": base, "ref": ref}
    return out


def test_tessera_run_runs_the_stage_in_pipeline_order(runs, tmp_path):
    """`tessera run --stages` given out of order runs shard (done: skipped) and then precompute_codes,
    which writes what the stage runner wrote; a second run skips it."""
    run_dir = copy_inputs(runs["rq"]["base"], tmp_path)
    out = tessera("run", CONFIGS["rq"], "--run-dir", str(run_dir), "--stages", "precompute_codes,shard", *TINY)
    # "[tessera] STAGE: OUTCOME (peak RSS ...)": the stage and its outcome, in the order they ran
    reported = [line.split(" (")[0] for line in out.stdout.splitlines()
                if line.startswith("[tessera] ") and ": " in line][:2]
    assert reported == ["[tessera] shard: skipped", "[tessera] precompute_codes: done"], out.stdout
    ref = runs["rq"]["ref"] / "precompute_codes"
    assert (run_dir / "precompute_codes/manifest.json").read_bytes() == (ref / "manifest.json").read_bytes()
    assert unit_hashes(run_dir / "precompute_codes") == unit_hashes(ref)
    again = tessera("run", CONFIGS["rq"], "--run-dir", str(run_dir), "--stages", "precompute_codes", *TINY)
    assert "[tessera] precompute_codes: skipped" in again.stdout


def test_rq_codes_equal_the_tokenizers_and_decode_alike(runs):
    ref = runs["rq"]["ref"]
    stage_dir = ref / "precompute_codes"
    manifest = json.loads((stage_dir / "manifest.json").read_text())
    assert manifest["kind"] == "rq" and manifest["code_shape"] == [8, 8, 4] and manifest["code_dtype"] == "int16"
    assert manifest["tokenizer_sha256"] == sha256_file(ref / "train_tokenizer/tokenizer.safetensors")
    assert [s["count"] for s in manifest["splits"]["train"]["shards"]] == [32, 32]
    hist = np.array(manifest["splits"]["train"]["code_histogram"])
    assert hist.shape == (4, 32) and (hist.sum(1) == 64 * 8 * 8).all()
    done = json.loads((stage_dir / "done.json").read_text())
    assert done["counts"]["images"] == 80 and done["counts"]["units"] == 3
    assert done["metrics"]["verify_token_mismatch"] == 0.0 and done["metrics"]["images_per_s"] > 0

    model = load_tokenizer(ref / "train_tokenizer")
    for split in ("train", "val"):
        rows = read_rows(stage_dir, split)
        assert [r["index"] for r in rows] == list(range(len(rows)))  # every image once, in order
        images = ShardedImageDataset(ref / "shard", split)
        x = torch.stack([images[i][0] for i in range(len(rows))])
        codes = torch.stack([torch.from_numpy(r["codes_HWD"].astype(np.int64)) for r in rows])
        assert rows[0]["codes_HWD"].dtype == np.int16 and [r["label"] for r in rows] == [images[i][1] for i in
                                                                                         range(len(rows))]
        with torch.no_grad():
            direct = torch.cat([model.encode(x[i:i + 8]) for i in range(0, len(x), 8)])
            assert torch.equal(codes, direct)
            # The stored codes alone (codebook lookups) rebuild what the tokenizer's own forward
            # pass reconstructs from its quantized latent: nothing the decoder needs is missing.
            torch.testing.assert_close(model.decode(codes[:8]), model(x[:8])[0], rtol=1e-5, atol=1e-5)


def test_two_ranks_write_the_same_bytes_as_one(runs, tmp_path):
    run_dir = copy_inputs(runs["rq"]["base"], tmp_path)
    tessera("stage", "precompute_codes", CONFIGS["rq"], "--run-dir", str(run_dir), *TINY, nproc=2)
    ref = runs["rq"]["ref"] / "precompute_codes"
    assert unit_hashes(run_dir / "precompute_codes") == unit_hashes(ref) and len(unit_hashes(ref)) == 3
    assert (run_dir / "precompute_codes/manifest.json").read_bytes() == (ref / "manifest.json").read_bytes()


def test_two_array_tasks_write_the_same_bytes(runs, tmp_path):
    run_dir = copy_inputs(runs["rq"]["base"], tmp_path)
    first = run_stage("precompute_codes", cfg_for("rq"), run_dir, num_tasks=2, task_id=0)
    assert first.status == "task-done" and not (run_dir / "precompute_codes/manifest.json").exists()
    assert run_stage("precompute_codes", cfg_for("rq"), run_dir, num_tasks=2, task_id=1).status == "done"
    ref = runs["rq"]["ref"] / "precompute_codes"
    assert (run_dir / "precompute_codes/manifest.json").read_bytes() == (ref / "manifest.json").read_bytes()


KILLED_ENCODER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, sys.argv[1])
    from pipeline.config.root import load_config
    from pipeline.data import codes_writer
    from pipeline.runner.stage import run_stage

    real, calls = codes_writer.CodeEncoder.encode, [0]
    def encode_then_die(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == int(sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no finally blocks: like a node failure
        return real(self, *args, **kwargs)
    codes_writer.CodeEncoder.encode = encode_then_die
    run_stage("precompute_codes", load_config(sys.argv[4], sys.argv[5:]), sys.argv[2])
""")


def test_killed_mid_unit_then_rerun_gives_identical_bytes(runs, tmp_path):
    run_dir = copy_inputs(runs["rq"]["base"], tmp_path)
    # Batch 6 of 8-image batches: unit train-000000 (4 batches) is complete, train-000001 is mid-write.
    proc = subprocess.run([sys.executable, "-c", KILLED_ENCODER, str(REPO), str(run_dir), "6",
                           str(REPO / CONFIGS["rq"]), *TINY], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -9, proc.stderr
    stage_dir = run_dir / "precompute_codes"
    assert (stage_dir / "train/train-000000.json").exists()
    assert not (stage_dir / "train/train-000001").exists()
    assert any(p.name.startswith(".train-000001") for p in (stage_dir / "train").iterdir())
    assert not (stage_dir / "manifest.json").exists()

    outcome = run_stage("precompute_codes", cfg_for("rq"), run_dir)
    assert outcome.status == "done" and outcome.record["metrics"]["images_encoded_this_run"] == 80 - 32
    ref = runs["rq"]["ref"] / "precompute_codes"
    assert (stage_dir / "manifest.json").read_bytes() == (ref / "manifest.json").read_bytes()
    assert unit_hashes(stage_dir) == unit_hashes(ref)
    assert not any(p.name.startswith(".") for p in (stage_dir / "train").iterdir())


def test_hflip_views_and_latents(runs, tmp_path):
    run_dir = copy_inputs(runs["rq"]["base"], tmp_path)
    outcome = run_stage("precompute_codes", cfg_for("rq", "precompute.augment=hflip", "precompute.store_latents=true"),
                        run_dir)
    assert outcome.record["counts"]["train_views"] == 2 * 64 and outcome.record["counts"]["val_views"] == 16
    rows = read_rows(run_dir / "precompute_codes", "train")
    assert [(r["index"], r["view"]) for r in rows[:4]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    model = load_tokenizer(run_dir / "train_tokenizer")
    images = ShardedImageDataset(run_dir / "shard", "train")
    x = torch.stack([images[i][0] for i in range(8)])
    with torch.no_grad():
        flipped = model.encode(x.flip(-1))
        latent = model.encode_latent(x)
    assert torch.equal(torch.stack([torch.from_numpy(r["codes_HWD"].astype(np.int64)) for r in rows[1:16:2]]), flipped)
    stored = torch.stack([torch.tensor(r["latent_CHW"]) for r in rows[0:16:2]])
    assert stored.dtype == torch.float16 and stored.shape == (8, 8, 8, 8)
    torch.testing.assert_close(stored.float(), latent, rtol=1e-3, atol=1e-3)
    # Soft labels from the stored (fp16) latent peak at the codes the stage stored: the latent is
    # the one the codes came from, so training on Q_tau targets agrees with the hard targets.
    probs, _ = model.quantizer.soft_codes(stored.float(), 0.5)
    hard = torch.stack([torch.from_numpy(r["codes_HWD"].astype(np.int64)) for r in rows[0:16:2]])
    assert probs.shape == (8, 8, 8, 4, 32)
    torch.testing.assert_close(probs.sum(-1), torch.ones(8, 8, 8, 4))
    agree = (probs.argmax(-1) == hard).double().mean()
    assert agree >= 0.99, f"soft labels peak at the stored code in only {agree:.1%} of positions"


def test_dq_tokens_round_trip_and_decode_alike(runs):
    ref = runs["dq"]["ref"]
    stage_dir = ref / "precompute_codes"
    manifest = json.loads((stage_dir / "manifest.json").read_text())
    assert manifest["kind"] == "dq" and manifest["histogram_rows"] == ["coarse", "fine"]
    val = manifest["splits"]["val"]
    rows = read_rows(stage_dir, "val")
    assert val["max_length"] == max(r["length"] for r in rows)
    assert val["mean_length"] == pytest.approx(np.mean([r["length"] for r in rows]), abs=1e-4)
    model = load_tokenizer(ref / "train_tokenizer")
    images = ShardedImageDataset(ref / "shard", "val")
    x = torch.stack([images[i][0] for i in range(len(rows))])
    tokens = [(torch.tensor(r["positions_L"]), torch.tensor(r["contents_L"]), torch.tensor(r["granularity_L"]))
              for r in rows]
    for (pos, _, gran), r in zip(tokens, rows):
        # DQ-Transformer order: all coarse tokens, then all fine ones, each in raster order of its grid.
        n_coarse = int((gran == 0).sum())
        assert (gran[:n_coarse] == 0).all() and (gran[n_coarse:] == 1).all() and r["length"] == len(pos)
        assert (pos[:n_coarse].diff() > 0).all() and (pos[n_coarse:].diff() > 0).all()
    stored = dq_codes_from_tokens(tokens, model.coarse_side)
    with torch.no_grad():
        direct = model.encode(x)
        assert torch.equal(stored.code_map_BHW, direct.code_map_BHW)
        assert torch.equal(stored.granularity_BHcWc, direct.granularity_BHcWc)
        assert torch.equal(torch.stack([torch.tensor(r["granularity_map_HcWc"]).long() for r in rows]),
                           direct.granularity_BHcWc)
        # The stored tokens alone rebuild the tokenizer's own forward reconstruction.
        torch.testing.assert_close(model.decode(stored), model(x)[0], rtol=1e-5, atol=1e-5)


def test_verification_fails_when_codes_do_not_match_the_tokenizer(runs):
    ref = runs["rq"]["ref"]
    job = CodesJob.create(ref / "shard" / "manifest.json", ref / "train_tokenizer", cfg_for("rq"),
                          ref / "precompute_codes", torch.device("cpu"))
    sidecars = UnitWork(ref / "precompute_codes", job.plan, job.plan_id).collect_sidecars()
    assert job.verify(sidecars, 8, 0)["verify_token_mismatch"] == 0.0
    with torch.no_grad():
        job.encoder.model.quant_conv.bias.add_(0.5)  # a different tokenizer than the one that wrote the codes
    with pytest.raises(StageError, match="verification failed"):
        job.verify(sidecars, 8, 0)


def test_missing_tokenizer_is_a_clear_error(runs, tmp_path):
    shutil.copytree(runs["rq"]["base"] / "shard", tmp_path / "shard")
    with pytest.raises(StageError, match="needs the train_tokenizer stage first"):
        run_stage("precompute_codes", cfg_for("rq"), tmp_path)


# ---- the code reader (streaming) -----------------------------------------------------------
def _indices(loader) -> list[list[int]]:
    return [batch["index"].tolist() for batch in loader]


def test_reader_resumes_mid_epoch_exactly(runs):
    import gc

    from pipeline.data.code_reader import make_code_loader

    codes = runs["rq"]["ref"] / "precompute_codes"
    full = _indices(make_code_loader(codes, "train", 8, seed=3))
    gc.collect()  # streaming refuses two live datasets over the same folders
    loader = make_code_loader(codes, "train", 8, seed=3)
    first = []
    for batch in loader:
        assert batch["codes_HWD"].shape == (8, 8, 8, 4) and batch["codes_HWD"].dtype == torch.int64
        first.append(batch["index"].tolist())
        if len(first) == 3:
            break
    state = loader.state_dict()
    assert state["sample_in_epoch"] == 24 and state["num_canonical_nodes"] == 1
    del loader
    gc.collect()
    resumed = make_code_loader(codes, "train", 8, seed=3)
    resumed.load_state_dict(state)
    assert first + _indices(resumed) == full
    assert sorted(i for b in full for i in b) == list(range(64))
    assert _indices(resumed) != full  # the next epoch is another permutation
    del resumed
    gc.collect()
    assert _indices(make_code_loader(codes, "train", 8, seed=4)) != full


READER_RANK = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, sys.argv[1])
    from pipeline.data.code_reader import make_code_loader
    loader = make_code_loader(sys.argv[2], "train", int(sys.argv[3]), seed=3)
    order = [batch["index"].tolist() for batch in loader]
    with open(os.path.join(sys.argv[4], f"rank{os.environ.get('RANK', '0')}.json"), "w") as f:
        json.dump(order, f)
""")


def test_reader_order_does_not_depend_on_world_size(runs, tmp_path):
    codes = runs["rq"]["ref"] / "precompute_codes"
    script = tmp_path / "order.py"
    script.write_text(READER_RANK)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for nproc, per_rank, out in ((1, 8, tmp_path / "one"), (2, 4, tmp_path / "two")):
        out.mkdir()
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                     str(free_port())] if nproc > 1 else [sys.executable])
        proc = subprocess.run([*launcher, str(script), str(REPO), str(codes), str(per_rank), str(out)], env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
    one = json.loads((tmp_path / "one/rank0.json").read_text())
    r0, r1 = (json.loads((tmp_path / f"two/rank{r}.json").read_text()) for r in (0, 1))
    assert len(one) == len(r0) == len(r1) == 8
    # Global batch t is the same on 1 and 2 ranks; rank r takes its entries r, r + 2, ...
    for batch, a, b in zip(one, r0, r1):
        assert a == batch[0::2] and b == batch[1::2]


def test_dq_batches_are_padded_with_masks(runs):
    from pipeline.data.code_reader import make_code_loader

    codes = runs["dq"]["ref"] / "precompute_codes"
    batch = next(iter(make_code_loader(codes, "val", 4, seed=0, shuffle=False)))
    lengths = batch["length"]
    assert batch["positions_L"].shape == batch["contents_L"].shape == batch["mask_L"].shape
    assert batch["positions_L"].shape[1] == int(lengths.max())
    assert torch.equal(batch["mask_L"].sum(1), lengths) and batch["granularity_map_HcWc"].shape == (4, 8, 8)


def test_corrupt_code_shard_is_named(runs, tmp_path):
    from pipeline.data.code_reader import make_code_loader
    from pipeline.data.manifest import ShardIntegrityError

    codes = tmp_path / "precompute_codes"
    shutil.copytree(runs["rq"]["ref"] / "precompute_codes", codes)
    shard = codes / "train/train-000001/shard.00000.mds"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # same size: only the checksum can tell
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardIntegrityError, match=r"train/train-000001.*modified or corrupted.*precompute_codes stage"):
        make_code_loader(codes, "train", 8)
