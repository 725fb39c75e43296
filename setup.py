"""Tessera: autoregressive image generation over discrete tokens (RQ and DQ families)."""
import importlib.util
import os

from setuptools import find_packages, setup

CORE_REQUIREMENTS = [
    # torch/torchvision are pinned: these versions install from files on the project's machines.
    "torch==2.14.1",
    "torchvision==0.29.1",
    "deepspeed==0.19.8",
    "webdataset==1.0.2",
    "mosaicml-streaming==0.13.0",
    "torch-fidelity==0.4.0",
    "submitit==1.5.4",
    "tensorboard>=2.16",
    "tqdm>=4.66",
    "pyyaml>=6.0",
    "safetensors>=0.4",
    "einops>=0.8",
    "lpips==0.1.4",
    "numpy",
    "pillow",
]

EXTRAS = {
    "gpu": ["flash-attn>=2.6"],
    "dev": ["pytest>=8", "pytest-timeout>=2.3", "matplotlib>=3.8"],
}


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

setup(
    name="tessera",
    version="0.1.0",
    description="Autoregressive image generation over discrete tokens: RQ-VAE/RQ-Transformer and DQ-VAE/DQ-Transformer",
    python_requires=">=3.10",
    packages=find_packages(include=["pipeline", "pipeline.*", "stages", "stages.*", "launchers", "launchers.*", "kernels", "kernels.*"]),
    package_data={"kernels": ["csrc/*.cu", "csrc/*.cpp", "csrc/*.h", "csrc/*.cuh"]},
    include_package_data=True,
    install_requires=CORE_REQUIREMENTS,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["tessera=pipeline.cli.main:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
