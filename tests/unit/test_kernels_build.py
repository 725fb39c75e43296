"""Compile the CUDA codebook-search extension (no GPU needed): a broken kernel source fails CI.

The build runs once per test session into a temporary directory through the same code path users
get on first CUDA use (kernels.loader.build). Nothing is launched: CI has nvcc but no GPU.
The JIT build (kernels/loader.py) and the ahead-of-time build (setup.py, TESSERA_BUILD_CUDA=1) must
both take their sources and flags from kernels/build_flags.py: checked by capturing the arguments
they pass to torch.utils.cpp_extension (no compiler needed for that).
"""
import importlib.util
import os
import runpy
import shutil
import sys
import time
from pathlib import Path

import pytest

from kernels import build_flags, loader

REPO_ROOT = Path(__file__).resolve().parents[2]

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


def _capture(monkeypatch, name):
    """Replace torch.utils.cpp_extension.<name> by a recorder of its keyword arguments."""
    from torch.utils import cpp_extension

    calls = []

    def record(*args, **kwargs):
        calls.append(dict(kwargs, _args=args))
        return f"<{name} call {len(calls)}>"

    monkeypatch.setattr(cpp_extension, name, record)
    return calls


def test_jit_build_uses_the_shared_sources_and_flags(tmp_path, monkeypatch):
    calls = _capture(monkeypatch, "load")
    assert loader.build(tmp_path) == "<load call 1>"
    (kwargs,) = calls
    assert kwargs["name"] == build_flags.JIT_NAME
    assert [Path(s).name for s in kwargs["sources"]] == list(build_flags.SOURCES)
    assert all(Path(s).is_file() for s in kwargs["sources"])
    assert kwargs["extra_cflags"] == list(build_flags.CXX_FLAGS)
    assert kwargs["extra_cuda_cflags"] == list(build_flags.NVCC_FLAGS)
    assert kwargs["extra_include_paths"] == [str(REPO_ROOT / "kernels" / "csrc")]
    assert loader.AOT_MODULE == build_flags.AOT_MODULE


def _run_setup_py(monkeypatch, build_cuda: bool):
    """Execute setup.py with setuptools.setup replaced by a recorder; returns setup()'s kwargs."""
    import setuptools

    recorded = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: recorded.update(kwargs))
    if build_cuda:
        monkeypatch.setenv("TESSERA_BUILD_CUDA", "1")
    else:
        monkeypatch.delenv("TESSERA_BUILD_CUDA", raising=False)
    monkeypatch.chdir(REPO_ROOT)
    runpy.run_path(str(REPO_ROOT / "setup.py"), run_name="__main__")
    return recorded


def test_aot_build_in_setup_py_uses_the_shared_sources_and_flags(monkeypatch):
    extensions = _capture(monkeypatch, "CUDAExtension")
    _capture(monkeypatch, "BuildExtension")
    from torch.utils import cpp_extension

    recorded = _run_setup_py(monkeypatch, build_cuda=True)
    (kwargs,) = extensions
    assert recorded["ext_modules"] == ["<CUDAExtension call 1>"]
    assert recorded["cmdclass"] == {"build_ext": cpp_extension.BuildExtension}
    assert kwargs["name"] == build_flags.AOT_MODULE
    assert kwargs["sources"] == [os.path.join("kernels", "csrc", name) for name in build_flags.SOURCES]
    assert all((REPO_ROOT / s).is_file() for s in kwargs["sources"])
    assert kwargs["extra_compile_args"] == {"cxx": list(build_flags.CXX_FLAGS), "nvcc": list(build_flags.NVCC_FLAGS)}
    assert kwargs["include_dirs"] == [str(REPO_ROOT / "kernels" / "csrc")]


def test_setup_py_without_cuda_build_needs_no_torch(monkeypatch):
    # pip runs setup.py before torch is installed: neither setup.py nor build_flags.py may import it.
    monkeypatch.setitem(sys.modules, "torch", None)  # any `import torch` now raises ImportError
    recorded = _run_setup_py(monkeypatch, build_cuda=False)
    # Only the extension comes from setup.py: the metadata lives in pyproject.toml, nowhere else.
    assert recorded == {"ext_modules": [], "cmdclass": {}}
    spec = importlib.util.spec_from_file_location("_flags_check", REPO_ROOT / "kernels" / "build_flags.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.NVCC_FLAGS == build_flags.NVCC_FLAGS and "--use_fast_math" not in module.NVCC_FLAGS
