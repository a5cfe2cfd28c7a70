"""A site folder in the data contract (DESIGN.md §4): find its studies, read each one whole.

``iter_studies`` is the one walk over a site that ``check``, the cache builder and the public-data
adapters share; it yields a :class:`StudyRecord` per study, loaded or rejected with its reasons.
A site folder has one of two layouts (:func:`site_layout`): ``dicom/`` (DESIGN.md §4) or the
PhysioNet CT-ICH release (``ct_scans/*.nii``, read by :mod:`client.ctich`; docs/public-data.md).
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from client.dicom import Geometry, Problem, StudyError, read_study
from client.labels import LabelTable, StudyKey, read_labels
from client.masks import MaskError, read_mask
from common.config import LABELS

MASK_SUFFIXES = (".nii.gz", ".nii")
#: Site layouts: the folder that marks each (DICOM wins when a folder holds both).
LAYOUT_DIRS: dict[str, str] = {"dicom": "dicom", "ct-ich": "ct_scans"}


@dataclass(frozen=True)
class SiteConfig:
    """``site.toml``: optional site id, display name and HU window."""

    site_id: str
    name: str
    window: tuple[float, float] | None = None


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


def site_layout(site_dir: Path) -> str | None:
    """``"dicom"`` for a folder with ``dicom/``, else ``"ct-ich"`` for one with ``ct_scans/``, else None."""
    for layout, folder in LAYOUT_DIRS.items():
        if (site_dir / folder).is_dir():
            return layout
    return None


def list_site_folders(data_root: Path) -> list[Path]:
    """Site folders of a dataset: subfolders holding ``dicom/`` or CT-ICH's ``ct_scans/`` (hidden
    ones skipped), sorted.

    The one rule both the simulation's sites and the ClientApp's partitions follow.
    """
    return sorted(p for p in data_root.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and site_layout(p) is not None)


def read_site_config(site_dir: Path) -> SiteConfig:
    """Read ``site.toml`` if present; the folder name is the default site id."""
    path = site_dir / "site.toml"
    default = SiteConfig(site_id=site_dir.name, name=site_dir.name)
    if not path.is_file():
        return default
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML ({exc})") from exc
    window = data.get("window")
    if window is not None:
        if not (isinstance(window, list) and len(window) == 2 and float(window[0]) < float(window[1])):
            raise ValueError(f"{path}: window must be [a, b] with a < b (HU), got {window!r}")
        window = (float(window[0]), float(window[1]))
    return SiteConfig(site_id=str(data.get("site_id", default.site_id)), name=str(data.get("name", default.name)), window=window)


def find_mask(site_dir: Path, patient_id: str, study_id: str) -> Path | None:
    for suffix in MASK_SUFFIXES:
        path = site_dir / "masks" / patient_id / f"{study_id}{suffix}"
        if path.is_file():
            return path
    return None


def discover_studies(site_dir: Path) -> tuple[list[StudyRef], list[Problem]]:
    """Studies are the folders ``dicom/<patient_id>/<study_id>/``; masks without a study are reported."""
    root = site_dir / "dicom"
    if not root.is_dir():
        return [], [Problem(str(root), "no dicom/ folder in the site")]
    refs = [
        StudyRef(p.name, s.name, s, find_mask(site_dir, p.name, s.name))
        for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")
        for s in sorted(p.iterdir()) if s.is_dir() and not s.name.startswith(".")
    ]
    known = {r.key for r in refs}
    orphans = [
        Problem(str(m), "mask without a DICOM study of the same patient/study")
        for m in sorted((site_dir / "masks").glob("*/*"))
        if m.name.endswith(MASK_SUFFIXES) and (m.parent.name, _strip_suffix(m.name)) not in known
    ] if (site_dir / "masks").is_dir() else []
    return refs, orphans


def _strip_suffix(name: str) -> str:
    for suffix in MASK_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


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


def iter_studies(site_dir: Path | str) -> Iterator[StudyRecord | list[Problem]]:
    """Yield first the site-level problems (a list), then one :class:`StudyRecord` per study."""
    site_dir = Path(site_dir)
    if site_layout(site_dir) == "ct-ich":
        from client.ctich import iter_ctich_studies  # imports this module

        yield from iter_ctich_studies(site_dir)
        return
    refs, problems = discover_studies(site_dir)
    if (site_dir / LAYOUT_DIRS["ct-ich"]).is_dir():
        problems.append(Problem(str(site_dir / LAYOUT_DIRS["ct-ich"]), "ignored: the site has dicom/ (one layout per site folder)"))
    table = read_labels(site_dir / "labels.csv", {r.key for r in refs})
    yield problems + list(table.problems)
    for ref in refs:
        yield load_study(ref, table)


def label_vector_or_missing(labels: np.ndarray | None) -> np.ndarray:
    """A study without a label row is "not annotated" for every label."""
    return labels if labels is not None else np.full(len(LABELS), np.nan, dtype=np.float32)
