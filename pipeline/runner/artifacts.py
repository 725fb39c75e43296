"""Exported models: weights as safetensors plus the config that rebuilds them.

    RUN_DIR/train_tokenizer/tokenizer.safetensors
    RUN_DIR/train_tokenizer/tokenizer.json          {"tokenizer": {...TokenizerConfig...}, "resolution": R}
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from ..config.schema import build_section
from ..models.registry import build_tokenizer
from ..models.tokenizer_config import TokenizerConfig
from ..runtime.io import atomic_path, atomic_write_json, read_json

TOKENIZER_WEIGHTS = "tokenizer.safetensors"
TOKENIZER_CONFIG = "tokenizer.json"
# Options removed since a tokenizer could have been exported with them; none shaped the model,
# so an older export still loads (any other unknown key is an error, as in a user config).
_REMOVED_TOKENIZER_KEYS = ("preset", "disc_sync_bn")
# Options added since: an export without them was made by the code before them, so they take the
# value that reproduces that code (reference_behaviour decides the DQ layer layout, among others).
_ADDED_TOKENIZER_DEFAULTS = {"reference_behaviour": False}
# Keys of the tokenizer section that only the prior's training reads (soft_tau: its soft targets):
# not part of the exported tokenizer, so changing them never touches train_tokenizer's outputs.
PRIOR_ONLY_TOKENIZER_KEYS = ("soft_tau",)


def save_tokenizer(model: torch.nn.Module, cfg: TokenizerConfig, resolution: int, folder: str | Path) -> None:
    folder = Path(folder)
    with atomic_path(folder / TOKENIZER_WEIGHTS) as tmp:
        save_model(model, str(tmp))  # handles tied tensors, unlike save_file
    exported = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                if f.name not in PRIOR_ONLY_TOKENIZER_KEYS}
    atomic_write_json(folder / TOKENIZER_CONFIG, {"tokenizer": exported, "resolution": resolution})


def load_tokenizer(folder: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild the exported tokenizer from its config and load its weights (eval mode)."""
    folder = Path(folder)
    meta = read_json(folder / TOKENIZER_CONFIG)
    fields = {k: v for k, v in meta["tokenizer"].items() if k not in _REMOVED_TOKENIZER_KEYS}
    fields = {**_ADDED_TOKENIZER_DEFAULTS, **fields}
    cfg = build_section(TokenizerConfig, fields, "tokenizer")
    model = build_tokenizer(cfg, meta["resolution"])
    load_model(model, str(folder / TOKENIZER_WEIGHTS), device=str(device))
    return model.to(device).eval()


# ---- the prior ---------------------------------------------------------------------------
#   RUN_DIR/train_prior/prior.safetensors
#   RUN_DIR/train_prior/prior.json      {"prior": {...PriorConfig...}, "spec": {...CodeSpec...}}
# RQ priors hold the tokenizer's code vectors as a buffer, so the file alone rebuilds the model.
PRIOR_WEIGHTS = "prior.safetensors"
PRIOR_CONFIG = "prior.json"


def save_prior(state_dict: dict, cfg, spec, folder: str | Path) -> None:
    """Write a prior's (consolidated, CPU) state dict and the config + code spec that rebuild it."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tensors = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
               for k, v in state_dict.items()}
    with atomic_path(folder / PRIOR_WEIGHTS) as tmp:
        save_file(tensors, str(tmp))
    atomic_write_json(folder / PRIOR_CONFIG, {"prior": dataclasses.asdict(cfg), "spec": dataclasses.asdict(spec)})


def load_prior(folder: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild the exported prior and load its weights (eval mode)."""
    from safetensors.torch import load_file

    from ..models.prior_config import CodeSpec, PriorConfig
    from ..models.registry import build_prior

    folder = Path(folder)
    meta = read_json(folder / PRIOR_CONFIG)
    cfg = build_section(PriorConfig, meta["prior"], "prior")
    state = load_file(str(folder / PRIOR_WEIGHTS))
    model = build_prior(cfg, CodeSpec(**meta["spec"]), state.get("codebook"))  # 1 shared or D per-depth books
    model.load_state_dict(state)
    return model.to(device).eval()
