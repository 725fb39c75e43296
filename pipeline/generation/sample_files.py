"""Generated samples on disk: PNG tar chunks (webdataset layout) and the ADM evaluator's .npz.

    RUN_DIR/sample/chunks/chunk-NNNNNN.tar   {i:08d}.png + {i:08d}.cls per sample i (a unit of work)
    RUN_DIR/sample/samples.npz               arr_0 (N, H, W, 3) uint8, arr_1 (N,) int64 labels

Bytes are a function of the images alone: tar members carry no times, owners or modes that vary,
and PNGs are written with fixed settings, so a chunk written by any rank or task, in one go or
after a kill, is byte-identical. The .npz is streamed member by member (np.load reads it as the
ADM evaluator does), so packing 50k 256 px images never holds them all in memory.
"""
from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image

from ..runtime.io import atomic_path

PNG_COMPRESS_LEVEL = 6


def png_bytes(image_HWC: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image_HWC).save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
    tar.addfile(info, io.BytesIO(data))


def write_sample_chunk(path: Path, samples: Iterable[tuple[int, np.ndarray, int]]) -> int:
    """Write (index, image HWC uint8, label) rows as one tar, atomically; returns the row count."""
    count = 0
    with atomic_path(path) as tmp:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for index, image, label in samples:
                _add(tar, f"{index:08d}.png", png_bytes(image))
                _add(tar, f"{index:08d}.cls", str(int(label)).encode())
                count += 1
    return count


def read_sample_chunk(path: Path) -> Iterator[tuple[int, np.ndarray, int]]:
    """(index, image HWC uint8, label) in the chunk's order."""
    with tarfile.open(path, "r") as tar:
        members = tar.getmembers()
        for png, cls in zip(members[0::2], members[1::2]):
            index = int(png.name.split(".")[0])
            image = np.asarray(Image.open(io.BytesIO(tar.extractfile(png).read())).convert("RGB"))
            yield index, image, int(tar.extractfile(cls).read())


def read_chunk_labels(path: Path) -> list[int]:
    """The labels of a chunk in order, without decoding its images."""
    with tarfile.open(path, "r") as tar:
        return [int(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".cls")]


def _write_npy_member(zf: zipfile.ZipFile, name: str, shape: tuple, dtype: np.dtype, blocks: Iterable[np.ndarray]):
    """One .npy member of an .npz written block by block (rows along the first axis)."""
    with zf.open(name, "w", force_zip64=True) as f:
        np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                 "fortran_order": False, "shape": shape})
        rows = 0
        for block in blocks:
            block = np.ascontiguousarray(block, dtype=dtype)
            f.write(block.tobytes())
            rows += block.shape[0]
        if rows != shape[0]:
            raise ValueError(f"{name}: wrote {rows} rows, the header says {shape[0]}")


def pack_npz(path: Path, chunks: list[Path], num_samples: int, resolution: int) -> None:
    """The ADM evaluator's archive from the chunks (in order), atomically: arr_0 images, arr_1 labels."""
    def image_blocks():
        for chunk in chunks:
            yield np.stack([image for _, image, _ in read_sample_chunk(chunk)])

    def label_blocks():
        for chunk in chunks:
            yield np.asarray(read_chunk_labels(chunk), dtype=np.int64)

    with atomic_path(path) as tmp:
        # ZIP_STORED: the images are incompressible noise to deflate and np.load maps them faster.
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            _write_npy_member(zf, "arr_0.npy", (num_samples, resolution, resolution, 3), np.uint8, image_blocks())
            _write_npy_member(zf, "arr_1.npy", (num_samples,), np.int64, label_blocks())


def read_npz_header(path: Path, member: str = "arr_0") -> tuple[tuple, np.dtype]:
    """(shape, dtype) of one array of an .npz without reading its data."""
    with zipfile.ZipFile(path) as zf, zf.open(f"{member}.npy") as f:
        version = np.lib.format.read_magic(f)
        shape, _, dtype = np.lib.format._read_array_header(f, version)
        return shape, dtype


def iter_npz_images(path: Path, batch: int, member: str = "arr_0") -> Iterator[np.ndarray]:
    """(B, H, W, 3) uint8 blocks of an ADM-format archive's images, streamed from the zip member
    (an archive of 50k 256 px images is ~10 GB: never loaded whole)."""
    with zipfile.ZipFile(path) as zf, zf.open(f"{member}.npy") as f:
        version = np.lib.format.read_magic(f)
        shape, fortran, dtype = np.lib.format._read_array_header(f, version)
        if fortran or dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
            raise ValueError(f"{path}: {member} must be a C-order uint8 array (N, H, W, 3); it is {dtype} {shape}")
        row = int(np.prod(shape[1:]))
        for start in range(0, shape[0], batch):
            n = min(batch, shape[0] - start)
            # A bytearray, not bytes: the block is writable, so torch.from_numpy takes it as is.
            yield np.frombuffer(bytearray(f.read(n * row)), dtype=np.uint8).reshape(n, *shape[1:])
