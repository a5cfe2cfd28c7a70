"""One real Flower simulation: ``flwr run`` against a simulation SuperLink (Ray), 12 virtual sites.

This is the path a researcher takes (``flwr run .``), with the app's pyproject defaults and ``-c``
overrides, the FAB build and install, the SuperLink's subprocess isolation and the Ray backend.
The test starts its own SuperLink on free ports with its own ``FLWR_HOME`` and stops it (and
everything it started) at the end. Tiny preset, 32x32 images, one round per stage.
"""
from __future__ import annotations

import json
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from common.checkpoint import build_from_checkpoint, load_checkpoint
from common.records import model_from_run_config
from simulations.sites import prepare_caches
from tests.conftest import write_site
from tests.processes import BIN, flwr_env, free_port, stop_process_group, wait_for_port
from tests.server.fakes import REPO, run_config

N_SITES = 12


@contextmanager
def simulation_superlink(tmp: Path):
    """A simulation SuperLink on a free loopback port, and a Flower config naming it ``test``."""
    home = tmp / "flwr-home"
    home.mkdir()
    port = free_port()  # Flower 1.42 serves every SuperLink API over one HTTP port
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
    log = (tmp / "superlink.log").open("w")
    proc = subprocess.Popen(
        [str(BIN / "flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
         "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(port),
         "--database", str(tmp / "state.db")],
        env=flwr_env(home, RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0"), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_port(port, proc)
        yield home
    finally:
        stop_process_group(proc)
        log.close()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_flwr_run_twelve_sites(tmp_path):
    data = tmp_path / "data"
    for i in range(N_SITES):
        write_site(data / f"site-{i + 1:02d}", n_studies=4, shape=(3, 40, 40), seed=10 * i)
    overrides = {"data.root": str(data), "output.dir": str(tmp_path / "runs"), "output.name": "sim",
                 "model.image-size": 32, "rounds.stage1": 1, "rounds.stage2": 1, "train.local-steps": 1,
                 "train.batch-size": 4}
    prepare_caches(data, model_from_run_config(run_config(**overrides))[1], progress=False)
    toml_values = " ".join(f"{k}={json.dumps(v)}" for k, v in overrides.items())

    with simulation_superlink(tmp_path) as home:
        t0 = time.monotonic()
        done = subprocess.run(
            [str(BIN / "flwr"), "run", str(REPO), "test", "--stream", "--federation-config",
             f"num-supernodes={N_SITES} client-resources-num-cpus=1", "-c", toml_values],
            env=flwr_env(home, RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0"), cwd=tmp_path, capture_output=True, text=True, timeout=200)
        seconds = time.monotonic() - t0
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "run finished" in output, output[-4000:]

    out = tmp_path / "runs" / "sim"
    history = json.loads((out / "history.json").read_text())
    assert [r["stage"] for r in history["rounds"]] == [1, 2]
    for r in history["rounds"]:
        assert len(r["train"]["sites"]) == N_SITES and len(r["evaluate"]["sites"]) == N_SITES, r["failures"]
        assert r["failures"] == []
    assert history["rounds"][1]["label-counts"]["pos-weight"]
    build_from_checkpoint(load_checkpoint(out / "global.pt"))
    print(f"flwr run, {N_SITES} sites, 1 + 1 rounds: {seconds:.1f} s")
