"""Every outside file the selected stages read is checked up front: one ConfigError naming the key
and the path, for a missing file, an unreadable one, or an ImageFolder root without class folders."""
import os

import pytest

from pipeline.config.root import load_config
from pipeline.config.schema import ConfigError
from pipeline.runner.external_files import check_external_files

ALL = ["shard", "train_tokenizer", "precompute_codes", "train_prior", "sample", "score"]


def tree(root):
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
    return root


def imagenet(tmp_path, *overrides):
    """The ImageNet preset with every outside file present, plus `overrides`."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    lpips, inception = tmp_path / "lpips.pth", tmp_path / "inception.pth"
    lpips.write_bytes(b"x")
    inception.write_bytes(b"x")
    return load_config("configs/imagenet256-rq.yaml", [f"data.root={tree(tmp_path / 'images')}",
                                                       f"tokenizer.lpips_weights={lpips}",
                                                       f"score.inception_weights={inception}", *overrides])


def test_the_preset_with_every_file_present_passes(tmp_path, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    check_external_files(imagenet(tmp_path), ALL)


@pytest.mark.parametrize("override, key", [
    ("tokenizer.lpips_weights=/nowhere/lpips.pth", "tokenizer.lpips_weights: /nowhere/lpips.pth: no such file"),
    ("tokenizer.lpips_weights=", "tokenizer.lpips_weights: empty"),
    ("score.inception_weights=/nowhere/pt_inception.pth", "score.inception_weights: /nowhere/pt_inception.pth"),
    ("score.reference=/nowhere/ref.npz", "score.reference: /nowhere/ref.npz: no such file"),
    ("data.root=/nowhere/imagenet", "data.root: /nowhere/imagenet: not a directory"),
    ("prior_train.deepspeed_config=/nowhere/ds.json", "prior_train.deepspeed_config: /nowhere/ds.json"),
])
def test_a_missing_file_names_its_key_and_path(tmp_path, repo_root, monkeypatch, override, key):
    monkeypatch.chdir(repo_root)
    with pytest.raises(ConfigError) as err:
        check_external_files(imagenet(tmp_path, override), ALL)
    assert str(err.value).startswith(key) and "\n" not in str(err.value)


def test_only_the_selected_stages_and_enabled_features_are_checked(tmp_path, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    cfg = imagenet(tmp_path, "tokenizer.lpips_weights=/nowhere/lpips.pth", "score.reference=/nowhere/ref.npz")
    check_external_files(cfg, ["shard", "precompute_codes", "train_prior", "sample"])
    check_external_files(imagenet(tmp_path / "b", "tokenizer.lpips_weight=0",
                                  "tokenizer.lpips_weights=/nowhere/lpips.pth"), ALL)
    check_external_files(imagenet(tmp_path / "c", "score.inception_weights=", "score.allow_uncalibrated=true"), ALL)


def test_a_root_without_class_folders_and_an_unreadable_file_are_named(tmp_path, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat/img.png").write_bytes(b"x")
    with pytest.raises(ConfigError, match="data.root: .*flat has no class sub-folders"):
        check_external_files(imagenet(tmp_path, f"data.root={tmp_path / 'flat'}"), ["shard"])
    if os.geteuid() == 0:
        pytest.skip("root reads any file")
    secret = tmp_path / "ref.npz"
    secret.write_bytes(b"x")
    secret.chmod(0)
    with pytest.raises(ConfigError, match=f"score.reference: {secret}: cannot be read"):
        check_external_files(imagenet(tmp_path, f"score.reference={secret}"), ["score"])


def test_a_finished_stage_needs_its_files_no_more(tmp_path, repo_root, monkeypatch):
    """An imported or finished train_tokenizer is skipped: its LPIPS weights may be gone (not with --force)."""
    from pipeline.runner.rundir import RunDir
    from pipeline.runner.stage import preflight

    monkeypatch.chdir(repo_root)
    cfg = imagenet(tmp_path, "tokenizer.lpips_weights=/nowhere/lpips.pth")
    run = RunDir(tmp_path / "run")
    with pytest.raises(ConfigError, match="tokenizer.lpips_weights"):
        preflight(cfg, ["train_tokenizer", "precompute_codes"], run_dir=run.root)
    run.write_done("train_tokenizer", {"stage": "train_tokenizer"})
    preflight(cfg, ["train_tokenizer", "precompute_codes"], run_dir=run.root)
    with pytest.raises(ConfigError, match="tokenizer.lpips_weights"):
        preflight(cfg, ["train_tokenizer"], run_dir=run.root, force=True)
