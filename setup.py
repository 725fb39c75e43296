"""The optional ahead-of-time CUDA build of the codebook-search kernels (TESSERA_BUILD_CUDA=1).

Everything else (name, version, dependencies, entry point, packages) is in pyproject.toml; setuptools
reads it there and this file only adds the extension:

    TESSERA_BUILD_CUDA=1 pip install --no-build-isolation -e .   # torch must be importable at build time
"""
import importlib.util
import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _build_flags():
    """kernels/build_flags.py, loaded by path: importing `kernels` would need torch, absent at build time."""
    path = os.path.join(HERE, "kernels", "build_flags.py")
    spec = importlib.util.spec_from_file_location("_tessera_build_flags", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ext_modules():
    """Ahead-of-time CUDA build of the codebook-search kernels when TESSERA_BUILD_CUDA=1.

    Sources and flags come from kernels/build_flags.py, which the JIT build (kernels/loader.py)
    uses too, so both builds compile the same kernels the same way.
    """
    if os.environ.get("TESSERA_BUILD_CUDA") != "1":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    flags = _build_flags()
    ext = CUDAExtension(
        name=flags.AOT_MODULE,
        sources=[os.path.join("kernels", "csrc", name) for name in flags.SOURCES],
        include_dirs=[os.path.join(HERE, "kernels", "csrc")],
        extra_compile_args={"cxx": list(flags.CXX_FLAGS), "nvcc": list(flags.NVCC_FLAGS)},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _ext_modules()

setup(ext_modules=ext_modules, cmdclass=cmdclass)
