"""The probe classifier: trained once per shard set and cached; its accuracies in the tokenizer eval."""
import json

import torch

import pipeline.train.classifier as classifier_lib
from pipeline.config.root import load_config
from pipeline.runner.stage import run_stage
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
