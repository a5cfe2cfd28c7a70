"""Fixtures shared by the test packages; the data they write comes from ``tests.helpers.data``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.helpers.data import head_phantom, write_series


@pytest.fixture
def phantom() -> np.ndarray:
    return head_phantom()


@pytest.fixture
def write_dicom_series():
    return write_series


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A small generated multi-site dataset shared by the slow end-to-end tests (3 sites, 64 px)."""
    from simulations.synthetic import generate_dataset

    out = tmp_path_factory.mktemp("synthetic")
    generate_dataset(out, n_sites=3, seed=7, matrix=64, studies_scale=0.8, progress=False)
    return out


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread, and a second thread waiting on a busy core
    (a shared CI machine) makes small convolutions many times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
