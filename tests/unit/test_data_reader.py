"""Reading shards: tamper detection, deterministic order, augmentation, exact resume."""
import os

import pytest
import torch

from pipeline.config.root import load_config
from pipeline.data.manifest import ShardIntegrityError, verify_shards
from pipeline.data.reader import make_image_loader
from pipeline.runner.stage import StageError, run_stage


@pytest.fixture(scope="module")
def shard_dirs(tmp_path_factory):
    dirs = {}
    for fmt in ("webdataset", "mds"):
        run_dir = tmp_path_factory.mktemp(f"reader-{fmt}")
        cfg = load_config(None, ["data.num_train=50", "data.num_val=10", "data.resolution=16",
                                 "data.shard_max_count=12", f"data.format={fmt}"])
        run_stage("shard", cfg, run_dir)
        dirs[fmt] = run_dir / "shard"
    return dirs


def _keys(loader):
    return [key for batch in loader for key in batch.keys]


@pytest.mark.parametrize("fmt", ["webdataset", "mds"])
def test_batches_are_images_in_range_with_labels(shard_dirs, fmt):
    loader = make_image_loader(shard_dirs[fmt], "train", 8, seed=0)
    batch = next(iter(loader))
    assert batch.images.shape == (8, 3, 16, 16) and batch.images.dtype == torch.float32
    assert -1.0 <= batch.images.min() < 0 < batch.images.max() <= 1.0
    # Synthetic labels are index % num_classes; the key carries the index.
    assert batch.labels.tolist() == [int(key.split("_")[1]) % 10 for key in batch.keys]


def test_order_is_seeded_per_epoch_and_split_across_ranks(shard_dirs):
    a = make_image_loader(shard_dirs["webdataset"], "train", 8, seed=7)
    b = make_image_loader(shard_dirs["webdataset"], "train", 8, seed=7)
    epoch0 = _keys(a)
    assert epoch0 == _keys(b) and a.state_dict() == {"epoch": 1, "samples_consumed": 0}
    epoch1 = _keys(a)
    assert epoch1 != epoch0 and sorted(epoch1) == sorted(epoch0)
    assert _keys(make_image_loader(shard_dirs["webdataset"], "train", 8, seed=8)) != epoch0
    ranks = [_keys(make_image_loader(shard_dirs["webdataset"], "train", 8, seed=7, rank=r, world_size=3,
                                     drop_last=True))
             for r in range(3)]
    assert all(len(keys) == 16 for keys in ranks)  # 50 // (3 ranks * 8) = 2 full batches each
    assert len(set().union(*ranks)) == 48


@pytest.mark.parametrize("fmt,workers", [("webdataset", 0), ("mds", 2)])
def test_resume_mid_epoch_yields_exactly_the_remaining_batches(shard_dirs, fmt, workers):
    options = dict(rank=1, world_size=2, seed=3, random_crop=True, hflip=True, num_workers=workers)
    full = make_image_loader(shard_dirs[fmt], "train", 4, **options)
    full.load_state_dict({"epoch": 2, "samples_consumed": 0})
    reference = list(full)

    first = make_image_loader(shard_dirs[fmt], "train", 4, **options)
    first.set_epoch(2)
    iterator = iter(first)
    head = [next(iterator) for _ in range(3)]
    state = first.state_dict()
    assert state == {"epoch": 2, "samples_consumed": 12}

    resumed = make_image_loader(shard_dirs[fmt], "train", 4, **options)
    resumed.load_state_dict(state)
    tail = list(resumed)
    assert resumed.state_dict() == {"epoch": 3, "samples_consumed": 0}
    # Same samples, labels AND pixels as the uninterrupted stream: the crop/flip of each sample is
    # seeded by (seed, epoch, sample), so a resumed run must redraw exactly the same augmentation.
    stream, expected = head + tail, reference
    assert [b.keys for b in stream] == [b.keys for b in expected]
    assert torch.equal(torch.cat([b.labels for b in stream]), torch.cat([b.labels for b in expected]))
    for i, (got, want) in enumerate(zip(stream, expected)):
        assert torch.equal(got.images, want.images), f"batch {i} ({'resumed' if i >= len(head) else 'before'}): " \
                                                     f"augmented pixels differ from the uninterrupted stream"
    # ... and that comparison is not vacuous: augmentation is on (the resumed part differs from the
    # plain decoded images of the same samples, and not every sample comes out unchanged).
    plain = make_image_loader(shard_dirs[fmt], "train", 4, rank=1, world_size=2, seed=3)
    plain.load_state_dict(state)
    plain_tail = list(plain)
    assert [b.keys for b in plain_tail] == [b.keys for b in tail]
    changed = [not torch.equal(a, p) for got, ref in zip(tail, plain_tail) for a, p in zip(got.images, ref.images)]
    assert sum(changed) >= len(changed) // 2, f"augmentation changed only {sum(changed)} of {len(changed)} images"


def test_augmentation_changes_images_but_not_labels(shard_dirs):
    plain = next(iter(make_image_loader(shard_dirs["webdataset"], "train", 16, seed=1)))
    augmented = next(iter(make_image_loader(shard_dirs["webdataset"], "train", 16, seed=1,
                                            random_crop=True, hflip=True)))
    assert plain.keys == augmented.keys and torch.equal(plain.labels, augmented.labels)
    assert not torch.equal(plain.images, augmented.images)


@pytest.mark.parametrize("fmt", ["webdataset", "mds"])
def test_tampered_shard_is_detected_and_named(shard_dirs, fmt, tmp_path):
    import shutil

    copy = tmp_path / "shard"
    shutil.copytree(shard_dirs[fmt], copy)
    assert (copy / ".verified.json").exists()  # seeded by the shard stage: the first open only stats files
    make_image_loader(copy, "train", 4)
    unit = copy / ("train/train-000002.tar" if fmt == "webdataset" else "train/train-000002/shard.00000.mds")
    data = bytearray(unit.read_bytes())
    data[len(data) // 2] ^= 0x01
    unit.write_bytes(bytes(data))
    with pytest.raises(ShardIntegrityError, match="shard train/train-000002.* does not match the manifest"):
        make_image_loader(copy, "train", 4)
    assert issubclass(ShardIntegrityError, StageError)  # shown to the user without a traceback


def test_missing_shard_and_missing_manifest_are_named(shard_dirs, tmp_path):
    import shutil

    copy = tmp_path / "shard"
    shutil.copytree(shard_dirs["webdataset"], copy)
    os.remove(copy / "val/val-000000.tar")
    verify_shards(copy / "manifest.json", splits=("train",))  # the train split alone is intact
    with pytest.raises(ShardIntegrityError, match="shard val/val-000000.tar .* is missing"):
        make_image_loader(copy, "val", 4)
    with pytest.raises(ShardIntegrityError, match="no shard manifest"):
        make_image_loader(tmp_path / "nowhere", "train", 4)


def test_an_mds_shard_that_lost_a_file_is_reported_missing_files_not_corrupted(shard_dirs, tmp_path):
    import shutil

    copy = tmp_path / "shard"
    shutil.copytree(shard_dirs["mds"], copy)
    os.remove(copy / "train/train-000001/shard.00000.mds")
    missing = r"shard train/train-000001 .* is missing files: \d+ of the \d+ bytes"
    with pytest.raises(ShardIntegrityError, match=missing):
        verify_shards(copy / "manifest.json")
