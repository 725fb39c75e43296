"""Every file from outside the run that the selected stages will read, checked before the first
stage starts: present and readable (their contents are checked where they are loaded).

A missing LPIPS file would otherwise surface at train_tokenizer, after a whole shard job; a
missing reference after sampling 50,000 images. `check_external_files` raises one ConfigError
naming the config key and the path (the CLI prints it as one line and exits 2).
"""
from __future__ import annotations

import os
from pathlib import Path

from ..config.schema import ConfigError


def _readable_file(key: str, path: str, why: str) -> None:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"{key}: {p}: no such file ({why})")
    try:
        with open(p, "rb") as f:
            f.read(1)
    except OSError as err:
        raise ConfigError(f"{key}: {p}: cannot be read ({err.strerror or err}; {why})") from None


def _imagefolder_root(key: str, path: str) -> None:
    """The layout the shard stage expects, from its top-level folders only (ImageNet has 1.28M files)."""
    from ..data.sources import _class_folders

    root = Path(path).expanduser()
    if not root.is_dir():
        raise ConfigError(f"{key}: {root}: not a directory (the ImageFolder tree: one sub-folder per class, "
                          f"or train/ and val/ holding them)")
    if not os.access(root, os.R_OK | os.X_OK):
        raise ConfigError(f"{key}: {root}: cannot be listed (permission denied)")
    tree = root / "train" if (root / "train").is_dir() else root
    _class_folders(tree)  # ConfigError naming data.root when there are no class folders
    if (root / "train").is_dir() and (root / "val").is_dir():
        _class_folders(root / "val")


def _needs_inception(cfg, stages: list[str]) -> bool:
    return "score" in stages or ("train_tokenizer" in stages and cfg.tokenizer_train.rfid_images > 0)


def _inception_weights(cfg) -> None:
    sc = cfg.score
    if sc.allow_uncalibrated and not sc.inception_weights:
        return
    if sc.inception_weights:
        _readable_file("score.inception_weights", sc.inception_weights, "the Inception of FID/IS/KID")
        return
    from ..evaluation.inception import hub_cache_path

    cached = hub_cache_path()
    if cached.is_file():
        _readable_file("score.inception_weights", str(cached), "torch-fidelity's cached Inception")
    elif not sc.download_weights:
        raise ConfigError(f"score.inception_weights: empty, nothing cached at {cached} and "
                          f"score.download_weights=false: give the .pth, or set score.allow_uncalibrated=true")
    # else: torch-fidelity downloads it when the stage starts (it reports a failure itself)


def check_external_files(cfg, stages: list[str]) -> None:
    """Presence and readability of every outside file `stages` will read (ConfigError on the first)."""
    if "shard" in stages and cfg.data.source == "imagefolder":
        _imagefolder_root("data.root", cfg.data.root)
    if "train_tokenizer" in stages and cfg.tokenizer.lpips_weight > 0:
        if not cfg.tokenizer.lpips_weights:
            raise ConfigError(f"tokenizer.lpips_weights: empty, but tokenizer.lpips_weight is "
                              f"{cfg.tokenizer.lpips_weight} > 0: give the VGG16 LPIPS state_dict file, or set "
                              f"tokenizer.lpips_weight=0")
        _readable_file("tokenizer.lpips_weights", cfg.tokenizer.lpips_weights,
                       f"LPIPS weights, needed because tokenizer.lpips_weight is {cfg.tokenizer.lpips_weight} > 0")
    if "train_prior" in stages and cfg.prior_train.engine == "deepspeed" and cfg.prior_train.deepspeed_config:
        _readable_file("prior_train.deepspeed_config", cfg.prior_train.deepspeed_config, "the DeepSpeed JSON")
    if "score" in stages and cfg.score.reference:
        _readable_file("score.reference", cfg.score.reference, "the reference batch or statistics .npz")
    if _needs_inception(cfg, stages):
        _inception_weights(cfg)
