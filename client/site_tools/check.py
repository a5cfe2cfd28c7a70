"""``check SITE_DIR``: what a site's data yields before anything is trained (site IT's first step).

One implementation behind ``hemexp check`` and ``flwr-client check``. The report stays on the site
(it names the site's own patient and study ids); nothing here is sent anywhere.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from client.ingest.dicom import Problem
from client.ingest.layouts import iter_studies, site_layout
from client.ingest.site_settings import SiteSettings, read_site_settings
from client.ingest.study import StudyRecord
from common.config import LABELS, MARKERS
from common.metrics import hematoma_volume_ml


@dataclass(frozen=True)
class StudyCheck:
    patient_id: str
    study_id: str
    status: str  # "ok" | "rejected"
    problems: tuple[Problem, ...]
    n_slices: int = 0
    has_mask: bool = False
    hematoma_ml: float | None = None
    mask_slices: int = 0
    labels: tuple[float, ...] | None = None

    def to_dict(self) -> dict:
        return {
            "patient_id": self.patient_id,
            "study_id": self.study_id,
            "status": self.status,
            "problems": [p.to_dict() for p in self.problems],
            "n_slices": self.n_slices,
            "has_mask": self.has_mask,
            "hematoma_ml": self.hematoma_ml,
            "mask_slices": self.mask_slices,
            "labels": None
            if self.labels is None
            else {k: (None if np.isnan(v) else int(v)) for k, v in zip(LABELS, self.labels)},
        }


@dataclass(frozen=True)
class SiteCheck:
    site: SiteSettings
    studies: tuple[StudyCheck, ...]
    problems: tuple[Problem, ...]
    layout: str = "dicom"  # client.ingest.layouts.site_layout: "dicom" or "ct-ich"

    @property
    def usable(self) -> list[StudyCheck]:
        return [s for s in self.studies if s.status == "ok"]

    def stages(self) -> dict[str, int]:
        """Usable studies each training stage learns from: with a mask (stage 1, U-Net) and with
        at least one annotated marker (stage 2, classifier)."""
        cols = [LABELS.index(m) for m in MARKERS]
        marked = [s for s in self.usable if s.labels is not None and not np.isnan(np.asarray(s.labels)[cols]).all()]
        return {"segmentation": sum(s.has_mask for s in self.usable), "markers": len(marked)}

    def label_summary(self) -> dict[str, dict[str, int]]:
        """Per label: positives, negatives and missing among usable studies."""
        summary = {}
        for i, name in enumerate(LABELS):
            values = np.array([np.nan if s.labels is None else s.labels[i] for s in self.usable], dtype=float)
            summary[name] = {
                "positive": int(np.sum(values == 1)),
                "negative": int(np.sum(values == 0)),
                "missing": int(np.sum(np.isnan(values))),
            }
        return summary

    def to_dict(self) -> dict:
        return {
            "site_id": self.site.site_id,
            "name": self.site.name,
            "layout": self.layout,
            "window": None if self.site.window is None else list(self.site.window),
            "n_studies": len(self.studies),
            "n_usable": len(self.usable),
            "n_slices": sum(s.n_slices for s in self.usable),
            "labels": self.label_summary(),
            "stages": self.stages(),
            "studies": [s.to_dict() for s in self.studies],
            "problems": [p.to_dict() for p in self.problems],
        }


def summarise_study(record: StudyRecord) -> StudyCheck:
    ref = record.ref
    if not record.usable:
        return StudyCheck(ref.patient_id, ref.study_id, "rejected", tuple(record.problems))
    mask_slices, ml = 0, None
    if record.mask is not None:
        mask_slices = int(np.count_nonzero(record.mask.reshape(record.mask.shape[0], -1).any(axis=1)))
        ml = hematoma_volume_ml(record.mask.sum(), record.geometry.pixel_spacing, record.geometry.slice_spacing)
    labels = None if record.labels is None else tuple(float(v) for v in record.labels)
    problems = list(record.problems)
    if record.labels is None:
        problems.append(Problem(str(ref.dicom_dir), "no row in labels.csv: every label is not annotated"))
    return StudyCheck(
        ref.patient_id,
        ref.study_id,
        "ok",
        tuple(problems),
        record.geometry.shape[0],
        record.mask is not None,
        ml,
        mask_slices,
        labels,
    )


def check_site(site_dir: Path | str) -> SiteCheck:
    """Read every study of a site (headers, pixels, masks, labels) and report what is usable."""
    site_dir = Path(site_dir)
    if not site_dir.is_dir():
        raise FileNotFoundError(f"{site_dir}: site folder does not exist")
    walk = iter_studies(site_dir)
    site_problems = next(walk)
    try:
        site = read_site_settings(site_dir)
    except ValueError as exc:
        site = SiteSettings(site_dir.name, site_dir.name)
        site_problems = [Problem(str(site_dir / "site.toml"), str(exc))] + site_problems
    return SiteCheck(
        site, tuple(summarise_study(r) for r in walk), tuple(site_problems), site_layout(site_dir) or "dicom"
    )


def format_table(report: SiteCheck) -> str:
    """A plain-text table for site IT: one line per study, then label prevalence and problems."""
    lines = [
        f"site {report.site.site_id} ({report.site.name}); window {report.site.window or 'default'}; "
        f"layout {report.layout}",
        "",
    ]
    lines.append(f"{'patient':<14} {'study':<10} {'status':<9} {'slices':>6} {'mask':>5} {'ml':>7}  labels / reason")
    for s in report.studies:
        if s.status == "ok":
            labels = (
                ""
                if s.labels is None
                else " ".join(f"{k[:4]}={'-' if np.isnan(v) else int(v)}" for k, v in zip(LABELS, s.labels))
            )
            ml = "" if s.hematoma_ml is None else f"{s.hematoma_ml:7.1f}"
            lines.append(
                f"{s.patient_id:<14} {s.study_id:<10} {'ok':<9} {s.n_slices:>6} {s.mask_slices:>5} {ml:>7}  {labels}"
            )
        else:
            lines.append(
                f"{s.patient_id:<14} {s.study_id:<10} {'REJECTED':<9} {'':>6} {'':>5} {'':>7}  {s.problems[0].reason}"
            )
    usable = report.usable
    lines += [
        "",
        f"{len(usable)} of {len(report.studies)} studies usable, {sum(s.n_slices for s in usable)} slices, "
        f"{sum(s.has_mask for s in usable)} with mask",
    ]
    stages = report.stages()
    lines.append(
        f"stage 1 (U-Net) learns from {stages['segmentation']} studies with a mask, "
        f"stage 2 (markers) from {stages['markers']} with a marker label"
    )
    if stages["segmentation"] and not stages["markers"]:
        lines.append(
            "no marker label: this site trains the U-Net (stage 1) only; in stage 2 its slices "
            "without hematoma still count as marker-negative (docs/design.md §4)"
        )
    lines += ["", f"{'label':<17} {'pos':>5} {'neg':>5} {'missing':>8} {'prevalence':>11}"]
    for name, c in report.label_summary().items():
        annotated = c["positive"] + c["negative"]
        prevalence = f"{c['positive'] / annotated:.1%}" if annotated else "-"
        lines.append(f"{name:<17} {c['positive']:>5} {c['negative']:>5} {c['missing']:>8} {prevalence:>11}")
    problems = list(report.problems) + [p for s in report.studies for p in s.problems]
    if problems:
        lines += ["", f"{len(problems)} problem(s):"] + [f"  {p.path}: {p.reason}" for p in problems]
    return "\n".join(lines)


def to_json(report: SiteCheck) -> str:
    return json.dumps(report.to_dict(), indent=2)
