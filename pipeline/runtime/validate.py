"""Every file a user hands to tessera is read through here before anything uses it.

Sample archives and references (`tessera score`, `score.reference`), the authors' checkpoints and
config.yaml files (`tessera import`) and DeepSpeed JSON (`prior_train.deepspeed_config`) come
from outside the pipeline, so any of them may be the wrong file, truncated, of the wrong dtype or
layout, empty, or made for another resolution. Each check raises InputFileError: one line naming
the file (and the option it came from) and what is wrong, which the CLI prints without a
traceback (exit 2) and the stage runner writes to the stage's log. Stages check their user files
before they record an attempt (the runner's `check_inputs` hook), so a rejected file never blocks
the corrected rerun.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

from .errors import StageError

FEATURE_DIM = 2048  # Inception pool features: what FID statistics and reference features are made of


class InputFileError(StageError):
    """A user-supplied file that cannot be used; the message names the file and the problem."""


def _named(path: Path, what: str) -> str:
    return f"{what} {path}" if what else str(path)


def _existing(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"{_named(path, what)}: no such file" if not path.exists()
                             else f"{_named(path, what)}: not a regular file")
    return path


# ---- .npz archives (ADM format) ------------------------------------------------------------
def npz_arrays(path: str | Path, what: str) -> dict[str, tuple[tuple, np.dtype, bool]]:
    """name -> (shape, dtype, fortran_order) of every array of an .npz, read from the headers only."""
    path = _existing(path, what)
    arrays = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for name in zf.namelist():
                if not name.endswith(".npy"):
                    continue
                with zf.open(name) as f:
                    version = np.lib.format.read_magic(f)
                    shape, fortran, dtype = np.lib.format._read_array_header(f, version)
                arrays[name[:-len(".npy")]] = (tuple(shape), dtype, fortran)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        raise InputFileError(f"{_named(path, what)}: not a readable .npz archive ({type(err).__name__}: "
                             f"{str(err).strip() or 'truncated'})") from None
    if not arrays:
        raise InputFileError(f"{_named(path, what)}: an .npz archive with no arrays in it")
    return arrays


def check_image_array(path: Path, what: str, name: str, header: tuple, resolution: int | None = None) -> tuple:
    """An image array of an ADM archive: C-order uint8 (N, H, W, 3), N > 0, square, and (when given)
    `resolution` pixels on a side. Returns its shape."""
    shape, dtype, fortran = header
    where = f"{_named(path, what)}: {name}"
    if len(shape) != 4 or shape[-1] != 3:
        hint = " (channels first? the ADM format is N x H x W x 3)" if len(shape) == 4 and shape[1] == 3 else ""
        raise InputFileError(f"{where} has shape {shape}; images must be N x H x W x 3{hint}")
    if dtype != np.uint8:
        raise InputFileError(f"{where} is {dtype}; images must be uint8 in [0, 255] (scale and cast float images)")
    if fortran:
        raise InputFileError(f"{where} is stored in Fortran order; save it C-ordered (np.ascontiguousarray)")
    if shape[0] == 0:
        raise InputFileError(f"{where} holds no images (shape {shape})")
    if shape[1] != shape[2]:
        raise InputFileError(f"{where} images are {shape[2]}x{shape[1]}; square images are expected")
    if resolution is not None and shape[1] != resolution:
        raise InputFileError(f"{where} images are {shape[1]} px, the samples are {resolution} px: scores across "
                             f"resolutions are not comparable; use a reference made at {resolution} px")
    return shape


def check_sample_archive(path: str | Path, what: str = "samples") -> tuple:
    """An ADM-format sample archive: arr_0 images (see check_image_array) and, when present, arr_1
    labels, one integer per image. Returns the images' shape."""
    path = Path(path)
    arrays = npz_arrays(path, what)
    if "arr_0" not in arrays:
        raise InputFileError(f"{_named(path, what)}: no arr_0 images (it holds {', '.join(sorted(arrays))}); "
                             f"the ADM format is arr_0 uint8 N x H x W x 3 [+ arr_1 labels]")
    shape = check_image_array(path, what, "arr_0", arrays["arr_0"])
    if "arr_1" in arrays:
        lshape, ldtype, _ = arrays["arr_1"]
        if lshape != (shape[0],) or ldtype.kind not in "iu":
            raise InputFileError(f"{_named(path, what)}: arr_1 is {ldtype} {lshape}; labels must be integers, "
                                 f"one per image ({shape[0]},)")
    return shape


def check_reference_archive(path: str | Path, what: str = "reference", resolution: int | None = None) -> set[str]:
    """A reference .npz: FID statistics mu (2048,) and sigma (2048, 2048), and/or arr_0 images (at
    the samples' `resolution`), optionally features (N, 2048). Returns the names of its arrays."""
    path = Path(path)
    arrays = npz_arrays(path, what)
    has_stats = {"mu", "sigma"} <= set(arrays)
    if not has_stats and "arr_0" not in arrays:
        raise InputFileError(f"{_named(path, what)}: has neither mu/sigma statistics nor arr_0 images (it holds "
                             f"{', '.join(sorted(arrays))})")
    expected = {"mu": (FEATURE_DIM,), "sigma": (FEATURE_DIM, FEATURE_DIM)}
    for name, want in expected.items():
        if name in arrays:
            shape, dtype, _ = arrays[name]
            if shape != want or dtype.kind != "f":
                raise InputFileError(f"{_named(path, what)}: {name} is {dtype} {shape}; Inception statistics are "
                                     f"floating point {want}")
    if "features" in arrays:
        shape, dtype, _ = arrays["features"]
        if len(shape) != 2 or shape[1] != FEATURE_DIM or shape[0] == 0 or dtype.kind != "f":
            raise InputFileError(f"{_named(path, what)}: features is {dtype} {shape}; expected floating point "
                                 f"(N, {FEATURE_DIM}) with N > 0")
    if "arr_0" in arrays:
        check_image_array(path, what, "arr_0", arrays["arr_0"], resolution)
    return set(arrays)


# ---- configs and checkpoints ---------------------------------------------------------------
def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _read_mapping(path: str | Path, what: str, kind: str, parse, parse_errors) -> dict:
    """A text file in `kind` (YAML, JSON) whose top level is a mapping."""
    path = _existing(path, what)
    try:
        tree = parse(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise InputFileError(f"{_named(path, what)}: not a text file (a checkpoint where {kind} belongs?)") from None
    except parse_errors as err:
        raise InputFileError(f"{_named(path, what)}: not valid {kind} ({_first_line(err)})") from None
    if not isinstance(tree, dict):
        found = "an empty file" if tree is None else f"a {type(tree).__name__}"
        raise InputFileError(f"{_named(path, what)}: expected a {kind} mapping of keys to values, found {found}")
    return tree


def read_yaml_mapping(path: str | Path, what: str) -> dict:
    import yaml

    return _read_mapping(path, what, "YAML", yaml.safe_load, yaml.YAMLError)


def read_json_mapping(path: str | Path, what: str) -> dict:
    return _read_mapping(path, what, "JSON", json.loads, json.JSONDecodeError)


def load_tensor_checkpoint(path: str | Path, what: str) -> dict:
    """A torch checkpoint of tensors, containers and primitives only (weights_only=True), holding a dict."""
    import torch

    path = _existing(path, what)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickle, zip and EOF errors all mean: not a usable checkpoint
        raise InputFileError(f"{_named(path, what)}: not a readable tensors-only torch checkpoint "
                             f"(torch.load weights_only=True: {_first_line(err)[:200]})") from None
    if not isinstance(ckpt, dict):
        raise InputFileError(f"{_named(path, what)}: holds a {type(ckpt).__name__}, not a dict of state dicts")
    return ckpt
