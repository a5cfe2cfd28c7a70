"""The types every site layout yields: a study's reference and the study read whole.

Each layout (``client.ingest.layouts``) finds :class:`StudyRef` s in its own folder structure and
reads each into a :class:`StudyRecord`; everything downstream (check, cache) sees only these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from client.ingest.dicom import Geometry, Problem
from client.ingest.labels import StudyKey
from common.config import LABELS

MASK_SUFFIXES = (".nii.gz", ".nii")


@dataclass(frozen=True)
class StudyRef:
    patient_id: str
    study_id: str
    dicom_dir: Path  # the study's DICOM folder; for a CT-ICH site, its ct_scans/NNN.nii volume
    mask_path: Path | None

    @property
    def key(self) -> StudyKey:
        return (self.patient_id, self.study_id)


@dataclass
class StudyRecord:
    """One study after reading: the arrays when usable, and every problem met on the way."""

    ref: StudyRef
    problems: list[Problem] = field(default_factory=list)
    volume: np.ndarray | None = None
    geometry: Geometry | None = None
    mask: np.ndarray | None = None
    labels: np.ndarray | None = None  # float32 in LABELS order, NaN = not annotated
    extras: dict[str, str] = field(default_factory=dict)

    @property
    def usable(self) -> bool:
        return self.volume is not None


def strip_mask_suffix(name: str) -> str:
    """``S001.nii.gz`` -> ``S001``: a mask file's study id."""
    for suffix in MASK_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def label_vector_or_missing(labels: np.ndarray | None) -> np.ndarray:
    """A study without a label row is "not annotated" for every label."""
    return labels if labels is not None else np.full(len(LABELS), np.nan, dtype=np.float32)
