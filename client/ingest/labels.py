"""Read and validate a site's labels.csv (docs/design.md §4), row by row.

Empty means "not annotated" and becomes NaN, never 0. Every problem names the file and the line.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from client.ingest.dicom import Problem
from common.config import ID_COLUMNS, LABELS

StudyKey = tuple[str, str]  # (patient_id, study_id): site-internal identifiers, never written out


@dataclass(frozen=True)
class LabelTable:
    """Labels per study (float32 vector in LABELS order, NaN = not annotated) and extra columns."""

    labels: dict[StudyKey, np.ndarray]
    extras: dict[StudyKey, dict[str, str]]
    problems: tuple[Problem, ...] = ()


def parse_label_value(text: str) -> float:
    """'1' -> 1.0, '0' -> 0.0, '' -> NaN; anything else is a ValueError."""
    text = text.strip()
    if text == "":
        return float("nan")
    if text in ("0", "1", "0.0", "1.0"):
        return float(text)
    raise ValueError(f"value {text!r} is not 0, 1 or empty")


def missing_columns(path: Path, reader: csv.DictReader, columns: Iterable[str], consequence: str) -> Problem | None:
    """The Problem of a CSV whose header lacks some of ``columns`` (``consequence``: how it is read), or None."""
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [c for c in columns if c not in header]
    return Problem(str(path), f"missing column(s) {', '.join(missing)}: {consequence}") if missing else None


def read_labels(path: Path | str, known: set[StudyKey] | None = None) -> LabelTable:
    """Validate ``labels.csv``; bad rows are reported (with their line number) and left out.

    ``known``: the studies found under ``dicom/``; a row naming another study is reported.
    A study named on two rows is reported on both and gets no labels (which row is right cannot
    be told). A missing label column is reported once and read as "not annotated".
    """
    path = Path(path)
    problems: list[Problem] = []
    if not path.is_file():
        return LabelTable({}, {}, (Problem(str(path), "labels.csv not found: no study has labels"),))
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        fatal = missing_columns(path, reader, ID_COLUMNS, "no label can be read")
        if fatal:
            return LabelTable({}, {}, (fatal,))
        lacking = missing_columns(path, reader, LABELS, "read as not annotated for every study")
        if lacking:
            problems.append(lacking)
        rows: dict[StudyKey, list[tuple[int, np.ndarray, dict[str, str]]]] = {}
        for line, raw in enumerate(reader, start=2):
            row = {(k or "").strip(): (v or "") for k, v in raw.items() if k is not None}
            where = f"{path}:{line}"
            if None in raw:
                problems.append(Problem(where, "more values than columns"))
                continue
            key = (row["patient_id"].strip(), row["study_id"].strip())
            if not all(key):
                problems.append(Problem(where, "empty patient_id or study_id"))
                continue
            if known is not None and key not in known:
                problems.append(Problem(where, f"study {key[1]} of patient {key[0]} has no DICOM folder"))
                continue
            try:
                values = np.array([parse_label_value(row.get(c, "")) for c in LABELS], dtype=np.float32)
            except ValueError as exc:
                bad = next(c for c in LABELS if c in row and _is_bad(row[c]))
                problems.append(Problem(where, f"column {bad}: {exc}"))
                continue
            extras = {k: v.strip() for k, v in row.items() if k not in LABELS and k not in ID_COLUMNS}
            rows.setdefault(key, []).append((line, values, extras))
    labels, extras = {}, {}
    for key, found in rows.items():
        if len(found) > 1:
            lines = ", ".join(str(line) for line, _, _ in found)
            for line, _, _ in found:
                problems.append(
                    Problem(f"{path}:{line}", f"duplicate row for one study (lines {lines}): none of them is used")
                )
            continue
        _, labels[key], extras[key] = found[0]
    return LabelTable(labels, extras, tuple(problems))


def _is_bad(text: str) -> bool:
    try:
        parse_label_value(text)
        return False
    except ValueError:
        return True
