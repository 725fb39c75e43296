"""Compile the CUDA codebook-search extension (no GPU needed): a broken kernel source fails CI.

The build runs once per test session into a temporary directory through the same code path users
get on first CUDA use (kernels.loader.build). Nothing is launched: CI has nvcc but no GPU.
"""
import os
import shutil
import time
from pathlib import Path

import pytest

from kernels import loader

DEFAULT_CUDA_HOME = "/usr/local/cuda-13.0"


def _find_nvcc():
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [Path(cuda_home) / "bin" / "nvcc"] if cuda_home else []
    candidates.append(Path(DEFAULT_CUDA_HOME) / "bin" / "nvcc")
    for path in candidates:
        if path.is_file():
            return path
    found = shutil.which("nvcc")
    return Path(found) if found else None


@pytest.fixture(scope="session")
def built_extension(tmp_path_factory):
    nvcc = _find_nvcc()
    if nvcc is None:
        pytest.skip(f"nvcc not found (checked $CUDA_HOME/bin, {DEFAULT_CUDA_HOME}/bin and PATH): cannot compile")
    # Without an arch list torch's builder asks the (absent) GPU for one and fails.
    overrides = {"CUDA_HOME": str(nvcc.parent.parent), "TORCH_CUDA_ARCH_LIST": "9.0"}
    saved = {key: os.environ.get(key) for key in overrides}
    for key, value in overrides.items():
        os.environ.setdefault(key, value)
    build_dir = tmp_path_factory.mktemp("codebook_search_build")
    start = time.perf_counter()
    try:
        module = loader.build(build_dir)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
    return module, build_dir, time.perf_counter() - start


def test_extension_compiles_and_exposes_ops(built_extension):
    module, build_dir, seconds = built_extension
    for name in ("nearest_code", "residual_quantize", "residual_fits", "soft_codes"):
        assert callable(getattr(module, name)), name
    assert list(build_dir.glob("*.so")), "no shared object produced"
    print(f"codebook_search CUDA extension built in {seconds:.1f} s")


def test_cuda_home_resolution_skips_a_wrapper_directory(tmp_path, monkeypatch):
    # torch guesses CUDA_HOME from `which nvcc`; a wrapper script there gives a tree without headers.
    fake = tmp_path / "cuda"
    (fake / "include").mkdir(parents=True)
    (fake / "bin").mkdir()
    (fake / "include" / "cuda_runtime.h").write_text("")
    (fake / "bin" / "nvcc").write_text("")
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("CUDA_HOME", str(fake))
    assert loader.resolve_cuda_home("/usr/local") == str(fake)
    monkeypatch.delenv("CUDA_HOME")
    assert loader.resolve_cuda_home(str(fake)) == str(fake)


def test_build_sources_are_the_ones_setup_py_compiles(built_extension):
    # setup.py's AOT CUDAExtension lists these two files: keep JIT and AOT builds identical.
    names = sorted(p.name for p in loader.SOURCES)
    assert names == ["codebook_search.cpp", "codebook_search_kernels.cu"]
    setup_text = (Path(__file__).resolve().parents[1] / "setup.py").read_text()
    assert "kernels._codebook_search_cuda" in setup_text
    assert all(name in setup_text for name in names)
