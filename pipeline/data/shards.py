"""The shard plan and writing one shard unit (webdataset tar or MDS directory), resumably.

Plan: shard j of a split holds positions [j*k, (j+1)*k) of the split's fixed order, k fixed by
the config alone, so the plan (and every shard's bytes) is the same for any number of workers.
Workers take every W-th shard of the plan.

A unit is published in three steps: remove its sidecar, write the unit under a temp name and
rename it into place, then write its sidecar `<name>.json` (count, sha256, bytes, rejects).
A sidecar therefore exists only next to a complete unit; a killed writer leaves at worst a temp
file (removed on the next run) or a unit without a sidecar (rewritten on the next run).
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ..io import atomic_path, atomic_write_json, read_json, sha256_file, sha256_json
from .sources import LoadedImage, encode_image

IMAGE_EXTENSION = {"png": "png", "jpeg": "jpg"}
MDS_SIZE_LIMIT = 1 << 31  # MDSWriter stores offsets as uint32; one unit normally fits one .mds file
_SAMPLE_OVERHEAD_BYTES = 3 * 1024  # three tar headers + padding + the small json/cls members
_ARCHIVE_OVERHEAD_BYTES = tarfile.RECORDSIZE  # end-of-archive blocks + padding to a whole tar record


@dataclass(frozen=True)
class ShardSpec:
    split: str
    index: int
    start: int      # first position of the split's order held by this shard
    stop: int       # one past the last
    name: str       # path relative to the shard stage directory: train/train-000003.tar or .../train-000003

    @property
    def sidecar_name(self) -> str:
        return self.name + ".json"


def samples_per_shard(resolution: int, max_count: int, max_bytes: int) -> int:
    """Samples per shard from the count limit and a byte limit, using an upper bound per sample.

    Encoded sizes are only known after encoding, and a plan that depended on them would depend
    on which worker saw what; raw RGB plus headers bounds a PNG of these images from above, so
    shards stay under `max_bytes` while the plan stays a function of the config.
    """
    # PNG adds a filter byte per row and chunk headers to incompressible data.
    per_sample = resolution * resolution * 3 + resolution + 128 + _SAMPLE_OVERHEAD_BYTES
    return max(1, min(max_count, (max_bytes - _ARCHIVE_OVERHEAD_BYTES) // per_sample))


def plan_shards(split_sizes: dict[str, int], per_shard: int, fmt: str) -> list[ShardSpec]:
    suffix = ".tar" if fmt == "webdataset" else ""
    plan = []
    for split, size in split_sizes.items():
        for index, start in enumerate(range(0, size, per_shard)):
            plan.append(ShardSpec(split, index, start, min(size, start + per_shard), f"{split}/{split}-{index:06d}{suffix}"))
    return plan


def assigned_shards(plan: list[ShardSpec], worker: int, num_workers: int) -> list[ShardSpec]:
    return plan[worker::num_workers]


def unit_digest(path: Path) -> tuple[str, int]:
    """(sha256, bytes) of a tar file, or of an MDS unit directory (hash over its sorted files)."""
    if path.is_file():
        return sha256_file(path), path.stat().st_size
    files = sorted(p for p in path.rglob("*") if p.is_file())
    listing = [(p.relative_to(path).as_posix(), sha256_file(p)) for p in files]
    return sha256_json(listing), sum(p.stat().st_size for p in files)


def read_sidecar(stage_dir: Path, spec: ShardSpec, plan_id: str) -> dict | None:
    """The sidecar when it belongs to this plan and its unit exists with the recorded size."""
    path = stage_dir / spec.sidecar_name
    try:
        sidecar = read_json(path)
    except (OSError, json.JSONDecodeError):
        return None
    unit = stage_dir / spec.name
    if sidecar.get("plan") != plan_id or not unit.exists():
        return None
    size = unit.stat().st_size if unit.is_file() else sum(p.stat().st_size for p in unit.rglob("*") if p.is_file())
    return sidecar if size == sidecar.get("bytes") else None


def collect_sidecars(stage_dir: Path, plan: list[ShardSpec], plan_id: str) -> list[dict] | None:
    """Every unit's sidecar in plan order, or None while any unit is still missing."""
    sidecars = []
    for spec in plan:
        sidecar = read_sidecar(stage_dir, spec, plan_id)
        if sidecar is None:
            return None
        sidecars.append(sidecar)
    return sidecars


def verified_sidecar(stage_dir: Path, spec: ShardSpec, plan_id: str) -> dict | None:
    """Like read_sidecar, and the unit's content hash matches too (used before keeping a unit)."""
    sidecar = read_sidecar(stage_dir, spec, plan_id)
    if sidecar is None:
        return None
    sha, _ = unit_digest(stage_dir / spec.name)
    return sidecar if sha == sidecar.get("sha256") else None


def encode_loaded(img: LoadedImage, encoding: str) -> tuple[LoadedImage, bytes | None]:
    """(image without its pixels, encoded bytes), or (image, None) when it was rejected."""
    if img.pixels is None:
        return img, None
    return dataclasses.replace(img, pixels=None), encode_image(img.pixels, encoding)


def write_unit(stage_dir: Path, spec: ShardSpec, encoded: Iterable[tuple[LoadedImage, bytes | None]], *, fmt: str,
               encoding: str, plan_id: str) -> dict:
    """Write one shard unit from its encoded images in order (rejects skipped), then its sidecar."""
    unit = stage_dir / spec.name
    unit.parent.mkdir(parents=True, exist_ok=True)
    (stage_dir / spec.sidecar_name).unlink(missing_ok=True)
    remove_unit_temps(unit)
    rejected: list[dict] = []

    def accepted():
        for img, data in encoded:
            if data is None:
                rejected.append({"path": img.origin, "reason": img.reason})
            else:
                yield img, data

    writer = _write_tar if fmt == "webdataset" else _write_mds
    count = writer(unit, accepted(), IMAGE_EXTENSION[encoding])
    sha, size = unit_digest(unit)
    sidecar = {"name": spec.name, "split": spec.split, "index": spec.index, "start": spec.start, "stop": spec.stop,
               "count": count, "sha256": sha, "bytes": size, "plan": plan_id, "rejected": rejected}
    atomic_write_json(stage_dir / spec.sidecar_name, sidecar)
    return sidecar


def remove_unit_temps(unit: Path) -> None:
    """Temp files / dirs a killed writer of this unit left (only this unit's: others may be writing)."""
    if not unit.parent.is_dir():
        return
    for stale in unit.parent.glob(f".{unit.name}.*"):
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink(missing_ok=True)


def _sample_metadata(img: LoadedImage) -> bytes:
    return json.dumps({"label": img.label, "origin": img.origin}, sort_keys=True).encode("utf-8")


def _write_tar(path: Path, encoded: Iterable[tuple[LoadedImage, bytes]], image_ext: str) -> int:
    """A tar with fixed headers (mtime 0, uid/gid 0, no user names) and sorted members per key,
    so the same samples always give the same bytes; readable by webdataset."""
    count = 0
    with atomic_path(path) as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for img, image_bytes in encoded:
            count += 1
            members = {"cls": str(img.label).encode("ascii"), "json": _sample_metadata(img), image_ext: image_bytes}
            for ext in sorted(members):
                data = members[ext]
                info = tarfile.TarInfo(f"{img.key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o444
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
    return count


def _write_mds(unit: Path, encoded: Iterable[tuple[LoadedImage, bytes]], image_ext: str) -> int:
    columns = {"key": "str", "cls": "int", "origin": "str", image_ext: "bytes"}
    rows = ({"key": img.key, "cls": img.label, "origin": img.origin, image_ext: image_bytes}
            for img, image_bytes in encoded)
    return write_mds_dir(unit, columns, rows)


def write_mds_dir(unit: Path, columns: dict[str, str], rows: Iterable[dict]) -> int:
    """One MDS dataset directory per unit, written in a temp dir and renamed into place; returns the row count.

    Uncompressed and without per-shard hashes: the bytes are then a function of the rows alone
    (integrity is the sidecar's sha256 over the whole directory)."""
    from streaming import MDSWriter

    count = 0
    unit.parent.mkdir(parents=True, exist_ok=True)
    tmp_root = Path(tempfile.mkdtemp(prefix=f".{unit.name}.", suffix=".tmpdir", dir=unit.parent))
    try:
        staged = tmp_root / unit.name
        with MDSWriter(out=str(staged), columns=columns, compression=None, hashes=[], size_limit=MDS_SIZE_LIMIT,
                       progress_bar=False) as writer:
            for row in rows:
                count += 1
                writer.write(row)
        for file in staged.iterdir():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
        if unit.exists():  # an unverified unit from an earlier attempt
            shutil.rmtree(unit)
        os.replace(staged, unit)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    return count
