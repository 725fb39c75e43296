"""The root config: YAML preset + dotted command-line overrides -> one typed `Config`.

    cfg = load_config("configs/demo-rq.yaml", ["tokenizer_train.lr=1e-4", "data.resolution=64"])

Every user mistake raises `ConfigError` with the full key path and what is allowed.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import yaml

from ..models.prior_config import PriorConfig
from ..models.tokenizer_config import TokenizerConfig
from ..runtime.io import sha256_json
from .schema import RUNTIME, ConfigError, build_section, describe, key_effects, option
from .sections import (
    DataConfig,
    LauncherConfig,
    PrecomputeConfig,
    PriorTrainConfig,
    SampleConfig,
    ScoreConfig,
    TokenizerTrainConfig,
)

# ZeRO stages the tokenizer trains with under tokenizer_train.engine=deepspeed.
TOKENIZER_ZERO_STAGES = (0, 1, 2)


@dataclass
class Config:
    name: str = option("run", "run name (default run directory: runs/<name>); defaults to the YAML file's stem",
                       affects=RUNTIME)
    seed: int = option(0, "master seed: shards, init, data order and sampling all derive from it", ge=0,
                       affects=("shard", "train_tokenizer", "precompute_codes", "train_prior", "sample", "score"))
    data: DataConfig = option(DataConfig(), "image source, resolution and shard layout")
    tokenizer: TokenizerConfig = option(TokenizerConfig(), "tokenizer architecture, quantizer and losses")
    tokenizer_train: TokenizerTrainConfig = option(TokenizerTrainConfig(), "optimisation of the tokenizer",
                                                   owner="train_tokenizer")
    precompute: PrecomputeConfig = option(PrecomputeConfig(), "encoding the dataset into code shards")
    prior: PriorConfig = option(PriorConfig(), "the autoregressive prior")
    prior_train: PriorTrainConfig = option(PriorTrainConfig(), "optimisation of the prior", owner="train_prior")
    sample: SampleConfig = option(SampleConfig(), "sampling")
    score: ScoreConfig = option(ScoreConfig(), "scoring (FID and friends)")
    launcher: LauncherConfig = option(LauncherConfig(), "SLURM resources per stage")

    def validate(self, path: str) -> None:
        tt = self.tokenizer_train
        if tt.engine == "deepspeed" and tt.zero_stage not in TOKENIZER_ZERO_STAGES:
            raise ConfigError(
                f"tokenizer_train.zero_stage: {tt.zero_stage} is not allowed with tokenizer_train.engine=deepspeed; "
                f"choose one of {', '.join(map(str, TOKENIZER_ZERO_STAGES))} (ZeRO-3 partitions the decoder's last "
                f"layer weight, which the adaptive GAN weight differentiates against), or engine=ddp.")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def stage_view(self, stage: str) -> dict:
        """The keys that declare they affect `stage`'s outputs (option(affects=...)), nested like
        to_dict(): what the stage reads and hashes into its done.json."""
        d, view = self.to_dict(), {}
        for key, stages in key_effects(Config).items():
            if stage in stages:
                *sections, leaf = key.split(".")
                node, value = view, d
                for section in sections:
                    node, value = node.setdefault(section, {}), value[section]
                node[leaf] = value[leaf]
        return view

    def stage_hash(self, stage: str) -> str:
        """Fingerprint of `stage_view`: equal hashes mean the stage would produce the same outputs."""
        return sha256_json(self.stage_view(stage))


def changed_keys(old: dict, new: dict, prefix: str = "", defaults: dict | None = None) -> list[str]:
    """Dotted keys of `new` whose values differ in `old` (two nested config dicts), as 'key: old -> new'.

    Keys only in `old` are not changes: the stage no longer reads them. With `defaults` (the same
    nesting), a key absent from `old` whose new value equals the one in `defaults` is not a change
    either: it was added to the config, or to the stage's hash, after `old` was recorded, and that
    value is what the stage used then (a new key's default keeps the behaviour before it)."""
    changes = []
    defaults = defaults if isinstance(defaults, dict) else None
    for key in sorted(new):
        path = f"{prefix}{key}"
        a, b = old.get(key, "<absent>"), new[key]
        if isinstance(b, dict) and (isinstance(a, dict) or a == "<absent>"):  # a whole section may be new
            changes.extend(changed_keys(a if isinstance(a, dict) else {}, b, path + ".",
                                        defaults.get(key) if defaults else None))
        elif a == "<absent>" and defaults is not None and key in defaults and defaults[key] == b:
            continue
        elif a != b:
            changes.append(f"{path}: {a!r} -> {b!r}")
    return changes


def default_config_dict() -> dict:
    """Every key at its default, nested like Config.to_dict()."""
    return Config().to_dict()


def parse_override(text: str) -> tuple[list[str], object]:
    """`a.b.c=VALUE` -> (['a','b','c'], VALUE parsed as YAML: 1e-4 -> float, [1,2] -> list)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE with a dotted key, e.g. tokenizer_train.lr=1e-4")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key part in {key!r}")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({err.problem})") from None
    # YAML reads 1e-4 as a string (no dot); accept float spellings users actually type.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in "eE.") and value.strip() not in ("", ".") else value
        except ValueError:
            pass
    return key.split("."), value


def _apply_override(tree: dict, keys: list[str], value) -> None:
    node = tree
    for i, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(keys)}: '{'.'.join(keys[:i + 1])}' is a value, not a section")
        node = child
    node[keys[-1]] = value


def _read_tree(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """One YAML preset as a dict; `base: other.yaml` (relative to this file) is read first and this
    file's keys are merged over it, section by section."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}" + (f" (the base of {chain[-1]})" if chain else ""))
    if path.resolve() in chain:
        raise ConfigError(f"{path}: `base` chain loops: {' -> '.join(str(p) for p in (*chain, path))}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    base = tree.pop("base", None)
    if base is None:
        return tree
    return merge_trees(_read_tree(path.parent / str(base), (*chain, path.resolve())), tree)


def merge_trees(base: dict, over: dict) -> dict:
    """Recursive merge of nested dicts: `over`'s keys win."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merge_trees(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """A preset (with its `base:` chain) + dotted overrides -> the typed Config."""
    tree: dict = {}
    name = "run"
    if path is not None:
        path = Path(path)
        tree = _read_tree(path)
        name = path.stem
    tree.setdefault("name", name)
    for text in overrides:
        keys, value = parse_override(text)
        _apply_override(tree, keys, value)
    return build_section(Config, tree)


def config_keys() -> list[str]:
    return describe(Config)
