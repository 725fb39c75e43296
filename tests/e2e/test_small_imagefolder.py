"""A 40-image ImageFolder (10 classes x 4) runs all six stages to the end with the probe classifier
on (train split smaller than its batch: no hang), and so does the same tree declared as 1000 classes
(the ImageNet presets' count)."""
import json

import numpy as np
import pytest
from PIL import Image
from testkit import TINY_TOKENIZER, tessera

pytestmark = pytest.mark.e2e

STAGES = ("shard", "train_tokenizer", "precompute_codes", "train_prior", "sample", "score")
SMALL = [*TINY_TOKENIZER, "data.source=imagefolder", "data.val_fraction=0.25", "tokenizer_train.steps=2",
         "tokenizer_train.eval_classifier=true", "precompute.batch_size=8", "prior.embed_dim=32",
         "prior.spatial_layers=1", "prior.depth_layers=1", "prior_train.engine=ddp", "prior_train.steps=2",
         "prior_train.batch_size=8", "prior_train.eval_images=8", "prior_train.sample_every=0",
         "sample.num_samples=10", "sample.chunk_size=10", "sample.batch_size=10", "score.download_weights=false",
         "score.kid_subset_size=4", "score.batch_size=10", "score.classifier_check=true"]


def image_folder(root, classes=10, per_class=4, side=24):
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c:02d}").mkdir(parents=True)
        for i in range(per_class):
            pixels = np.full((side, side, 3), 25 * c, np.uint8) + rng.integers(0, 20, (side, side, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"class{c:02d}" / f"{i}.png")
    return root


@pytest.mark.parametrize("declared", [10, 1000])
def test_forty_images_run_all_six_stages(tmp_path, declared):
    root = image_folder(tmp_path / "images")
    run_dir = tmp_path / "run"
    out = tessera("run", "configs/demo-rq.yaml", "--run-dir", str(run_dir), *SMALL, f"data.root={root}",
                  f"data.num_classes={declared}", f"prior.num_classes={declared}", timeout=1200)
    for stage in STAGES:
        assert f"[tessera] {stage}: done" in out.stdout
    shard = json.loads((run_dir / "shard/done.json").read_text())["counts"]
    assert shard["train_images"] + shard["val_images"] == 40 and shard["train_images"] < 64  # < one probe batch
    probe = json.loads((run_dir / "classifier/classifier.json").read_text())
    assert probe["batch_size"] == shard["train_images"] and probe["num_classes"] == 10
    log = (run_dir / "train_tokenizer/log.txt").read_text()
    assert "probe classifier: step 400/400" in log
    score = json.loads((run_dir / "score/done.json").read_text())["metrics"]
    assert score["classifier_chance"] == pytest.approx(0.1) and "classifier_accuracy_samples" in score
