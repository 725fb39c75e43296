"""Finds or builds the CUDA codebook-search extension.

Order: the ahead-of-time module `kernels._codebook_search_cuda` (built by setup.py with
TESSERA_BUILD_CUDA=1) if importable, else a just-in-time build of kernels/csrc with
torch.utils.cpp_extension.load into a cache directory. A failed build raises KernelBuildError that
names the log file; the failure is remembered so later calls fail fast instead of recompiling.
Nothing here is imported on the CPU path, so a broken toolchain never affects CPU users.
"""
from __future__ import annotations

import importlib
import os
import threading
import traceback
from pathlib import Path

from . import build_flags

# Names, sources and compiler flags are shared with setup.py's ahead-of-time build (build_flags.py).
AOT_MODULE = build_flags.AOT_MODULE
JIT_NAME = build_flags.JIT_NAME
CSRC_DIR = Path(__file__).resolve().parent / "csrc"
SOURCES = tuple(CSRC_DIR / name for name in build_flags.SOURCES)

_lock = threading.Lock()
_module = None
_failure: Exception | None = None


class KernelBuildError(RuntimeError):
    """The CUDA extension could not be built or loaded; `log_path` holds the compiler output."""

    def __init__(self, message: str, log_path: Path | None):
        super().__init__(message)
        self.log_path = log_path


def cache_dir() -> Path:
    """TESSERA_KERNELS_CACHE, else $TORCH_EXTENSIONS_DIR/tessera, else ~/.cache/tessera/kernels."""
    if os.environ.get("TESSERA_KERNELS_CACHE"):
        return Path(os.environ["TESSERA_KERNELS_CACHE"])
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "tessera"
    return Path.home() / ".cache" / "tessera" / "kernels"


def _usable_cuda_home(path) -> bool:
    return (bool(path) and (Path(path) / "include" / "cuda_runtime.h").is_file()
            and (Path(path) / "bin" / "nvcc").is_file())


def resolve_cuda_home(torch_guess: str | None) -> str | None:
    """$CUDA_HOME / $CUDA_PATH read now, else torch's guess, else /usr/local/cuda: the first that
    holds both nvcc and the runtime headers.

    torch caches its guess when cpp_extension is first imported (an env var set later is
    ignored) and derives it from the directory of `nvcc` on PATH, which is wrong when that
    nvcc is a wrapper script (e.g. /usr/local/bin/nvcc -> guess /usr/local, no headers there).
    """
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), torch_guess, "/usr/local/cuda"):
        if _usable_cuda_home(candidate):
            return str(candidate)
    return torch_guess


def build(build_dir: str | os.PathLike | None = None, verbose: bool = False):
    """JIT-compile kernels/csrc into `build_dir` (default: cache_dir()) and import it.

    torch's loader hashes sources and flags, so an unchanged build is reused. Raises
    KernelBuildError with the compiler output written to <build_dir>/build.log.
    """
    from torch.utils import cpp_extension

    build_path = Path(build_dir) if build_dir is not None else cache_dir()
    build_path.mkdir(parents=True, exist_ok=True)
    log_path = build_path / "build.log"
    cpp_extension.CUDA_HOME = resolve_cuda_home(cpp_extension.CUDA_HOME)
    try:
        return cpp_extension.load(
            name=JIT_NAME,
            sources=[str(s) for s in SOURCES],
            extra_include_paths=[str(CSRC_DIR)],
            extra_cflags=list(build_flags.CXX_FLAGS),
            extra_cuda_cflags=list(build_flags.NVCC_FLAGS),
            build_directory=str(build_path),
            with_cuda=True,
            verbose=verbose,
        )
    except Exception as exc:  # torch raises RuntimeError/OSError/ImportError with the compiler output
        log_path.write_text(f"{exc}\n\n{traceback.format_exc()}")
        raise KernelBuildError(
            f"building the CUDA codebook-search extension failed ({type(exc).__name__}); "
            f"compiler log: {log_path}. The CPU path (tensors on CPU) is unaffected.",
            log_path,
        ) from exc


def get_cuda_extension():
    """The loaded extension module (AOT if installed, else JIT-built once per process)."""
    global _module, _failure
    if _module is not None:
        return _module
    with _lock:
        if _module is not None:
            return _module
        if _failure is not None:
            raise _failure
        try:
            _module = importlib.import_module(AOT_MODULE)
            return _module
        except ImportError:
            pass
        try:
            _module = build()
        except KernelBuildError as exc:
            _failure = exc
            raise
        return _module


def reset() -> None:
    """Forget a loaded module or remembered failure (tests; after fixing a toolchain)."""
    global _module, _failure
    with _lock:
        _module = None
        _failure = None
