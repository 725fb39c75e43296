"""Capture and restore every RNG a training step touches, in a `weights_only`-loadable form."""
from __future__ import annotations

import random

import numpy as np
import torch


def capture_rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": _to_loadable(random.getstate()),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(_from_loadable(state["python"]))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_loadable(obj):
    # random.getstate() is nested tuples of ints; lists survive weights_only loading.
    return [_to_loadable(x) for x in obj] if isinstance(obj, tuple) else obj


def _from_loadable(obj):
    return tuple(_from_loadable(x) for x in obj) if isinstance(obj, list) else obj
