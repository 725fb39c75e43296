"""Shared test helpers: the repository root, the `tessera` CLI in a subprocess (one process or
torchrun ranks), free ports, and the tiny configs every end-to-end test trains on.

Test modules import them with `from conftest import tessera, TINY_TOKENIZER` (pytest puts this
folder on sys.path).
"""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# Keep torch's thread pool small: CI has 2 cores and several tests start 2 processes.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# A tokenizer that trains in seconds: 16 px images, 8x8x4 RQ codes from a 2-level, 8-channel net.
TINY_TOKENIZER = [
    "data.resolution=16", "data.num_train=64", "data.num_val=16", "data.shard_max_count=32",
    "tokenizer.ch=8", "tokenizer.ch_mult=[1,2]", "tokenizer.patch_size=1", "tokenizer.z_channels=8",
    "tokenizer.codebook_size=32",
    "tokenizer_train.batch_size=8", "tokenizer_train.eval_images=16", "tokenizer_train.warmup_steps=2",
    "tokenizer_train.eval_classifier=false",  # the demo configs' probe classifier: tested where it is enabled
    "tokenizer_train.rfid_images=0",  # rFID (Inception on every reconstruction): tested in test_sample_score.py
]


def free_port() -> int:
    """A TCP port nobody listens on now (for torchrun's / gloo's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tessera_command(*args, nproc: int = 1) -> list[str]:
    """`python -m pipeline.cli ARGS`, under torchrun with `nproc` ranks when nproc > 1."""
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
                str(free_port()), "-m", "pipeline.cli", *args]
    return [sys.executable, "-m", "pipeline.cli", *args]


def tessera(*args, nproc: int = 1, check: bool = True, env_extra: dict | None = None, timeout: int = 600, **popen):
    """Run the CLI to completion (CompletedProcess; AssertionError with its output when `check` and it
    failed), or start it and return the Popen when Popen keywords (stdout=..., ...) are given."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    cmd = tessera_command(*args, nproc=nproc)
    if popen:
        return subprocess.Popen(cmd, env=env, cwd=REPO, **popen)
    out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out


@pytest.fixture
def repo_root() -> Path:
    return REPO
