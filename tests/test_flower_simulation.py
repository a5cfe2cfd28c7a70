"""Real Flower simulations: ``flwr run`` against a simulation SuperLink (Ray), 12 virtual sites, and 3 of
which one injects a manifest fault through the staged simulation ClientApp (``client.simulation.app``).

This is the path a researcher takes (``flwr run .``), with the app's pyproject defaults and ``-c``
overrides, the FAB build and install, the SuperLink's subprocess isolation and the Ray backend.
The test starts its own SuperLink on a free port with its own ``FLWR_HOME`` (``simulations.engine``,
what ``simulate.py`` uses) and stops it, and everything it started, at the end. Tiny preset, 32x32 images, one round per stage.
"""

from __future__ import annotations

import json
import time

import pytest

from client.data.cache import build_site_cache
from client.simulation.partitions import Partition, write_partitions
from common.checkpoint import build_from_checkpoint, load_checkpoint
from common.run_config import model_from_run_config
from simulations.engine import SimulationEngine
from simulations.sites import prepare_caches
from tests.helpers.data import write_site
from tests.helpers.flower import run_config

N_SITES = 12


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_flwr_run_twelve_sites(tmp_path):
    data = tmp_path / "data"
    for i in range(N_SITES):
        write_site(data / f"site-{i + 1:02d}", n_studies=4, shape=(3, 40, 40), seed=10 * i)
    overrides = {
        "data.root": str(data),
        "output.dir": str(tmp_path / "runs"),
        "output.name": "sim",
        "model.image-size": 32,
        "rounds.stage1": 1,
        "rounds.stage2": 1,
        "train.local-steps": 1,
        "train.batch-size": 4,
    }
    prepare_caches(data, model_from_run_config(run_config(**overrides))[1], progress=False)

    with SimulationEngine(tmp_path / "engine") as engine:  # its own SuperLink on a free port, stopped after
        t0 = time.monotonic()
        engine.run(overrides, N_SITES, tmp_path / "flwr-run.log", timeout=200)  # raises unless "run finished"
        seconds = time.monotonic() - t0

    out = tmp_path / "runs" / "sim"
    history = json.loads((out / "history.json").read_text())
    assert [r["stage"] for r in history["rounds"]] == [1, 2]
    for r in history["rounds"]:
        assert len(r["train"]["sites"]) == N_SITES and len(r["evaluate"]["sites"]) == N_SITES, r["failures"]
        assert r["failures"] == []
    assert history["rounds"][1]["label-counts"]["pos-weight"]
    build_from_checkpoint(load_checkpoint(out / "global.pt"))
    print(f"flwr run, {N_SITES} sites, 1 + 1 rounds: {seconds:.1f} s")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_flwr_run_injects_a_manifest_fault_through_the_staged_simulation_app(tmp_path):
    """The engine stages ``client.simulation.app:app`` as the clientapp: a virtual site whose manifest entry
    sends NaN is rejected by the server every round, and the other two are aggregated."""
    overrides = {
        "output.dir": str(tmp_path / "runs"),
        "output.name": "faulty",
        "model.image-size": 32,
        "rounds.stage1": 1,
        "rounds.stage2": 0,
        "train.local-steps": 1,
        "train.batch-size": 4,
        "strategy.fraction-evaluate": 0.0,
    }
    preprocess = model_from_run_config(run_config(**overrides))[1]
    parts = []
    for i, fault in enumerate([{}, {"kind": "nan"}, {}]):
        data = write_site(tmp_path / "data" / f"site-{i + 1:02d}", n_studies=3, shape=(3, 40, 40), seed=10 * i)
        cache, _ = build_site_cache(data, tmp_path / "cache", preprocess)
        parts.append(Partition(f"site-{i + 1:02d}", str(cache.path), fault))
    overrides["data.partitions"] = str(write_partitions(tmp_path / "parts.json", parts))
    with SimulationEngine(tmp_path / "engine") as engine:
        engine.run(overrides, len(parts), tmp_path / "flwr-run.log", timeout=200)
    (entry,) = json.loads((tmp_path / "runs" / "faulty" / "history.json").read_text())["rounds"]
    assert [(r["site"], r["rule"]) for r in entry["rejected"]] == [("site-02", "array-non-finite")]
    assert sorted(entry["train"]["sites"]) == ["site-01", "site-03"] and entry["failures"] == []
