"""ImageFolder scanning, splitting and preprocessing; unreadable files are reported, not fatal."""
import numpy as np
import pytest
from PIL import Image

from pipeline.config.schema import ConfigError
from pipeline.data.images import center_crop_resize, decode_image_file
from pipeline.data.sources import ImageFolderSource


def _save(path, size=(40, 30), color=(200, 10, 10), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)


def test_center_crop_resize_takes_the_shorter_side_and_crops_the_middle():
    image = Image.new("RGB", (80, 40), (0, 0, 0))
    image.paste((255, 255, 255), (20, 0, 60, 40))  # white middle square
    out = center_crop_resize(image, 20)
    assert out.shape == (20, 20, 3) and out.dtype == np.uint8
    assert out[:, 1:-1].min() >= 250 and out.min() > 200  # the white middle survives; edges are antialiased
    assert center_crop_resize(Image.new("L", (10, 30)), 16).shape == (16, 16, 3)  # grey -> RGB, upscale


def test_train_val_folders_sorted_classes_and_seeded_order(tmp_path):
    for split, n in (("train", 3), ("val", 1)):
        for cls in ("dog", "cat"):
            for i in range(n):
                _save(tmp_path / split / cls / f"{i}.png")
    (tmp_path / "train" / "cat" / "notes.txt").write_text("ignored: not an image name")
    source = ImageFolderSource(tmp_path, 16, seed=0, val_fraction=0.0)
    assert source.class_names == ["cat", "dog"]
    assert source.split_sizes == {"train": 6, "val": 2}
    loaded = source.load("train", 0, 6)
    assert sorted(img.origin for img in loaded) == sorted(f"train/{c}/{i}.png"
                                                         for c in ("cat", "dog") for i in range(3))
    assert all(img.label == (0 if "/cat/" in img.origin else 1) for img in loaded)
    same = ImageFolderSource(tmp_path, 16, seed=0, val_fraction=0.0)
    assert [i.origin for i in same.load("train", 0, 6)] == [i.origin for i in loaded]


def test_seeded_val_fraction_without_val_folder(tmp_path):
    for cls in ("a", "b"):
        for i in range(10):
            _save(tmp_path / cls / f"{i}.jpg", fmt="JPEG")
    source = ImageFolderSource(tmp_path, 16, seed=1, val_fraction=0.2)
    assert source.split_sizes == {"train": 16, "val": 4}
    train = {img.origin for img in source.load("train", 0, 16)}
    val = {img.origin for img in source.load("val", 0, 4)}
    assert not train & val and len(train | val) == 20
    assert source.fingerprint() == ImageFolderSource(tmp_path, 16, seed=1, val_fraction=0.2).fingerprint()
    _save(tmp_path / "a" / "new.png")
    assert source.fingerprint() != ImageFolderSource(tmp_path, 16, seed=1, val_fraction=0.2).fingerprint()


def test_train_folder_without_val_folder_is_split_by_fraction(tmp_path):
    for i in range(10):
        _save(tmp_path / "train" / "only" / f"{i}.png")
    source = ImageFolderSource(tmp_path, 16, seed=0, val_fraction=0.3)
    assert source.class_names == ["only"] and source.split_sizes == {"train": 7, "val": 3}
    assert source.load("val", 0, 1)[0].origin.startswith("train/only/")


def test_truncated_and_fake_images_are_rejected_with_a_reason(tmp_path):
    good = tmp_path / "good.jpg"
    _save(good, size=(64, 64), fmt="JPEG")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    fake = tmp_path / "fake.png"
    fake.write_text("this is not a png")
    assert decode_image_file(good, 16)[0].shape == (16, 16, 3)
    for path in (truncated, fake):
        pixels, reason = decode_image_file(path, 16)
        assert pixels is None and reason


def test_bad_roots_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not a directory"):
        ImageFolderSource(tmp_path / "missing", 16, 0, 0.0)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(ConfigError, match="no image files"):
        ImageFolderSource(tmp_path, 16, 0, 0.0)
