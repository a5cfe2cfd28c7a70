"""The DICOM site layout (docs/design.md §4)::

SITE_DIR/dicom/<patient_id>/<study_id>/*.dcm    one axial CT series per study folder
SITE_DIR/masks/<patient_id>/<study_id>.nii.gz   optional hematoma mask (any axis order)
SITE_DIR/labels.csv                             marker labels per study
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from client.ingest.dicom import Problem, StudyError, read_study
from client.ingest.labels import LabelTable, read_labels
from client.ingest.masks import MaskError, read_mask
from client.ingest.study import MASK_SUFFIXES, StudyRecord, StudyRef, strip_mask_suffix

MARKER_DIR = "dicom"


def find_mask(site_dir: Path, patient_id: str, study_id: str) -> Path | None:
    for suffix in MASK_SUFFIXES:
        path = site_dir / "masks" / patient_id / f"{study_id}{suffix}"
        if path.is_file():
            return path
    return None


def discover_studies(site_dir: Path) -> tuple[list[StudyRef], list[Problem]]:
    """Studies are the folders ``dicom/<patient_id>/<study_id>/``; masks without a study are reported."""
    root = site_dir / MARKER_DIR
    if not root.is_dir():
        return [], [Problem(str(root), "no dicom/ folder in the site")]
    refs = [
        StudyRef(p.name, s.name, s, find_mask(site_dir, p.name, s.name))
        for p in sorted(root.iterdir())
        if p.is_dir() and not p.name.startswith(".")
        for s in sorted(p.iterdir())
        if s.is_dir() and not s.name.startswith(".")
    ]
    known = {r.key for r in refs}
    masks = site_dir / "masks"
    orphans = (
        [
            Problem(str(m), "mask without a DICOM study of the same patient/study")
            for m in sorted(masks.glob("*/*"))
            if m.name.endswith(MASK_SUFFIXES) and (m.parent.name, strip_mask_suffix(m.name)) not in known
        ]
        if masks.is_dir()
        else []
    )
    return refs, orphans


def load_study(ref: StudyRef, table: LabelTable) -> StudyRecord:
    """Read a study's volume, mask and labels; a bad mask keeps the study (without mask)."""
    record = StudyRecord(ref)
    try:
        study = read_study(ref.dicom_dir)
    except StudyError as exc:
        head = Problem(exc.path, exc.reason)
        record.problems = [head] + [p for p in exc.problems if p != head]
        return record
    record.volume, record.geometry = study.volume, study.geometry
    record.problems.extend(study.problems)
    if ref.mask_path is not None:
        try:
            record.mask = read_mask(ref.mask_path, study.geometry)
        except MaskError as exc:
            record.problems.append(Problem(exc.path, f"{exc.reason}; the study is used without its mask"))
    record.labels = table.labels.get(ref.key)
    record.extras = table.extras.get(ref.key, {})
    return record


def iter_dicom_studies(site_dir: Path) -> Iterator[StudyRecord | list[Problem]]:
    """Site-level problems first (a list), then one :class:`StudyRecord` per study."""
    refs, problems = discover_studies(site_dir)
    table = read_labels(site_dir / "labels.csv", {r.key for r in refs})
    yield problems + list(table.problems)
    for ref in refs:
        yield load_study(ref, table)
