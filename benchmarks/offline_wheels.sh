#!/usr/bin/env bash
# Wheels for running Tessera (and benchmarks/gpu_suite.sh) on an offline machine whose Python already
# has torch, numpy, PIL, yaml, einops, tqdm, tensorboard and scipy (a GPU image with its own torch build)
# but not the rest of Tessera's runtime: DeepSpeed, webdataset, mosaicml-streaming (with the modules it
# imports when loaded), torch-fidelity, submitit. Versions are those of this checkout's environment
# (make install: constraints.txt), built for the target machine's Python.
#
# Usage: benchmarks/offline_wheels.sh OUT_DIR [PY_VERSION (default 3.12)]
# There: pip install --no-index --no-deps --target /tmp/site OUT_DIR/*.whl && export PYTHONPATH=/tmp/site
#
# Binary wheels come from the package index for manylinux x86_64; the two packages with no such wheel
# are built here: deepspeed (pure Python, with this environment's torch) and zstd (with a local
# python<PY_VERSION>, e.g. from pyenv, since it compiles a C extension).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT_DIR=${1:?usage: benchmarks/offline_wheels.sh OUT_DIR [PY_VERSION]}
PY_VERSION=${2:-3.12}
PYTHON=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT_DIR"

# What a six-stage run and the GPU suite import beyond such an image (found by recording
# sys.modules during both), as distribution names.
BINARY=(hjson pydantic pydantic-core annotated-types typing-inspection webdataset braceexpand
        mosaicml-streaming torch-fidelity submitit boto3 botocore s3transfer jmespath brotli catalogue
        python-snappy cramjam cryptography cffi pycparser pyopenssl bcrypt)
BUILT=(deepspeed zstd)

version() { "$PYTHON" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }

PLATFORMS=()
for n in 17 24 26 27 28 31 34; do PLATFORMS+=(--platform "manylinux_2_${n}_x86_64"); done
PLATFORMS+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for dist in "${BINARY[@]}"; do
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
        --implementation cp "${PLATFORMS[@]}" -d "$OUT_DIR" "$dist==$(version "$dist")"
done
DS_BUILD_OPS=0 "$PYTHON" -m pip wheel --quiet --no-deps --no-build-isolation -w "$OUT_DIR" \
    "deepspeed==$(version deepspeed)"
TARGET_PY=""
for candidate in "python$PY_VERSION" "$HOME"/.pyenv/versions/"$PY_VERSION"*/bin/python; do
    if "$candidate" -c "" >/dev/null 2>&1; then TARGET_PY=$candidate; break; fi  # a pyenv shim may not run
done
if [ -z "$TARGET_PY" ]; then
    echo "offline_wheels.sh: no python$PY_VERSION here to build zstd's wheel with; build it on a machine that has one" >&2
    exit 1
fi
"$TARGET_PY" -m pip wheel --quiet --no-deps -w "$OUT_DIR" "zstd==$(version zstd)"
ls "$OUT_DIR"
du -sh "$OUT_DIR"
