"""Training checkpoints: atomic, last K kept, truncated or corrupt ones skipped with a warning.

Layout: DIR/step_00001200.pt (a torch.save'd dict of tensors and plain values) and its sidecar
DIR/step_00001200.json ({"step", "bytes"}) written after it. Loading uses weights_only=True, so
a checkpoint can only hold tensors, containers and primitives, never arbitrary pickled objects.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from ..io import atomic_path, atomic_write_json, read_json, remove_stale_temps

_NAME = re.compile(r"^step_(\d{8})\.pt$")


class CheckpointManager:
    def __init__(self, folder: str | Path, keep: int = 2, logger: logging.Logger | None = None):
        self.folder = Path(folder)
        self.keep = keep
        self.logger = logger or logging.getLogger("tessera")

    def path_for(self, step: int) -> Path:
        return self.folder / f"step_{step:08d}.pt"

    def steps(self) -> list[int]:
        """Steps of checkpoint files present, newest first (complete or not)."""
        if not self.folder.is_dir():
            return []
        found = [int(m.group(1)) for p in self.folder.iterdir() if (m := _NAME.match(p.name))]
        return sorted(found, reverse=True)

    def save(self, step: int, state: dict) -> Path:
        """Write the checkpoint for `step` (call on the main rank only) and prune old ones."""
        self.folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.folder)
        path = self.path_for(step)
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
        atomic_write_json(path.with_suffix(".json"), {"step": step, "bytes": path.stat().st_size})
        for old in self.steps()[self.keep:]:
            self.path_for(old).unlink(missing_ok=True)
            self.path_for(old).with_suffix(".json").unlink(missing_ok=True)
        return path

    def _verified(self, step: int) -> bool:
        path, sidecar = self.path_for(step), self.path_for(step).with_suffix(".json")
        try:
            meta = read_json(sidecar)
        except (OSError, ValueError):
            return False
        return meta.get("step") == step and meta.get("bytes") == path.stat().st_size

    def load_latest(self, map_location="cpu") -> tuple[int, dict] | None:
        """(step, state) of the newest loadable checkpoint, or None; warns about each bad one."""
        for step in self.steps():
            path = self.path_for(step)
            if not self._verified(step):
                self.logger.warning("checkpoint %s is truncated or has no valid sidecar; using an older one", path)
                continue
            try:
                return step, torch.load(path, map_location=map_location, weights_only=True)
            except Exception as err:  # a corrupt zip raises several different error types
                self.logger.warning("checkpoint %s could not be loaded (%s: %s); using an older one",
                                    path, type(err).__name__, err)
        return None
