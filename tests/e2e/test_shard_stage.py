"""The shard stage end to end: determinism, multi-task, kill + resume, rejects, 2 ranks."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from pipeline.config.root import load_config
from pipeline.data.manifest import load_manifest
from pipeline.data.reader import ShardedImageDataset
from pipeline.runner.stage import StageError, run_stage

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
SMALL = ["data.num_train=90", "data.num_val=20", "data.resolution=16", "data.shard_max_count=16"]


def small_cfg(*overrides):
    return load_config(None, [*SMALL, *overrides])


def shard_hashes(stage_dir: Path) -> dict:
    manifest, _ = load_manifest(stage_dir)
    return {s["name"]: s["sha256"] for split in manifest["splits"].values() for s in split["shards"]}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted single-process run of each format: the bytes every other run must match."""
    refs = {}
    for fmt in ("webdataset", "mds"):
        run_dir = tmp_path_factory.mktemp(f"ref-{fmt}")
        outcome = run_stage("shard", small_cfg(f"data.format={fmt}"), run_dir)
        assert outcome.status == "done"
        refs[fmt] = run_dir / "shard"
    return refs


@pytest.mark.parametrize("fmt", ["webdataset", "mds"])
def test_manifest_and_counts(reference, fmt):
    manifest, root = load_manifest(reference[fmt])
    assert manifest["format"] == fmt and manifest["resolution"] == 16 and manifest["num_classes"] == 10
    assert [len(s["shards"]) for s in manifest["splits"].values()] == [6, 2]  # 90 = 5*16 + 10; 20 = 16 + 4
    assert manifest["totals"] == {**manifest["totals"], "inputs": 110, "samples": 110, "rejected": 0, "shards": 8}
    done = json.loads((root / "done.json").read_text())
    assert done["counts"]["images"] == 110 and set(done["outputs"]) == {"manifest.json", "rejected.jsonl"}
    assert len(ShardedImageDataset(root, "train")) == 90


def test_shards_by_bytes_respect_the_limit(tmp_path):
    run_stage("shard", small_cfg("data.shard_max_bytes=20480"), tmp_path)
    manifest, _ = load_manifest(tmp_path / "shard")
    shards = [s for split in manifest["splits"].values() for s in split["shards"]]
    assert len(shards) > 8 and all(s["bytes"] <= 20480 for s in shards)


def test_two_array_tasks_write_the_same_bytes(reference, tmp_path):
    cfg = small_cfg()
    first = run_stage("shard", cfg, tmp_path, num_tasks=2, task_id=0)
    assert first.status == "task-done" and not (tmp_path / "shard" / "manifest.json").exists()
    second = run_stage("shard", cfg, tmp_path, num_tasks=2, task_id=1)
    assert second.status == "done"
    manifest = (tmp_path / "shard" / "manifest.json").read_bytes()
    assert manifest == (reference["webdataset"] / "manifest.json").read_bytes()


KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, sys.argv[1])
    from pipeline.config.root import load_config
    from pipeline.data import shards
    from pipeline.runner.stage import run_stage

    real_encode, calls = shards.encode_image, [0]
    def encode_then_die(pixels, encoding):
        calls[0] += 1
        if calls[0] == int(sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no finally blocks: like a node failure
        return real_encode(pixels, encoding)
    shards.encode_image = encode_then_die
    run_stage("shard", load_config(None, sys.argv[4:]), sys.argv[2])
""")


@pytest.mark.parametrize("fmt", ["webdataset", "mds"])
def test_killed_mid_shard_then_rerun_gives_identical_bytes(reference, tmp_path, fmt):
    # One decode process: the injected kill must hit the writing process itself, not a pool child.
    overrides = [*SMALL, f"data.format={fmt}", "data.shard_decode_processes=1"]
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(REPO), str(tmp_path), "40", *overrides],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    stage_dir = tmp_path / "shard"
    suffix = ".tar" if fmt == "webdataset" else ""
    # Two complete shards; the third was mid-write and is not visible under its final name.
    assert (stage_dir / f"train/train-000001{suffix}.json").exists()
    assert not (stage_dir / f"train/train-000002{suffix}").exists()
    assert any(p.name.startswith(".train-000002") for p in (stage_dir / "train").iterdir())
    assert not (stage_dir / "manifest.json").exists()

    outcome = run_stage("shard", small_cfg(f"data.format={fmt}", "data.shard_decode_processes=1"), tmp_path)
    assert outcome.status == "done" and outcome.record["metrics"]["images_written_this_run"] == 110 - 32
    assert (stage_dir / "manifest.json").read_bytes() == (reference[fmt] / "manifest.json").read_bytes()
    assert shard_hashes(stage_dir) == shard_hashes(reference[fmt])
    assert not any(p.name.startswith(".") for p in (stage_dir / "train").iterdir())


def test_a_unit_without_sidecar_or_with_bad_content_is_rewritten(reference, tmp_path):
    run_stage("shard", small_cfg(), tmp_path, num_tasks=2, task_id=0)
    stage_dir = tmp_path / "shard"
    (stage_dir / "train/train-000000.tar").write_bytes(b"garbage of the wrong size")
    shard = stage_dir / "train/train-000002.tar"
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF  # same size, different content: only the hash can tell
    shard.write_bytes(bytes(data))
    run_stage("shard", small_cfg(), tmp_path, num_tasks=2, task_id=0)
    run_stage("shard", small_cfg(), tmp_path, num_tasks=2, task_id=1)
    assert shard_hashes(stage_dir) == shard_hashes(reference["webdataset"])


def _imagefolder_with_bad_files(root: Path) -> None:
    for cls in ("ants", "bees"):
        for i in range(4):
            (root / cls).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (30 + i, 24), (40 * i, 90, 200)).save(root / cls / f"{i}.jpg", quality=90)
    good = (root / "ants" / "0.jpg").read_bytes()
    (root / "ants" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "bees" / "notes.png").write_text("a text file with an image name")


def test_corrupt_inputs_are_listed_and_counted(tmp_path):
    _imagefolder_with_bad_files(tmp_path / "images")
    cfg = small_cfg("data.source=imagefolder", f"data.root={tmp_path / 'images'}", "data.val_fraction=0.0",
                    "data.max_reject_fraction=0.25")
    outcome = run_stage("shard", cfg, tmp_path / "run")
    assert outcome.record["counts"]["rejected"] == 2 and outcome.record["counts"]["images"] == 8
    lines = [json.loads(line) for line in (tmp_path / "run/shard/rejected.jsonl").read_text().splitlines()]
    assert sorted(entry["path"] for entry in lines) == ["ants/truncated.jpg", "bees/notes.png"]
    assert all(entry["reason"] for entry in lines)
    manifest, _ = load_manifest(tmp_path / "run/shard")
    assert manifest["class_names"] == ["ants", "bees"] and manifest["totals"]["inputs"] == 10


def test_too_many_rejects_fail_with_a_clear_message(tmp_path):
    _imagefolder_with_bad_files(tmp_path / "images")
    cfg = small_cfg("data.source=imagefolder", f"data.root={tmp_path / 'images'}", "data.max_reject_fraction=0.1")
    with pytest.raises(StageError, match=r"2 of 10 input images \(20.0%\) are unreadable.*max_reject_fraction"):
        run_stage("shard", cfg, tmp_path / "run")
    assert (tmp_path / "run/shard/rejected.jsonl").exists()
    assert not (tmp_path / "run/shard/manifest.json").exists()


TWO_RANKS = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from pipeline.config.root import load_config
    from pipeline.data.reader import make_image_loader
    from pipeline.runtime.dist import detect_env
    from pipeline.runner.stage import run_stage

    out = Path(sys.argv[2])
    env = detect_env()
    for fmt in ("webdataset", "mds"):
        run_stage("shard", load_config(None, sys.argv[3:] + [f"data.format={fmt}"]), out / fmt)
        keys = {}
        for split, workers in (("train", 2), ("val", 0)):
            loader = make_image_loader(out / fmt / "shard", split, 8, rank=env.rank, world_size=env.world_size,
                                       seed=3, num_workers=workers)
            keys[split] = [key for batch in loader for key in batch.keys]
        (out / f"{fmt}.rank{env.rank}.json").write_text(json.dumps(keys))
""")


def test_two_ranks_shard_and_read_with_full_coverage_and_no_overlap(reference, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "--no-python", sys.executable, "-c", TWO_RANKS, str(REPO), str(tmp_path),
                           *SMALL], capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for fmt in ("webdataset", "mds"):
        assert (tmp_path / fmt / "shard/manifest.json").read_bytes() == (reference[fmt] / "manifest.json").read_bytes()
        per_rank = [json.loads((tmp_path / f"{fmt}.rank{r}.json").read_text()) for r in (0, 1)]
        for split, size in (("train", 90), ("val", 20)):
            rank0, rank1 = per_rank[0][split], per_rank[1][split]
            assert not set(rank0) & set(rank1)
            assert sorted(rank0 + rank1) == [f"{split}_{i:08d}" for i in range(size)]
