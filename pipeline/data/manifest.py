"""RUN_DIR/shard/manifest.json: what the shards hold, and checking shards against it.

The manifest holds only content (shards with count/sha256/bytes, splits, class names,
resolution, format, totals); no times, hosts or absolute paths, so the same data always gives
the same bytes and a run directory can be moved. Shard names are relative to its folder.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..runner.units import MANIFEST_NAME, Unit, unit_digest
from ..runtime.errors import StageError
from ..runtime.io import atomic_write_json, atomic_write_text, read_json

REJECTED_NAME = "rejected.jsonl"
MANIFEST_VERSION = 1
_VERIFY_CACHE_NAME = ".verified.json"


class ShardIntegrityError(StageError):
    """A shard is missing or differs from the manifest; the message names it."""


def build_manifest(plan: list[Unit], sidecars: list[dict], *, source_kind: str, class_names: list[str],
                   resolution: int, fmt: str, encoding: str, split_inputs: dict[str, int], plan_id: str) -> dict:
    splits = {}
    for split, num_inputs in split_inputs.items():
        entries = [{"name": s["name"], "count": s["count"], "sha256": s["sha256"], "bytes": s["bytes"]}
                   for spec, s in zip(plan, sidecars) if spec.split == split]
        splits[split] = {
            "num_inputs": num_inputs,
            "num_samples": sum(e["count"] for e in entries),
            "num_rejected": sum(len(s["rejected"]) for spec, s in zip(plan, sidecars) if spec.split == split),
            "shards": entries,
        }
    return {
        "version": MANIFEST_VERSION,
        "format": fmt,
        "image_encoding": encoding,
        "resolution": resolution,
        "source": source_kind,
        "num_classes": len(class_names),
        "class_names": class_names,
        "plan": plan_id,
        "splits": splits,
        "totals": {
            "inputs": sum(s["num_inputs"] for s in splits.values()),
            "samples": sum(s["num_samples"] for s in splits.values()),
            "rejected": sum(s["num_rejected"] for s in splits.values()),
            "shards": len(sidecars),
            "bytes": sum(s["bytes"] for s in sidecars),
        },
    }


def rejected_lines(plan: list[Unit], sidecars: list[dict]) -> str:
    """JSON lines in plan order (split, then position): the same inputs always give the same file."""
    lines = [json.dumps({"split": spec.split, **entry}, sort_keys=True)
             for spec, sidecar in zip(plan, sidecars) for entry in sidecar["rejected"]]
    return "".join(line + "\n" for line in lines)


def write_manifest(stage_dir: Path, manifest: dict, rejected: str) -> None:
    atomic_write_text(stage_dir / REJECTED_NAME, rejected)
    atomic_write_json(stage_dir / MANIFEST_NAME, manifest)  # last: its presence means complete


def load_manifest(path: str | os.PathLike) -> tuple[dict, Path]:
    """(manifest, folder its shard names are relative to) from a manifest path or its folder."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise ShardIntegrityError(f"no shard manifest at {path}; run the shard stage first")
    manifest = read_json(path)
    if manifest.get("version") != MANIFEST_VERSION:
        raise ShardIntegrityError(f"{path}: manifest version {manifest.get('version')} is not {MANIFEST_VERSION}")
    return manifest, path.parent


def verify_shards(manifest: dict | str | os.PathLike, root: str | os.PathLike | None = None,
                  splits: tuple[str, ...] | None = None, *, stage: str = "shard") -> None:
    """Raise ShardIntegrityError naming the first missing or altered shard (`stage` wrote them).

    Hashing every shard on every open is slow for large datasets, so a verified shard is
    remembered in `<root>/.verified.json` by (size, mtime_ns, sha256); any rewrite of a shard
    changes its mtime and forces a fresh hash.
    """
    if not isinstance(manifest, dict):
        manifest, root = load_manifest(manifest)
    root = Path(root)
    cache_path = root / _VERIFY_CACHE_NAME
    try:
        cache = read_json(cache_path)
    except (OSError, ValueError):  # ValueError: CorruptFileError
        cache = {}
    updated = dict(cache)
    for split, info in manifest["splits"].items():
        if splits is not None and split not in splits:
            continue
        for shard in info["shards"]:
            if "url" in shard:
                continue  # an indexed shard set, not ours: its stream's sha256 is checked as it is read
            unit = root / shard["name"]
            if not unit.exists():
                raise ShardIntegrityError(f"shard {shard['name']} listed in the manifest is missing from {root} "
                                          f"(written by the {stage} stage)")
            stamp = _stamp(unit)
            if cache.get(shard["name"]) == [*stamp, shard["sha256"]]:
                continue
            sha, size = unit_digest(unit)
            if sha != shard["sha256"]:
                if unit.is_dir() and size < shard.get("bytes", 0):  # e.g. an MDS shard folder lost a file
                    raise ShardIntegrityError(
                        f"shard {shard['name']} in {root} is missing files: {size} of the {shard['bytes']} bytes "
                        f"the manifest lists are there (written by the {stage} stage)")
                raise ShardIntegrityError(
                    f"shard {shard['name']} in {root} does not match the manifest (sha256 {sha[:12]}... != "
                    f"{shard['sha256'][:12]}...): it was modified or corrupted (written by the {stage} stage)")
            updated[shard["name"]] = [*stamp, sha]
    if updated != cache:
        try:
            atomic_write_json(cache_path, updated)
        except OSError:
            pass  # a read-only shard folder: verification simply is not cached


def remember_verified(root: Path, manifest: dict) -> None:
    """Seed the verification cache with shards whose writers just hashed them, so the first
    loader open only stats files; a later change to any shard changes its stamp and is hashed."""
    cache = {shard["name"]: [*_stamp(root / shard["name"]), shard["sha256"]]
             for info in manifest["splits"].values() for shard in info["shards"] if "url" not in shard}
    atomic_write_json(root / _VERIFY_CACHE_NAME, cache)


def _stamp(unit: Path) -> list[int]:
    files = [unit] if unit.is_file() else sorted(p for p in unit.rglob("*") if p.is_file())
    stats = [p.stat() for p in files]
    return [sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)]
