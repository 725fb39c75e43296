"""Shared test helpers: the repository root, the `tessera` CLI in a subprocess (one process or
torchrun ranks), free ports, and the tiny configs every end-to-end test trains on.

Test modules import them with `from testkit import tessera, TINY_TOKENIZER` (tests/conftest.py puts
this folder on sys.path).
"""
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
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


def tokenizer_weights(run_dir) -> dict:
    """The tensors train_tokenizer exported in `run_dir`."""
    from safetensors.torch import load_file

    from pipeline.runner.artifacts import TOKENIZER_WEIGHTS

    return load_file(str(Path(run_dir) / "train_tokenizer" / TOKENIZER_WEIGHTS))


def prior_weights(run_dir) -> dict:
    """The tensors train_prior exported in `run_dir`."""
    from safetensors.torch import load_file

    from pipeline.runner.artifacts import PRIOR_WEIGHTS

    return load_file(str(Path(run_dir) / "train_prior" / PRIOR_WEIGHTS))


def assert_bitwise_equal(a: dict, b: dict) -> None:
    """Two state dicts with the same keys and bit-identical tensors (the first differing key is named)."""
    import torch

    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


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


# --- Signals at a known step ------------------------------------------------------------------
# The harness every kill/preemption test uses: the CLI runs in a subprocess whose trainer sends
# `signum` to its own process (or, with `group`, to its whole process group, as SLURM does) right
# after step `at_step` (on one rank, or on every rank), or with phase="eval" at the start of the
# evaluation at that step, so the signal lands at a known point instead of racing the run's end.
TRAINERS = {
    "train_tokenizer": ("pipeline.train.tokenizer_trainer", "TokenizerTrainer"),
    "train_prior": ("pipeline.train.prior_trainer", "PriorTrainer"),
}


def signal_after_step(stage: str, at_step: int, signum: int, rank: int | None = 0, *, group: bool = False,
                      phase: str = "step") -> None:
    """Patch `stage`'s trainer in this process: after step `at_step` (phase "step"), or as the
    evaluation at step `at_step` starts (phase "eval"), rank `rank` (every rank when None, as a
    node failure takes them all) sends `signum` to itself, or to its process group."""
    import importlib

    module_name, class_name = TRAINERS[stage]
    cls = getattr(importlib.import_module(module_name), class_name)
    method = {"step": "train_step", "eval": "evaluate"}[phase]
    original = getattr(cls, method)

    def send(self):
        if self.step == at_step and (rank is None or self.env.rank == rank):
            os.killpg(os.getpgid(0), signum) if group else os.kill(os.getpid(), signum)

    def after_step(self):
        logs = original(self)
        send(self)
        return logs

    def before_eval(self, *args, **kwargs):
        send(self)
        return original(self, *args, **kwargs)

    setattr(cls, method, after_step if phase == "step" else before_eval)


_SIGNALLED_CLI = """
import os, runpy, sys
sys.path[:0] = [os.environ["TESSERA_TESTS"], os.environ["TESSERA_REPO"]]
from testkit import signal_after_step
rank = os.environ["SIGNAL_RANK"]
signal_after_step(os.environ["SIGNAL_STAGE"], int(os.environ["SIGNAL_AT_STEP"]), int(os.environ["SIGNAL_NUM"]),
                  None if rank == "all" else int(rank), group=os.environ["SIGNAL_GROUP"] == "1",
                  phase=os.environ["SIGNAL_PHASE"])
runpy.run_module("pipeline.cli", run_name="__main__", alter_sys=True)
"""


def run_signalled(stage: str, at_step: int, signum: int, *cli_args, rank: int | None = 0, nproc: int = 1,
                  script_dir: Path, timeout: int = 600, group: bool = False,
                  phase: str = "step") -> subprocess.CompletedProcess:
    """Run `tessera CLI_ARGS` (under torchrun with `nproc` ranks) with `signal_after_step` planted;
    with `group` in a session of its own, whose whole process group gets the signal."""
    script = Path(script_dir) / "signalled_cli.py"
    script.write_text(_SIGNALLED_CLI)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TESSERA_TESTS": str(REPO / "tests"), "TESSERA_REPO": str(REPO),
           "SIGNAL_STAGE": stage, "SIGNAL_AT_STEP": str(at_step), "SIGNAL_NUM": str(int(signum)),
           "SIGNAL_RANK": "all" if rank is None else str(rank), "SIGNAL_GROUP": "1" if group else "0",
           "SIGNAL_PHASE": phase}
    launch = [sys.executable]
    if nproc > 1:
        launch += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port())]
    return subprocess.run([*launch, str(script), *cli_args], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, start_new_session=group)


def copy_until_prior(source, target) -> Path:
    """A new run directory `target` holding `source`'s shard, train_tokenizer and precompute_codes
    (without their locks): ready for train_prior."""
    target.mkdir(parents=True)
    for stage in ("shard", "train_tokenizer", "precompute_codes"):
        shutil.copytree(Path(source) / stage, target / stage, ignore=shutil.ignore_patterns("*.lock", "lock.json"))
    return target


# --- The test SLURM cluster (tests/slurm/local_cluster.sh) -----------------------------------
def require_slurm_cluster(nodes: tuple[str, ...] = ()) -> None:
    """Skip the calling test, saying why, unless the test cluster is up with `nodes` among its
    nodes; under `.ci/run` (TESSERA_REQUIRE_SLURM_CLUSTER set) fail instead: there it must be up."""
    import pytest

    script = REPO / "tests" / "slurm" / "local_cluster.sh"
    reason = None
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        reason = f"SLURM is not installed ({script} start installs it and starts a test cluster; needs root)"
    elif subprocess.run([str(script), "status"], capture_output=True, check=False).returncode:
        reason = f"the test cluster is not up ({script} start)"
    elif nodes:
        listed = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True, check=False)
        if not set(nodes) <= set(listed.stdout.split()):
            reason = f"the cluster lacks nodes {', '.join(nodes)} ({script} start makes them)"
    if reason and os.environ.get("TESSERA_REQUIRE_SLURM_CLUSTER"):
        pytest.fail(reason)
    if reason:
        pytest.skip(reason)


# --- Inside a DQ tokenizer's forward ---------------------------------------------------------
def trace_dq_forward(model, images_BCHW):
    """Run a DQ tokenizer's forward and record what its router chose and what its quantizer was
    handed: (record, aux) with record = {"fine_BHW": bool (B, H, W), True on the fine-grid cells of
    regions routed fine; "z": the latent (B, C, H, W) float64; "book": the codebook as the search
    saw it (the EMA step after the search moves it), float64; "w": the per-cell weights}."""
    record = {}
    route, quantize = model.route, model.quantizer.forward

    def traced_route(*args):
        gate_BHcWc2 = route(*args)
        fine_BHcWc = gate_BHcWc2[..., 1].detach() == 1
        record["fine_BHW"] = fine_BHcWc.repeat_interleave(2, 1).repeat_interleave(2, 2)
        return gate_BHcWc2

    def traced_quantize(z_BCHW, weight_BHW=None):
        record["z"], record["w"] = z_BCHW.detach().double(), weight_BHW
        record["book"] = model.quantizer.embed[0].double().clone()
        return quantize(z_BCHW, weight_BHW)

    model.route, model.quantizer.forward = traced_route, traced_quantize
    try:
        _, aux = model(images_BCHW)
    finally:
        del model.route, model.quantizer.forward  # back to the class's methods
    return record, aux


def run_tokenizer(run_dir, *extra, config="configs/demo-rq.yaml", **kw):
    """shard + train_tokenizer on the tiny tokenizer config (`extra`: more overrides)."""
    return tessera("run", config, "--run-dir", str(run_dir), "--stages", "shard,train_tokenizer", *TINY_TOKENIZER,
                   *extra, **kw)


def run_tokenizer_signalled(run_dir, at_step, sig, *extra, rank=0, nproc=1, config="configs/demo-rq.yaml"):
    """shard + train_tokenizer with `sig` sent by rank `rank` right after step `at_step`."""
    return run_signalled("train_tokenizer", at_step, sig, "run", config, "--run-dir", str(run_dir),
                         "--stages", "shard,train_tokenizer", *TINY_TOKENIZER, *extra, rank=rank, nproc=nproc,
                         script_dir=Path(run_dir).parent)
