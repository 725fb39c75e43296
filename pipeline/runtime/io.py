"""Atomic file writes and content hashing.

Every file another process or a later stage reads is written here: a temp file in the same
folder, fsync, then rename. A reader therefore sees either the old complete file or the new
complete file, never a prefix, even if the writer is killed mid-write.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import CorruptFileError


def _current_umask() -> int:
    mask = os.umask(0)  # the only portable way to read it: set and restore at once
    os.umask(mask)
    return mask


UMASK = _current_umask()  # read once at import: os.umask is process-wide and not thread-safe


def publish_mode(path: str | os.PathLike) -> None:
    """Give a temp file (mkstemp makes it 0600) the mode a plain open() would have, so teammates
    in the group can read shards, manifests, checkpoints and weights."""
    os.chmod(path, 0o666 & ~UMASK)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to `path`; on success fsync it and rename it onto `path`.

    Use it for writers that want a file name (tarfile, safetensors, MDS); on error the temp
    file is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        publish_mode(tmp)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as err:
        if err.filename is None:  # a failed write() names no file: say which one (e.g. a full disk)
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def json_bytes(obj: Any) -> bytes:
    """Canonical JSON (sorted keys, fixed indent): equal content gives equal bytes (and hashes)."""
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, json_bytes(obj))


def atomic_write_with(path: str | os.PathLike, write: Callable[[io.BufferedWriter], None]) -> None:
    """Open a temp file for binary writing, hand it to `write`, then publish atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)


def read_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file; a truncated or corrupt one raises CorruptFileError naming it."""
    with open(path, "r", encoding="utf-8") as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise CorruptFileError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}; "
                               f"{len(text)} bytes): it was truncated or corrupted. Restore it, or rerun the "
                               f"stage that wrote it with --force (it keeps the checkpoints and units that still "
                               f"match the config)") from None


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(obj: Any) -> str:
    """Hash of an object's canonical JSON form (used for config and input fingerprints)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


def _fsync_dir(folder: Path) -> None:
    # The rename is only durable once the directory entry is flushed too.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
