"""What a stage's outputs depend on, as the runner records it in done.json and attempt.json.

A stage's fingerprint is the config view it declared (hashed), the hashes its input stages recorded
for the files it reads, and its external inputs; a stage is skipped when the fingerprint matches its
record, and refused with the changed parts named when it does not. Beside it the runner records the
package versions and git commit that produced the outputs.
"""
from __future__ import annotations

import contextlib
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from ..config.root import changed_keys, default_config_dict, merge_trees
from ..runtime.errors import StageError
from ..runtime.io import sha256_file, sha256_json
from .rundir import STAGE_NAMES, RunDir

if TYPE_CHECKING:
    from .stage import StageContext

# Inputs of a stage made by `tessera import` start with this (the hashes of the imported files).
IMPORTED_INPUT_PREFIX = "import:"
VERSIONED_PACKAGES = ("tessera", "torch", "deepspeed", "webdataset", "mosaicml-streaming", "torch-fidelity")


def package_versions() -> dict:
    versions = {"python": platform.python_version()}
    for pkg in VERSIONED_PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):  # an optional one not installed: left out
            versions[pkg] = metadata.version(pkg)
    return versions


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.TimeoutExpired):
        return ""


def stage_inputs(module) -> dict[str, tuple[str, ...]]:
    """The earlier stages `module` reads -> the files of their outputs it reads."""
    return dict(getattr(module, "INPUTS", {}))


def input_fingerprints(module, ctx: StageContext, run: RunDir) -> dict[str, str]:
    """'<stage>/<file>' -> the hash its done.json recorded, for every declared input, plus the
    stage's external inputs. StageError when an input stage is not done."""
    name = module.NAME
    recorded = (run.read_done(name) or {}).get("inputs") or {}
    imported = recorded and all(key.startswith(IMPORTED_INPUT_PREFIX) for key in recorded)
    if imported and not getattr(module, "IMPORTS", False):
        # Made by `tessera import` (pipeline/importers): no earlier stage was read; the hashes of the
        # imported files stand for the inputs, so a later run skips the stage instead of training
        # (an importer, IMPORTS = True, states the inputs of what it imports now).
        return recorded
    inputs = stage_inputs(module)
    missing = [stage for stage in inputs if run.read_done(stage) is None]
    if missing:
        raise StageError(f"stage {name} needs the {missing[0]} stage first (no {run.done_path(missing[0])}): run "
                         f"`tessera run CONFIG --run-dir {run.root} --stages {','.join(missing)}`")
    fingerprints = {}
    for stage, files in inputs.items():
        outputs = run.read_done(stage).get("outputs", {})
        for file in files:
            # The hash the earlier stage recorded (hashing a large model again is slow); records
            # that did not hash this file: the file itself.
            fingerprints[f"{stage}/{file}"] = outputs.get(file) or sha256_file(run.stage_dir(stage) / file)
    external = getattr(module, "external_inputs", None)
    if external is not None:
        fingerprints.update(external(ctx))
    return fingerprints


def stage_fingerprint(module, ctx: StageContext, run: RunDir) -> dict:
    view = ctx.cfg.stage_view(module.NAME)
    return {"config_hash": sha256_json(view), "sections": [key for key in view if isinstance(view[key], dict)],
            "config": view, "inputs": input_fingerprints(module, ctx, run)}


def recorded_config(run: RunDir) -> dict:
    """Every key at the value this run's stages recorded (done.json, else attempt.json; earlier
    stages first), over the defaults: what a stage whose record predates one of its keys used."""
    values = default_config_dict()
    for stage in STAGE_NAMES:
        record = run.read_done(stage) or run.read_attempt(stage) or {}
        values = merge_trees(values, record.get("config", {}))
    return values


def changed_parts(old: dict, new: dict, run: RunDir) -> list[str]:
    parts = []
    if old.get("config_hash") != new["config_hash"]:
        if "config" in old:
            # A key the record lacks (added to the config, or to this stage's hash, since) is not a
            # change when it holds the value the run recorded for it elsewhere, or its default.
            changes = changed_keys(old["config"], new["config"], defaults=recorded_config(run))
            if changes:
                parts.append("config (" + "; ".join(changes) + ")")
        else:  # recorded by an older tessera, which kept only the hash
            parts.append("config sections " + ", ".join(new["sections"]))
    if old.get("inputs") != new["inputs"]:
        changed = sorted(k for k in set(old.get("inputs", {})) | set(new["inputs"])
                         if old.get("inputs", {}).get(k) != new["inputs"].get(k))
        parts.append("inputs " + ", ".join(changed))
    return parts
