"""Fixtures of the clinic tests: one generated study (folders named like an MRN and an accession
number) and one tiny checkpoint with per-marker thresholds in its meta, shared by the package."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.clinic import tiny_checkpoint, write_study


@pytest.fixture(scope="package")
def clinic_study(tmp_path_factory) -> Path:
    return write_study(tmp_path_factory.mktemp("clinic") / "MRN-PID-77441" / "ACC99182736")


@pytest.fixture(scope="package")
def clinic_checkpoint(tmp_path_factory, clinic_study) -> Path:
    meta = {"method": "test", "thresholds": {"blend_sign": 0.25, "fluid_level": 0.75}}
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint.pt", clinic_study, meta)
