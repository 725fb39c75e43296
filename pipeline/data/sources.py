"""Where images come from: an ImageFolder tree or the embedded synthetic dataset (an existing
webdataset shard set: pipeline/data/wds_source.py, shard by shard).

Both sources expose the same small interface used by the shard writer:

    source.class_names             list of class names, index = label
    source.split_sizes             {"train": n, "val": m} (inputs, before rejects)
    source.load(split, start, stop) -> list[LoadedImage] for positions [start, stop) of the split's
                                   fixed order, preprocessed to RGB uint8 (R, R, 3) or rejected
    source.fingerprint()           what the stage's outputs depend on besides the config

The order of a split is fixed by the seed alone, so a shard plan over positions means the same
samples no matter how many workers write it.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..config.schema import ConfigError
from ..runtime.io import sha256_json
from . import synthetic
from .images import LoadedImage, decode_image_file

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
SPLITS = ("train", "val")


class SyntheticSource:
    kind = "synthetic"

    def __init__(self, seed: int, resolution: int, num_classes: int, num_train: int, num_val: int,
                 style: str = "textures"):
        self.seed, self.resolution, self.num_classes, self.style = seed, resolution, num_classes, style
        self.split_sizes = {name: n for name, n in (("train", num_train), ("val", num_val)) if n > 0}
        self.class_names = synthetic.class_names(num_classes, style)

    def load(self, split: str, start: int, stop: int) -> list[LoadedImage]:
        images, labels = synthetic.render(self.seed, split, np.arange(start, stop), self.resolution, self.num_classes,
                                          self.style)
        return [LoadedImage(split, start + i, int(labels[i]), f"synthetic/{split}/{start + i}", images[i])
                for i in range(stop - start)]

    def fingerprint(self) -> dict:
        return {}  # fully determined by the config


class ImageFolderSource:
    """ImageNet layout: root/<class>/<image>, or root/train/<class>/... and root/val/<class>/...."""
    kind = "imagefolder"

    def __init__(self, root: str | os.PathLike, resolution: int, seed: int, val_fraction: float):
        self.root = Path(root)
        self.resolution = resolution
        if not self.root.is_dir():
            raise ConfigError(f"data.root: ImageFolder root {self.root} is not a directory")
        if (self.root / "train").is_dir() and (self.root / "val").is_dir():
            self.class_names = _class_folders(self.root / "train")
            unknown = sorted(set(_class_folders(self.root / "val")) - set(self.class_names))
            if unknown:
                raise ConfigError(f"data.root: {self.root / 'val'} has class folders missing from train/: "
                                  f"{unknown[:5]}")
            files = {split: _scan(self.root, Path(split), self.class_names) for split in SPLITS}
        else:  # one tree (root/ or root/train/ alone): hold out a seeded val fraction
            tree = Path("train") if (self.root / "train").is_dir() else Path(".")
            self.class_names = _class_folders(self.root / tree)
            files = _seeded_split(_scan(self.root, tree, self.class_names), seed, val_fraction)
        if not any(files.values()):
            raise ConfigError(f"data.root: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {self.root}")
        self._all_files = sorted(f for split_files in files.values() for f in split_files)
        # A seeded order mixes classes within every shard (the sorted order would not).
        self.files = {split: [split_files[i] for i in np.random.default_rng([seed, synthetic.split_code(split)])
                              .permutation(len(split_files))]
                      for split, split_files in files.items() if split_files}
        self.split_sizes = {split: len(split_files) for split, split_files in self.files.items()}

    def load(self, split: str, start: int, stop: int) -> list[LoadedImage]:
        out = []
        for position in range(start, stop):
            relpath, label, _ = self.files[split][position]
            pixels, reason = decode_image_file(self.root / relpath, self.resolution)
            out.append(LoadedImage(split, position, label, relpath, pixels, reason))
        return out

    def fingerprint(self) -> dict:
        """Hash of the sorted (path, size) list: adding, removing or replacing a file changes it."""
        return {"imagefolder": sha256_json([(relpath, size) for relpath, _, size in self._all_files])}


def _class_folders(folder: Path) -> list[str]:
    names = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir() and not entry.name.startswith("."))
    if not names:
        raise ConfigError(f"data.root: {folder} has no class sub-folders (expected one folder per class)")
    return names


def _scan(root: Path, sub: Path, class_names: list[str]) -> list[tuple[str, int, int]]:
    """(relative path, label, size) of every image-named file, sorted by path."""
    found = []
    for label, name in enumerate(class_names):
        class_dir = root / sub / name
        if not class_dir.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(class_dir):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for filename in filenames:
                if filename.startswith(".") or Path(filename).suffix.lower() not in IMAGE_EXTENSIONS:
                    continue
                path = Path(dirpath) / filename
                found.append((path.relative_to(root).as_posix(), label, path.stat().st_size))
    return sorted(found)


def _seeded_split(files: list, seed: int, val_fraction: float) -> dict[str, list]:
    num_val = int(round(len(files) * val_fraction))
    held_out = set(np.random.default_rng([seed, 0x7A1]).permutation(len(files))[:num_val].tolist())
    return {"train": [f for i, f in enumerate(files) if i not in held_out],
            "val": [f for i, f in enumerate(files) if i in held_out]}


def make_source(data_cfg, seed: int):
    """The source named by a DataConfig."""
    if data_cfg.source == "webdataset":
        from .wds_source import WebDatasetSource

        return WebDatasetSource(data_cfg)
    if data_cfg.source == "synthetic":
        return SyntheticSource(seed, data_cfg.resolution, data_cfg.num_classes, data_cfg.num_train, data_cfg.num_val,
                               data_cfg.synthetic_style)
    return ImageFolderSource(data_cfg.root, data_cfg.resolution, seed, data_cfg.val_fraction)
