"""How the CUDA codebook-search extension is compiled: the one definition that both builds use.

kernels/loader.py (just-in-time build on first CUDA use) imports it; setup.py (ahead-of-time build,
TESSERA_BUILD_CUDA=1) loads this file by path, before torch or the package can be imported, so it
must stay free of imports. Change a flag here and both builds change together (bit-identical
kernels whichever way they were built).
"""

# The module setup.py builds and loader.py imports first; the JIT build's name in the torch cache.
AOT_MODULE = "kernels._codebook_search_cuda"
JIT_NAME = "tessera_codebook_search"

# Sources relative to kernels/csrc (also the include directory). Distinct stems: setuptools names
# object files by stem, so a .cpp and a .cu sharing one would collide.
SOURCES = ("codebook_search.cpp", "codebook_search_kernels.cu")

# No --use_fast_math: it flushes denormals and relaxes division, and the search promises fp32
# results. -lineinfo costs nothing at run time and makes profiler output readable.
NVCC_FLAGS = ("-O3", "-lineinfo")
CXX_FLAGS = ("-O3",)
