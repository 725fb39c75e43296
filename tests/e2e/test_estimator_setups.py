"""Every memory setup `tessera estimate` prints or recommends starts and trains: ZeRO 0-3 x offload
(none / optimizer / optimizer+params) x activation checkpointing, two steps each on 2 CPU ranks,
with the authors' AdamW decay groups (DeepSpeedCPUAdam under offload), exported as train_prior does."""
import json
import math
import subprocess
import sys

import pytest
from testkit import REPO, free_port

from pipeline.cli.estimate import memory_setups

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def setups(tmp_path_factory):
    out = tmp_path_factory.mktemp("setups") / "rows.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(REPO / "tests/e2e/estimator_setups_ranks.py"), str(out)]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_every_estimator_row_trains_two_steps(setups):
    expected = [(stage, offload, ckpt) for stage, offload in memory_setups() for ckpt in (False, True)]
    assert [(r["zero_stage"], r["offload"], r["checkpointing"]) for r in setups] == expected
    assert len(expected) == 16
    for row in setups:
        name = f"ZeRO-{row['zero_stage']} offload={row['offload']} ckpt={row['checkpointing']}"
        assert all(math.isfinite(x) for x in row["losses"]), name
        # Every parameter moved, and the export holds every weight and buffer at its full shape.
        assert row["changed"] == row["parameters"], name
        assert row["exported_keys"] == row["state_keys"], name
        assert row["shapes_match"], name
        assert row["group_decays"] == [pytest.approx(1e-4), 0.0], name  # decay on Linear weights only
        assert row["optimizer"] == ("AdamW" if row["offload"] == "none" else "DeepSpeedCPUAdam"), name


def test_offload_takes_the_same_steps_as_without(setups):
    """DeepSpeedCPUAdam in AdamW mode on the offloaded partitions = torch AdamW on the device (to
    float rounding): the second step's loss, after one update, agrees with ZeRO-0's."""
    reference = setups[0]["losses"]
    for row in setups:
        assert row["losses"][0] == reference[0]
        assert row["losses"][1] == pytest.approx(reference[1], abs=1e-5), row
