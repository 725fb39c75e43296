"""The probe classifier: trained once per shard set and cached; its accuracies in the tokenizer eval."""
import json
import logging

import pytest
import torch

import pipeline.train.classifier as classifier_lib
from pipeline.config.root import load_config
from pipeline.runner.stage import run_stage
from pipeline.runtime.errors import StageError
from pipeline.train.tokenizer_eval import evaluate_tokenizer

SHAPES = ["data.synthetic_style=shapes", "data.resolution=16", "data.num_train=200", "data.num_val=50",
          "data.shard_max_count=100"]


def test_trained_once_cached_and_retrained_for_other_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(classifier_lib, "STEPS", 60)
    run_stage("shard", load_config(None, SHAPES), tmp_path)
    manifest = tmp_path / "shard/manifest.json"
    model, meta = classifier_lib.classifier_for_run(tmp_path, manifest, seed=0)
    assert meta["val_accuracy"] > 0.5 and meta["num_classes"] == 10  # chance is 0.1
    weights = tmp_path / "classifier/classifier.safetensors"
    stamp = weights.stat().st_mtime_ns
    again, _ = classifier_lib.classifier_for_run(tmp_path, manifest, seed=0)
    assert weights.stat().st_mtime_ns == stamp  # loaded from the cache, not retrained
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    record = json.loads((tmp_path / "classifier/classifier.json").read_text())
    record["manifest_sha256"] = "0" * 64  # as if the shards had changed
    (tmp_path / "classifier/classifier.json").write_text(json.dumps(record))
    classifier_lib.classifier_for_run(tmp_path, manifest, seed=0)
    assert weights.stat().st_mtime_ns != stamp


def test_training_it_leaves_the_callers_rng_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(classifier_lib, "STEPS", 5)
    run_stage("shard", load_config(None, SHAPES), tmp_path)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    classifier_lib.classifier_for_run(tmp_path, tmp_path / "shard/manifest.json", seed=0)
    assert torch.equal(torch.rand(3), expected)


class ByLabel(torch.nn.Module):
    """A 'classifier' that reads the label painted into pixel (0, 0): right on the originals, and
    on a reconstruction exactly when the model kept that pixel."""

    def predict(self, images):
        return ((images[:, 0, 0, 0] + 1) * 2).round().long()


class KeepsHalf(torch.nn.Module):
    """A stand-in tokenizer: keeps the first half of each batch, blanks the rest."""

    def encode(self, x):
        self.images = x
        return torch.zeros(x.shape[0], 1, 1, 1, dtype=torch.long)  # one code per image

    def decode(self, codes):
        out = self.images.clone()
        out[codes.shape[0] // 2:] = -1
        return out

    def codes_per_image(self, codes):
        return torch.full((codes.shape[0],), 4, dtype=torch.long)


def test_eval_reports_classifier_accuracy_on_originals_and_reconstructions():
    labels = torch.tensor([1, 2, 3, 1, 2, 3, 1, 2])
    images = torch.zeros(8, 3, 4, 4)
    images[:, 0, 0, 0] = labels / 2 - 1
    metrics, _ = evaluate_tokenizer(KeepsHalf(), [(images, labels)], codebook_size=4, max_images=8,
                                    device=torch.device("cpu"), classifier=ByLabel())
    assert metrics["class_acc_originals"] == 1.0
    assert metrics["class_acc_reconstructions"] == 0.5 and metrics["class_acc_ratio"] == 0.5
    plain, _ = evaluate_tokenizer(KeepsHalf(), [(images, labels)], codebook_size=4, max_images=8,
                                  device=torch.device("cpu"))
    assert "class_acc_originals" not in plain


def test_a_split_smaller_than_a_batch_trains_and_logs_progress(tmp_path, monkeypatch, caplog):
    """24 train images, batch 64: the old loop waited forever for a full batch."""
    monkeypatch.setattr(classifier_lib, "STEPS", 6)
    monkeypatch.setattr(classifier_lib, "LOG_EVERY", 3)
    run_stage("shard", load_config(None, SHAPES[:2] + ["data.num_train=24", "data.num_val=8"]), tmp_path)
    with caplog.at_level("INFO", logger="probe-test"):  # "tessera" logs to the stage's file only
        model, meta = classifier_lib.classifier_for_run(tmp_path, tmp_path / "shard/manifest.json", seed=0,
                                                        device="cpu", logger=logging.getLogger("probe-test"))
    assert meta["batch_size"] == 24 and meta["steps"] == 6 and next(model.parameters()).device.type == "cpu"
    assert "probe classifier: step 3/6" in caplog.text and "probe classifier: step 6/6" in caplog.text


def test_an_empty_train_split_is_refused_clearly(tmp_path):
    run_stage("shard", load_config(None, SHAPES[:2] + ["data.num_train=1", "data.num_val=4"]), tmp_path)
    manifest = tmp_path / "shard/manifest.json"
    record = json.loads(manifest.read_text())
    record["splits"]["train"]["num_samples"] = 0  # as a tree with only a val/ folder would shard
    manifest.write_text(json.dumps(record))
    with pytest.raises(StageError, match="train split of .* is empty"):
        classifier_lib.classifier_for_run(tmp_path, manifest, seed=0)


def test_skipped_where_the_class_count_makes_the_probe_meaningless(tmp_path):
    assert classifier_lib.probe_skip_reason(10) is None and classifier_lib.probe_skip_reason(100) is None
    assert "1000 classes" in classifier_lib.probe_skip_reason(1000)
    run_stage("shard", load_config(None, SHAPES[:2] + ["data.num_train=4", "data.num_val=0"]), tmp_path)
    manifest = tmp_path / "shard/manifest.json"
    record = json.loads(manifest.read_text())
    record["num_classes"] = 1000
    manifest.write_text(json.dumps(record))
    model, meta = classifier_lib.classifier_for_run(tmp_path, manifest, seed=0)
    assert model is None and "skipped" in meta and not (tmp_path / "classifier").exists()
