"""Image shard formats: the shard plan and writing one shard (webdataset tar or MDS directory).

Plan: shard j of a split holds positions [j*k, (j+1)*k) of the split's fixed order, k fixed by
the config alone, so the plan (and every shard's bytes) is the same for any number of workers.
Publishing a shard resumably (sidecar last, verified on rerun) is pipeline.runner.units' job.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Iterable

from ..runner.units import Unit
from ..runtime.io import atomic_path
from .images import LoadedImage, encode_image

IMAGE_EXTENSION = {"png": "png", "jpeg": "jpg"}
MDS_SIZE_LIMIT = 1 << 31  # MDSWriter stores offsets as uint32; one unit normally fits one .mds file
_SAMPLE_OVERHEAD_BYTES = 3 * 1024  # three tar headers + padding + the small json/cls members
_ARCHIVE_OVERHEAD_BYTES = tarfile.RECORDSIZE  # end-of-archive blocks + padding to a whole tar record


def samples_per_shard(resolution: int, max_count: int, max_bytes: int) -> int:
    """Samples per shard from the count limit and a byte limit, using an upper bound per sample.

    Encoded sizes are only known after encoding, and a plan that depended on them would depend
    on which worker saw what; raw RGB plus headers bounds a PNG of these images from above, so
    shards stay under `max_bytes` while the plan stays a function of the config.
    """
    # PNG adds a filter byte per row and chunk headers to incompressible data.
    per_sample = resolution * resolution * 3 + resolution + 128 + _SAMPLE_OVERHEAD_BYTES
    return max(1, min(max_count, (max_bytes - _ARCHIVE_OVERHEAD_BYTES) // per_sample))


def plan_shards(split_sizes: dict[str, int], per_shard: int, fmt: str) -> list[Unit]:
    suffix = ".tar" if fmt == "webdataset" else ""
    plan = []
    for split, size in split_sizes.items():
        for index, start in enumerate(range(0, size, per_shard)):
            plan.append(Unit(split, index, start, min(size, start + per_shard), f"{split}/{split}-{index:06d}{suffix}"))
    return plan


def encode_loaded(img: LoadedImage, encoding: str) -> tuple[LoadedImage, bytes | None]:
    """(image without its pixels, encoded bytes), or (image, None) when it was rejected."""
    if img.pixels is None:
        return img, None
    return dataclasses.replace(img, pixels=None), encode_image(img.pixels, encoding)


def write_shard(path: Path, encoded: Iterable[tuple[LoadedImage, bytes | None]], *, fmt: str,
                encoding: str) -> dict:
    """Write one shard from its encoded images in order (rejects skipped and listed); returns
    the sidecar fields {"count", "rejected"} (see pipeline.runner.units.publish_unit)."""
    rejected: list[dict] = []

    def accepted():
        for img, data in encoded:
            if data is None:
                rejected.append({"path": img.origin, "reason": img.reason})
            else:
                yield img, data

    writer = _write_tar if fmt == "webdataset" else _write_mds
    count = writer(path, accepted(), IMAGE_EXTENSION[encoding])
    return {"count": count, "rejected": rejected}


def _sample_metadata(img: LoadedImage) -> bytes:
    return json.dumps({"label": img.label, "origin": img.origin}, sort_keys=True).encode("utf-8")


def _write_tar(path: Path, encoded: Iterable[tuple[LoadedImage, bytes]], image_ext: str) -> int:
    """A tar written by webdataset's TarWriter with fixed headers (mtime 0, uid/gid 0, no user or
    group names, mode 0444, USTAR) and members sorted per key, so the same samples always give the
    same bytes."""
    from webdataset import TarWriter

    count = 0
    with atomic_path(path) as tmp, open(tmp, "wb") as stream, \
            TarWriter(stream, user="", group="", mode=0o444, mtime=0, encoder=False, format="USTAR_FORMAT") as tar:
        for img, image_bytes in encoded:
            count += 1
            tar.write({"__key__": img.key, "cls": str(img.label).encode("ascii"), "json": _sample_metadata(img),
                       image_ext: image_bytes})
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
    except OSError as err:
        if err.filename is None:  # a failed write() names no file: say which unit (e.g. a full disk)
            raise OSError(err.errno, err.strerror, str(unit)) from err
        raise
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    return count
