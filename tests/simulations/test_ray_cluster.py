"""``--ray-address``: the simulation runs on an existing Ray cluster. The test starts a real one on
loopback (``ray start --head`` and a second ``ray start --address`` worker node, each in its own
session, ``--block`` so that stopping the process stops its node), runs the census of two sites on
it through Flower's simulation engine, and stops both nodes, checking that no process of that
cluster is left (found by its GCS address and temp dir)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from simulations.census import run_census
from simulations.engine import BIN, free_port, stop_process_group, wait_for_port
from tests.helpers.flower import run_config, write_prepared_sites

pytestmark = pytest.mark.slow


def cluster_processes(marks: tuple[str, ...]) -> list[int]:
    """Pids of live processes whose command line holds one of ``marks`` (this cluster's address or temp dir)."""
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().split()[2]
        except OSError:
            continue
        if state != "Z" and any(m in cmd for m in marks):
            out.append(int(proc.name))
    return out


def ray_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.mark.timeout(600)
def test_simulation_on_an_existing_ray_cluster(tmp_path):
    data = write_prepared_sites(tmp_path / "data", 2, run_config(**{"model.image-size": 32}), seed_offset=5)
    port, temp = free_port(), Path(f"/tmp/hxr-{os.getpid()}")
    address = f"127.0.0.1:{port}"
    common = ["--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--temp-dir", str(temp), "--block"]
    procs = []
    try:
        with (tmp_path / "head.log").open("w") as fh:
            head = subprocess.Popen(
                [str(BIN / "ray"), "start", "--head", "--port", str(port), "--include-dashboard", "false", *common],
                env=ray_env(),
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        procs.append(head)
        wait_for_port(port, head, tmp_path / "head.log", seconds=120)
        with (tmp_path / "worker.log").open("w") as fh:
            worker = subprocess.Popen(
                [str(BIN / "ray"), "start", "--address", address, *common],
                env=ray_env(),
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        procs.append(worker)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            status = subprocess.run(
                [str(BIN / "ray"), "status", "--address", address], env=ray_env(), capture_output=True, text=True
            ).stdout
            if status.count("node_") >= 2:
                break
            time.sleep(2)
        assert status.count("node_") >= 2, status

        page = run_census(data, tmp_path / "out", extra={"model.image-size": 32}, ray_address=address, timeout=420)
        assert page.is_file() and "site-02" in page.read_text()
        drivers = list((temp / "session_latest" / "logs").glob("python-core-driver-*"))
        assert drivers, "no driver joined the cluster"  # Flower's simulation ran its actors on this cluster
    finally:
        for proc in reversed(procs):
            stop_process_group(proc)
        left = cluster_processes((address, str(temp)))
        for pid in left:  # clean up before failing
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
    assert not left, f"processes of the Ray cluster still running: {left}"
