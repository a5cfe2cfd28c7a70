"""``simulations.sites.prepare_caches``: the same caches whether sites are built in one process or in
several, with one pseudonym key."""

from __future__ import annotations

import json

import numpy as np

from client.data.cache import SECRET_FILE
from common.config import PreprocessConfig
from simulations.sites import prepare_caches
from tests.helpers.data import write_site


def test_parallel_cache_build_equals_the_serial_one(tmp_path):
    root = tmp_path / "data"
    for i in range(3):
        write_site(root / f"site-0{i + 1}", n_studies=2, shape=(3, 40, 40), seed=i)
    cfg = PreprocessConfig(size=32)
    serial, _ = prepare_caches(root, cfg, tmp_path / "serial", progress=False, workers=1)
    (tmp_path / "parallel").mkdir()
    (tmp_path / "parallel" / SECRET_FILE).write_text((tmp_path / "serial" / SECRET_FILE).read_text())
    parallel, _ = prepare_caches(root, cfg, tmp_path / "parallel", progress=False, workers=2)
    assert list(parallel) == list(serial) == ["site-01", "site-02", "site-03"]
    for name in serial:
        a, b = serial[name], parallel[name]
        assert not a.hit and not b.hit
        assert json.loads((a.path / "index.json").read_text()) == json.loads((b.path / "index.json").read_text())
        assert np.array_equal(a.images, b.images) and np.array_equal(a.slice_labels, b.slice_labels, equal_nan=True)
    again, _ = prepare_caches(root, cfg, tmp_path / "parallel", progress=False, workers=2)
    assert all(c.hit for c in again.values())
