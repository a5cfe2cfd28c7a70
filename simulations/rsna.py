"""Arrange the RSNA 2019 Intracranial Hemorrhage Detection training set as a site folder.

RSNA ships single-slice DICOM files in one flat folder (``stage_2_train/ID_<hex>.dcm``) and one
label row per image and subtype (``stage_2_train.csv``: ``ID,Label`` with ``ID`` =
``<SOPInstanceUID>_<subtype>``). :func:`convert_rsna` groups the files into series by their headers
(PatientID, StudyInstanceUID, SeriesInstanceUID) and links them into
``dicom/<PatientID>/<StudyInstanceUID>/`` (docs/design.md §4), where the DICOM walk reads them like any
site's. ``labels.csv`` gets one row per study, the marker and expansion columns empty (RSNA does not
annotate them: not annotated, never 0) and the hemorrhage subtypes as extra ``rsna_*`` columns;
``rsna_slice_labels.csv`` keeps the per-image labels. See docs/public-data.md.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from client.ingest.dicom import Problem, read_series_ids
from common.config import ID_COLUMNS, LABELS

RSNA_SUBTYPES: tuple[str, ...] = ("any", "epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural")
#: Names of the image folder in the Kaggle download and in common mirrors.
IMAGE_DIRS: tuple[str, ...] = ("stage_2_train", "stage_2_train_images")
LABELS_CSV = "stage_2_train.csv"
SLICE_LABELS_CSV = "rsna_slice_labels.csv"
LINK_MODES: tuple[str, ...] = ("symlink", "hardlink", "copy")


@dataclass(frozen=True)
class RsnaConversion:
    out: Path
    n_files: int
    n_studies: int
    n_patients: int
    problems: tuple[Problem, ...]

    def describe(self) -> str:
        return (
            f"{self.out}: {self.n_files} images in {self.n_studies} studies of {self.n_patients} patients; "
            f"{len(self.problems)} problem(s)"
        )


def read_rsna_labels(path: Path) -> tuple[dict[str, dict[str, int]], list[Problem]]:
    """``stage_2_train.csv`` as {image id: {subtype: 0/1}}; bad rows reported with their line.

    The release repeats some rows: a repeat with the same value is harmless, a conflicting one
    leaves that image's subtype unknown (reported).
    """
    labels: dict[str, dict[str, int]] = defaultdict(dict)
    conflicts: set[tuple[str, str]] = set()
    problems: list[Problem] = []
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        if not {"ID", "Label"} <= set(reader.fieldnames or []):
            return {}, [Problem(str(path), f"expected columns ID,Label, found {reader.fieldnames}")]
        for line, row in enumerate(reader, start=2):
            image, _, subtype = (row["ID"] or "").strip().rpartition("_")
            value = (row["Label"] or "").strip()
            if not image or subtype not in RSNA_SUBTYPES or value not in ("0", "1"):
                problems.append(
                    Problem(
                        f"{path}:{line}", f"not <image id>_<subtype>,0|1 with a subtype of {', '.join(RSNA_SUBTYPES)}"
                    )
                )
                continue
            seen = labels[image].get(subtype)
            if seen is not None and seen != int(value):
                conflicts.add((image, subtype))
                problems.append(
                    Problem(f"{path}:{line}", f"{image} {subtype}: {value} contradicts an earlier row; left unknown")
                )
            labels[image][subtype] = int(value)
    for image, subtype in conflicts:
        labels[image].pop(subtype, None)
    return dict(labels), problems


def _folder_name(identifier: str) -> str:
    """A header identifier as one safe path component."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", identifier) or "unknown"


def _place(src: Path, dest: Path, link: str) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if link == "symlink":
        dest.symlink_to(src.resolve())
    elif link == "hardlink":
        os.link(src, dest)
    else:
        shutil.copy2(src, dest)


def _study_value(values: list[int | None]) -> str:
    """A subtype at study level: 1 if any image has it, 0 if every image is labelled without it."""
    if any(v == 1 for v in values):
        return "1"
    return "0" if values and all(v == 0 for v in values) else ""


def convert_rsna(src: Path | str, out: Path | str, link: str = "symlink", progress: bool = False) -> RsnaConversion:
    """Write the site folder ``out`` (``dicom/``, ``labels.csv``, ``rsna_slice_labels.csv``) from ``src``.

    ``src`` holds ``stage_2_train/`` (or ``stage_2_train_images/``) and ``stage_2_train.csv``;
    ``link`` is how images reach ``out``: ``symlink`` (default, no copy), ``hardlink`` or ``copy``.
    A study with several series gets one folder per series (``<StudyInstanceUID>_<SeriesInstanceUID>``),
    since a study folder holds one series. Files that are not DICOM, or cannot be placed, are reported.
    """
    src, out = Path(src), Path(out)
    if link not in LINK_MODES:
        raise ValueError(f"link must be one of {', '.join(LINK_MODES)}, got {link!r}")
    images_dir = next((src / name for name in IMAGE_DIRS if (src / name).is_dir()), None)
    if images_dir is None:
        raise FileNotFoundError(f"{src}: no image folder ({' or '.join(IMAGE_DIRS)})")
    if (out / "labels.csv").exists() or (out / "dicom").exists():
        raise FileExistsError(f"{out}: already holds a site (dicom/ or labels.csv); choose an empty folder")
    problems: list[Problem] = []
    labels: dict[str, dict[str, int]] = {}
    have_labels = (src / LABELS_CSV).is_file()
    if have_labels:
        labels, label_problems = read_rsna_labels(src / LABELS_CSV)
        problems += label_problems
    else:
        problems.append(Problem(str(src / LABELS_CSV), "not found: the studies get no hemorrhage labels"))

    files = sorted(p for p in images_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    if progress:
        from tqdm import tqdm

        files = tqdm(files, desc="rsna headers", unit="file")
    series: dict[tuple[str, str, str], list[tuple[Path, str]]] = defaultdict(list)
    for path in files:
        ids, problem = read_series_ids(path)
        if problem is not None:
            problems.append(problem)
            continue
        series[(ids["PatientID"], ids["StudyInstanceUID"], ids["SeriesInstanceUID"])].append(
            (path, ids["SOPInstanceUID"])
        )

    per_study = defaultdict(int)
    for patient, study, _ in series:
        per_study[(patient, study)] += 1
    study_rows, slice_rows, used = [], [], set()
    for (patient, study, uid), members in sorted(series.items()):
        patient_id = _folder_name(patient)
        study_id = _folder_name(study if per_study[(patient, study)] == 1 else f"{study}_{uid}")
        slice_values: dict[str, list[int | None]] = {s: [] for s in RSNA_SUBTYPES}
        for path, sop in members:
            _place(path, out / "dicom" / patient_id / study_id / path.name, link)
            image = sop if sop in labels else path.stem
            found = labels.get(image)
            if found is None and have_labels:
                problems.append(Problem(str(path), f"no row in {LABELS_CSV}: its hemorrhage labels are unknown"))
            else:
                used.add(image)
            for s in RSNA_SUBTYPES:
                slice_values[s].append(None if found is None else found.get(s))
            slice_rows.append(
                [patient_id, study_id, path.name]
                + ["" if found is None or s not in found else str(found[s]) for s in RSNA_SUBTYPES]
            )
        study_rows.append(
            [patient_id, study_id]
            + [""] * len(LABELS)
            + [_study_value(slice_values[s]) for s in RSNA_SUBTYPES]
            + [str(len(members))]
        )
    unmatched = sorted(set(labels) - used)
    if unmatched and series:
        problems.append(
            Problem(
                str(src / LABELS_CSV),
                f"{len(unmatched)} labelled image(s) have no file in {images_dir.name}/ (e.g. {unmatched[0]})",
            )
        )
    out.mkdir(parents=True, exist_ok=True)
    with (out / "labels.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(list(ID_COLUMNS) + list(LABELS) + [f"rsna_{s}" for s in RSNA_SUBTYPES] + ["rsna_images"])
        w.writerows(study_rows)
    with (out / SLICE_LABELS_CSV).open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(list(ID_COLUMNS) + ["file"] + [f"rsna_{s}" for s in RSNA_SUBTYPES])
        w.writerows(slice_rows)
    return RsnaConversion(
        out, sum(len(m) for m in series.values()), len(study_rows), len({p for p, _, _ in series}), tuple(problems)
    )
