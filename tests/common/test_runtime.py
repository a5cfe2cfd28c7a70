"""Thread sizing in one place (``common.runtime``): from the cores a process may use, an explicit
request or the share its starter gave it, never the machine's count; and the CPU clock the
simulation's per-method timings read."""

from __future__ import annotations

import os
import time

import pytest
import torch

from common import runtime
from common.runtime import THREADS_ENV, machine_cpu_seconds, quota_cores, torch_threads, usable_cores, use_torch_threads
from simulations.engine import SimulationEngine
from simulations.parallel import run_jobs


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_quota_cores_reads_cgroup_cpu_max():
    assert quota_cores("max 100000") is None
    assert quota_cores("200000 100000") == 2
    assert quota_cores("150000 100000") == 1  # whole cores: 1.5 cores cannot run 2 threads flat out
    assert quota_cores("50000 100000") == 1
    assert quota_cores("") is None


def test_usable_cores_follow_affinity_and_quota(tmp_path, monkeypatch):
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setattr(runtime, "CGROUP_CPU_MAX", tmp_path / "absent")
    assert usable_cores() == cores
    (tmp_path / "cpu.max").write_text("100000 100000\n")
    monkeypatch.setattr(runtime, "CGROUP_CPU_MAX", tmp_path / "cpu.max")
    assert usable_cores() == 1
    (tmp_path / "cpu.max").write_text(f"{(cores + 4) * 100000} 100000\n")
    assert usable_cores() == cores  # a quota above the affinity does not add cores


def test_threads_requested_then_starter_share_then_usable_cores(monkeypatch, restore_threads):
    monkeypatch.delenv(THREADS_ENV, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert torch_threads() == usable_cores()
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert torch_threads() == 3  # what a user sets for any OpenMP program
    monkeypatch.setenv(THREADS_ENV, "1")
    assert torch_threads() == 1 and torch_threads(3) == 3
    assert use_torch_threads() == 1 and torch.get_num_threads() == 1
    for bad in ("two", "0"):
        monkeypatch.setenv(THREADS_ENV, bad)
        with pytest.raises(ValueError, match=f"{THREADS_ENV}='{bad}'"):
            torch_threads()


def test_the_simulation_gives_each_site_process_its_share(tmp_path):
    env = SimulationEngine(tmp_path, cpus_per_site=1, total_cpus=2)._env()
    assert env[THREADS_ENV] == env["OMP_NUM_THREADS"] == "1"
    assert SimulationEngine(tmp_path).total_cpus == usable_cores()


def test_worker_processes_get_their_share_before_torch_loads():
    """Two spawned workers on this machine: each gets cores // 2 threads (at least 1)."""
    shares = run_jobs(os.getenv, [THREADS_ENV, "OMP_NUM_THREADS"], workers=2)
    expected = str(max(1, usable_cores() // 2))
    assert shares == [expected, expected]


def test_machine_cpu_seconds_count_busy_time():
    before = machine_cpu_seconds()
    t0 = time.process_time()
    while time.process_time() - t0 < 0.3:  # 0.3 s of this process's CPU time
        pass
    assert machine_cpu_seconds() - before >= 0.25
