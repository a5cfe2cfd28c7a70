"""The ground truth of a generated dataset, kept where no site and no cache can see it.

``DATA_ROOT/.truth/truth.csv``: one row per study, keyed by (site_id, patient_id, study_id) as
written in the site's labels.csv. A hidden folder at the data root is not a site folder
(``client.ingest.layouts.list_site_folders`` skips hidden folders and folders without a layout),
and a site's cache hashes only files inside its site folder, so training never reads it.

Columns: site_id, patient_id, study_id, kind (baseline / followup), location, true_volume_ml,
onset_hours, expansion_risk (the logistic model's probability), growth_ratio, one
``mimic_<name>`` strength per mimic (0 = absent); on baselines, per marker ``<m>_true`` (0/1),
``<m>_severity`` (0..1), ``<m>_evidence`` (what a reader saw), ``<m>_reader1``, ``<m>_reader2``
(empty with one reader), ``<m>_label`` (the label before missing cells were blanked), and
``expansion_true`` / ``expansion_label`` where a follow-up exists.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

#: Folder under the data root that holds the truth (hidden: never a site folder).
TRUTH_DIR = ".truth"
TRUTH_FILE = "truth.csv"
TruthKey = tuple[str, str, str]  # (site_id, patient_id, study_id)


def truth_path(data_root: Path | str) -> Path:
    return Path(data_root) / TRUTH_DIR / TRUTH_FILE


def write_truth(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """All rows in one CSV; columns are the union of the rows' keys in first-seen order."""
    rows = list(rows)
    columns: dict[str, None] = {}
    for r in rows:
        columns.update(dict.fromkeys(r))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), restval="", lineterminator="\n")
        w.writeheader()
        w.writerows(rows)


def read_truth(data_root: Path | str) -> dict[TruthKey, dict[str, str]]:
    """The truth rows by (site_id, patient_id, study_id)."""
    with truth_path(data_root).open(newline="") as f:
        return {(r["site_id"], r["patient_id"], r["study_id"]): r for r in csv.DictReader(f)}
