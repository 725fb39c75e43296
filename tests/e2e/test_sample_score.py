"""Stages sample and score on a tiny run: class balance, byte-identical samples for any launch
(1 vs 2 processes vs array tasks, kill and rerun), the ADM archive format, scoring against the
run's own shards or a statistics file, the standalone `tessera score`, uncalibrated naming, the
missing-weights error and the probe-classifier check."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from testkit import TINY_TOKENIZER, tessera

pytestmark = pytest.mark.e2e

# 1000 train images: enough for the probe classifier to know the classes (it is what the samples are
# checked against); the prior trains 2 steps, so its samples are noise.
RUN = [*TINY_TOKENIZER, "data.num_train=1000", "data.num_val=100", "data.shard_max_count=500",
       "tokenizer_train.steps=10", "prior.embed_dim=32", "prior.spatial_layers=1", "prior.depth_layers=1",
       "prior_train.steps=2", "prior_train.batch_size=8", "prior_train.eval_images=16",
       "prior_train.engine=ddp", "prior_train.sample_every=0",
       # 65 samples over 10 classes: classes 0-4 get 7, 5-9 get 6; chunks of 20 (the last holds 5),
       # batches of 8 (not dividing the chunk).
       "sample.num_samples=65", "sample.chunk_size=20", "sample.batch_size=8",
       "score.download_weights=false", "score.kid_subset_size=20"]


def run_stages(run_dir, stages, *extra, nproc=1, check=True):
    return tessera("run", "configs/demo-rq.yaml", "--run-dir", str(run_dir), "--stages", stages, *RUN, *extra,
                   nproc=nproc, check=check)


@pytest.fixture(scope="module")
def prior_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("prior")
    # rFID over the whole val split: its reference is the score stage's default one (one cache for both).
    run_stages(run_dir, "shard,train_tokenizer,precompute_codes,train_prior", "tokenizer_train.rfid_images=1000")
    return run_dir


@pytest.fixture(scope="module")
def sampled(prior_run, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("sampled") / "run"
    shutil.copytree(prior_run, run_dir)
    out = run_stages(run_dir, "sample,score")
    assert "sample: done" in out.stdout and "score: done" in out.stdout
    return run_dir


def copy_of(run_dir, tmp_path, name="run") -> Path:
    target = tmp_path / name
    shutil.copytree(run_dir, target, ignore=shutil.ignore_patterns("sample", "score", "*.lock"))
    return target


def npz_bytes(run_dir) -> bytes:
    return (Path(run_dir) / "sample" / "samples.npz").read_bytes()


def test_archive_is_the_adm_format_and_classes_are_balanced(sampled):
    with np.load(sampled / "sample" / "samples.npz") as archive:
        assert sorted(archive.files) == ["arr_0", "arr_1"]
        images, labels = archive["arr_0"], archive["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (65, 16, 16, 3)
    assert labels.tolist() == [i % 10 for i in range(65)]
    assert np.bincount(labels).tolist() == [7] * 5 + [6] * 5
    done = json.loads((sampled / "sample" / "done.json").read_text())
    assert done["counts"]["min_per_class"] == 6 and done["counts"]["max_per_class"] == 7
    assert done["metrics"]["sampling"]["temperature"] == 1.0 and done["metrics"]["images_per_s"] > 0
    assert (sampled / "sample" / "grid.png").stat().st_size > 0
    again = run_stages(sampled, "sample")
    assert "sample: skipped" in again.stdout


def test_two_processes_and_array_tasks_give_byte_identical_samples(sampled, prior_run, tmp_path):
    two = copy_of(prior_run, tmp_path, "two")
    run_stages(two, "sample", nproc=2)
    assert npz_bytes(two) == npz_bytes(sampled)
    tasks = copy_of(prior_run, tmp_path, "tasks")
    for task in (1, 0):  # any order: the task that completes the plan packs the archive
        out = tessera("stage", "sample", "configs/demo-rq.yaml", "--run-dir", str(tasks), "--num-tasks", "2",
                      "--task-id", str(task), *RUN)
        assert out.returncode == 0
    assert npz_bytes(tasks) == npz_bytes(sampled)


def test_a_killed_run_resumes_to_byte_identical_samples(sampled, prior_run, tmp_path):
    run_dir = copy_of(prior_run, tmp_path)
    # Task 0 of 4 wrote chunk 0; a killed writer left chunk 1's temp file and chunk 2 without its
    # sidecar (cut off mid-write).
    tessera("stage", "sample", "configs/demo-rq.yaml", "--run-dir", str(run_dir), "--num-tasks", "4",
            "--task-id", "0", *RUN)
    chunks = run_dir / "sample" / "chunks"
    (chunks / ".chunk-000001.tar.abc.tmp").write_bytes(b"partial")
    (chunks / "chunk-000002.tar").write_bytes((chunks / "chunk-000000.tar").read_bytes()[:1000])
    out = run_stages(run_dir, "sample")
    assert "keeping 1 verified unit" in (run_dir / "sample" / "log.txt").read_text(), out.stdout
    assert npz_bytes(run_dir) == npz_bytes(sampled)
    assert not list(chunks.glob(".*.tmp"))


def test_score_names_uncalibrated_metrics_and_checks_classes(sampled):
    record = json.loads((sampled / "score" / "metrics.json").read_text())
    metrics = record["metrics"]
    assert record["inception"] == "uncalibrated" and record["num_samples"] == 65
    assert {"fid_uncalibrated", "inception_score_uncalibrated", "kid_uncalibrated", "precision_uncalibrated",
            "recall_uncalibrated"} <= set(metrics)
    assert not {"fid", "inception_score", "kid"} & set(metrics)  # never FID without the real weights
    # A 2-step prior draws noise: the classifier is near chance on it and sure on real images.
    assert metrics["classifier_accuracy_real_val"] > 0.8
    assert metrics["classifier_accuracy_samples"] < 0.35
    row = (sampled / "score" / "leaderboard.md").read_text()
    assert "(uncal.)" in row and "| 8x8x4 |" in row and "| 65 |" in row and "K |" in row


def test_statistics_file_reference_and_standalone_score_equal_the_shard_reference(sampled, tmp_path):
    cache = sampled / "inception" / "reference-val.npz"
    with np.load(cache) as stats:
        assert stats["features"].shape == (100, 2048) and stats["sigma"].shape == (2048, 2048)
    by_dir = json.loads((sampled / "score" / "metrics.json").read_text())["metrics"]
    # The same reference given as a statistics file (as the ADM batch would be).
    other = tmp_path / "run"
    shutil.copytree(sampled, other, ignore=shutil.ignore_patterns("score", "*.lock"))
    run_stages(other, "score", f"score.reference={cache}")
    by_file = json.loads((other / "score" / "metrics.json").read_text())["metrics"]
    for key in ("fid_uncalibrated", "kid_uncalibrated", "precision_uncalibrated"):
        assert by_file[key] == pytest.approx(by_dir[key], rel=1e-6, abs=1e-9)
    out = tessera("score", "--samples", str(sampled / "sample" / "samples.npz"), "--ref", str(cache),
                  "--metrics", "fid,prc", "--no-download", "--allow-uncalibrated", "--out", str(tmp_path / "cli"))
    standalone = json.loads((tmp_path / "cli" / "metrics.json").read_text())["metrics"]
    assert sorted(standalone) == ["fid_uncalibrated", "precision_uncalibrated", "recall_uncalibrated"]
    assert standalone["fid_uncalibrated"] == pytest.approx(by_dir["fid_uncalibrated"], rel=1e-6)
    assert "| samples |" in out.stdout


def test_missing_inception_weights_is_a_clear_error(sampled, tmp_path):
    other = tmp_path / "run"
    shutil.copytree(sampled, other, ignore=shutil.ignore_patterns("score", "*.lock"))
    out = run_stages(other, "score", "score.allow_uncalibrated=false", check=False)
    assert out.returncode == 2
    assert "score.inception_weights" in out.stderr and "weights-inception-2015-12-05" in out.stderr
    out = run_stages(other, "score", "score.allow_uncalibrated=false", "score.inception_weights=/nope.pth",
                     "--force", check=False)
    assert out.returncode == 2 and "/nope.pth: no such file" in out.stderr


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
    from pipeline.evaluation.inception import inception_features, load_inception
    from pipeline.evaluation.scoring import compute_metrics, statistics

    extractor, source = load_inception(download=False, allow_uncalibrated=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 200, (24, 16, 16, 3), dtype=np.uint8)
    feats = inception_features(extractor, [images])
    shifted = inception_features(extractor, [images + 50])
    ref = {**statistics(feats["2048"]), "features": feats["2048"], "source": "same"}
    same = compute_metrics(feats, ref, ["fid"], source=source)["fid_uncalibrated"]
    moved = compute_metrics(shifted, ref, ["fid"], source=source)["fid_uncalibrated"]
    assert abs(same) < 1e-3 * moved and moved > 0
    calibrated = compute_metrics(feats, ref, ["fid"], source="/weights.pth")
    assert list(calibrated) == ["fid"]
    assert torch.isfinite(feats["logits_unbiased"]).all()


def test_tokenizer_rfid_is_reported_and_shares_the_score_reference(sampled):
    done = json.loads((sampled / "train_tokenizer" / "done.json").read_text())["metrics"]
    assert done["rfid_images"] == 100 and done["rfid_uncalibrated"] > 0 and "rfid" not in done
    key = json.loads((sampled / "inception" / "reference-val.json").read_text())
    assert key["images"] == 100 and key["inception"] == "uncalibrated"
    # train_tokenizer featurised the val split; score found it in the cache instead of redoing it.
    assert "reference statistics: cached" in (sampled / "score" / "log.txt").read_text()
    status = tessera("status", str(sampled)).stdout
    row = next(line for line in status.splitlines() if line.startswith("train_tokenizer"))
    assert f"rfid_uncalibrated={done['rfid_uncalibrated']:.4g}" in row


class _Shifted(torch.nn.Module):
    """A 'tokenizer' whose reconstruction is the image plus a constant: rFID's inputs are known."""

    def __init__(self, shift: float):
        super().__init__()
        self.shift = shift
        self.weight = torch.nn.Parameter(torch.zeros(()))

    def encode(self, images):
        return images

    def decode(self, codes):
        return codes + self.shift


@pytest.mark.filterwarnings("ignore:Matrix is singular")  # 20 samples of 2048 features: rank-deficient on purpose
def test_rfid_is_the_frechet_distance_of_reconstructions_to_originals(tmp_path):
    from scipy import linalg

    from pipeline.data.reader import ShardedImageDataset
    from pipeline.evaluation.inception import inception_features, load_inception
    from pipeline.evaluation.reference_stats import reconstruction_fid
    from pipeline.generation.decode import to_uint8

    tessera("stage", "shard", "configs/demo-rq.yaml", "--run-dir", str(tmp_path), *TINY_TOKENIZER, "data.num_val=24")
    manifest = tmp_path / "shard" / "manifest.json"
    extractor, source = load_inception(download=False, allow_uncalibrated=True)
    kw = dict(max_images=20, batch=8, device=torch.device("cpu"))
    exact = reconstruction_fid(_Shifted(0.0), tmp_path, manifest, extractor, source, **kw)
    shifted = reconstruction_fid(_Shifted(0.4), tmp_path, manifest, extractor, source, **kw)
    assert exact["rfid_images"] == 20 and (tmp_path / "inception" / "reference-val-first20.npz").is_file()
    # The Frechet distance written out: |mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrt(S1 S2)).
    data = ShardedImageDataset(manifest, "val")
    originals = to_uint8(torch.stack([data[i][0] for i in range(20)]))
    recons = to_uint8(torch.stack([data[i][0] + 0.4 for i in range(20)]))
    f1 = inception_features(extractor, [originals.numpy()])["2048"].double().numpy()
    f2 = inception_features(extractor, [recons.numpy()])["2048"].double().numpy()
    mu1, mu2, s1, s2 = f1.mean(0), f2.mean(0), np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    root = linalg.sqrtm(s1 @ s2).real
    expected = float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * root))
    assert shifted["rfid_uncalibrated"] == pytest.approx(expected, rel=1e-3)
    assert abs(exact["rfid_uncalibrated"]) < 1e-3 * shifted["rfid_uncalibrated"]
