"""Exported models: weights as safetensors plus the config that rebuilds them.

    RUN_DIR/train_tokenizer/tokenizer.safetensors
    RUN_DIR/train_tokenizer/tokenizer.json          {"tokenizer": {...TokenizerConfig...}, "resolution": R}
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from .configschema import build_section
from .io import atomic_path, atomic_write_json, read_json
from .models.registry import build_tokenizer
from .models.tokenizer_config import TokenizerConfig

TOKENIZER_WEIGHTS = "tokenizer.safetensors"
TOKENIZER_CONFIG = "tokenizer.json"
# Options removed since a tokenizer could have been exported with them; none shaped the model,
# so an older export still loads (any other unknown key is an error, as in a user config).
_REMOVED_TOKENIZER_KEYS = ("preset", "disc_sync_bn")


def save_tokenizer(model: torch.nn.Module, cfg: TokenizerConfig, resolution: int, folder: str | Path) -> None:
    folder = Path(folder)
    with atomic_path(folder / TOKENIZER_WEIGHTS) as tmp:
        save_model(model, str(tmp))  # handles tied tensors, unlike save_file
    atomic_write_json(folder / TOKENIZER_CONFIG, {"tokenizer": dataclasses.asdict(cfg), "resolution": resolution})


def load_tokenizer(folder: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild the exported tokenizer from its config and load its weights (eval mode)."""
    folder = Path(folder)
    meta = read_json(folder / TOKENIZER_CONFIG)
    fields = {k: v for k, v in meta["tokenizer"].items() if k not in _REMOVED_TOKENIZER_KEYS}
    cfg = build_section(TokenizerConfig, fields, "tokenizer")
    model = build_tokenizer(cfg, meta["resolution"])
    load_model(model, str(folder / TOKENIZER_WEIGHTS), device=str(device))
    return model.to(device).eval()
