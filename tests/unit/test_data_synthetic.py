"""The embedded synthetic dataset: deterministic per (seed, split, index), balanced, any size."""
import numpy as np
import pytest

from pipeline.data import synthetic


def test_same_index_renders_identically_in_any_order_and_batch():
    full, labels = synthetic.render(3, "train", np.arange(40), 48, 12)
    picked, picked_labels = synthetic.render(3, "train", [39, 7, 20], 48, 12)
    np.testing.assert_array_equal(picked, full[[39, 7, 20]])
    np.testing.assert_array_equal(picked_labels, labels[[39, 7, 20]])
    again, _ = synthetic.render(3, "train", np.arange(40), 48, 12)
    assert again.tobytes() == full.tobytes()


def test_seed_and_split_change_the_images():
    base, _ = synthetic.render(0, "train", np.arange(8), 32, 10)
    assert not np.array_equal(base, synthetic.render(1, "train", np.arange(8), 32, 10)[0])
    assert not np.array_equal(base, synthetic.render(0, "val", np.arange(8), 32, 10)[0])


@pytest.mark.parametrize("resolution", [16, 64, 256])
def test_shapes_dtype_and_balanced_labels(resolution):
    images, labels = synthetic.render(0, "train", np.arange(24), resolution, 12)
    assert images.shape == (24, resolution, resolution, 3) and images.dtype == np.uint8
    assert np.bincount(labels, minlength=12).tolist() == [2] * 12


def test_at_least_ten_named_classes_and_variants_beyond_the_families():
    assert len(synthetic.FAMILIES) >= 10
    names = synthetic.class_names(30)
    assert len(set(names)) == 30 and names[12] == f"{synthetic.FAMILIES[0]}_f1"


def test_images_mix_flat_background_and_detailed_objects():
    images, _ = synthetic.render(0, "train", np.arange(32), 64, 12)
    # Local detail: absolute difference to the right neighbour. The background gradient changes by
    # at most a couple of levels per pixel; textured objects change by tens of levels.
    detail = np.abs(np.diff(images.astype(np.int16), axis=2)).max(axis=3)
    flat_fraction = (detail <= 3).mean(axis=(1, 2))
    busy_fraction = (detail >= 40).mean(axis=(1, 2))
    assert (flat_fraction > 0.5).all() and (busy_fraction > 0.005).all()


def test_shapes_style_is_deterministic_balanced_and_big():
    full, labels = synthetic.render(3, "train", np.arange(30), 32, 10, "shapes")
    picked, _ = synthetic.render(3, "train", [29, 4], 32, 10, "shapes")
    np.testing.assert_array_equal(picked, full[[29, 4]])
    assert np.bincount(labels, minlength=10).tolist() == [3] * 10
    names = synthetic.class_names(10, "shapes")
    assert len(set(names)) == 10 and names[:2] == ["disc_red", "square_red"]  # two shapes per hue
    # One large object: the most saturated pixels (the object's class colour) cover a big share.
    rgb = full.astype(np.float32) / 255
    saturation = rgb.max(axis=3) - rgb.min(axis=3)
    object_fraction = (saturation > 0.4).mean(axis=(1, 2))
    assert (object_fraction > 0.08).all() and np.median(object_fraction) > 0.2
    with pytest.raises(ValueError, match="synthetic style"):
        synthetic.render(0, "train", [0], 32, 10, "stripes")
