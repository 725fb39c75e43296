"""DataLoader workers are capped by the cores this rank may use (affinity, ranks per node, SLURM)."""
import os

from pipeline.runtime.cpus import capped_workers, usable_cpus


def test_usable_cpus_follows_affinity_ranks_per_node_and_slurm(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert usable_cpus({}) == 16
    assert usable_cpus({"LOCAL_WORLD_SIZE": "4"}) == 4
    assert usable_cpus({"SLURM_CPUS_PER_TASK": "2"}) == 2
    assert usable_cpus({"LOCAL_WORLD_SIZE": "32"}) == 1  # never 0


def test_workers_leave_the_main_process_a_core(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert capped_workers(8, environ={}) == 1 and capped_workers(0, environ={}) == 0
    assert capped_workers(8, environ={"LOCAL_WORLD_SIZE": "2"}) == 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert capped_workers(8, environ={"SLURM_CPUS_PER_TASK": "8"}) == 7
    assert capped_workers(8, environ={}) == 8
