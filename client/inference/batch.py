"""``hemexp predict --batch FOLDER``: score every study below a folder with one loaded model.

A study is a folder that holds files directly (the layout ``read_study`` reads). Each study's
results go to ``OUT/<pseudonym>/`` and one row of ``OUT/summary.csv``; the pseudonym is keyed by
the site's secret on the study folder's path relative to FOLDER, so neither the output folders nor
the CSV name a patient (folder names are often MRNs or accession numbers). A study that cannot be
scored gets a row with its reason, and the batch goes on.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Iterable
from pathlib import Path

from client.inference.audit import Pseudonymiser, public_reason
from client.inference.predict import ScoringModel, run_prediction
from client.ingest.dicom import StudyError, list_files

SUMMARY_FILE = "summary.csv"


def find_studies(folder: Path) -> list[Path]:
    """Every folder below ``folder`` (itself included) that directly holds a non-hidden file."""
    return sorted({p.parent for p in list_files(folder)})


def summary_columns(labels: Iterable[str]) -> list[str]:
    labels = list(labels)
    return (
        ["study", "status", "reason", "n_slices", "volume_ml"]
        + [f"p_{name}" for name in labels]
        + [f"{name}_present" for name in labels]
        + ["key_slice", "seconds"]
    )


def summary_row(study: str, result: dict | None, status: str, reason: str, seconds: float) -> dict[str, object]:
    row: dict[str, object] = {"study": study, "status": status, "reason": reason}
    if result:
        row |= {"n_slices": result["n_slices"], "volume_ml": result["volume_ml"], "key_slice": result["key_slice"]}
        row |= {f"p_{k}": v for k, v in result["markers"].items()}
        row |= {f"{k}_present": int(v) for k, v in result["present"].items()}
    return row | {"seconds": round(seconds, 2)}


def run_batch(
    folder: Path,
    model: ScoringModel,
    out: Path,
    window: tuple[float, float] | None = None,
    dicom: bool = False,
    key_dir: Path | None = None,
    progress: bool = True,
) -> tuple[Path, list[dict[str, object]]]:
    """Score every study of ``folder``; returns the summary CSV's path and its rows."""
    from tqdm import tqdm

    folder, out = Path(folder), Path(out)
    studies = find_studies(folder)
    if not studies:
        raise StudyError(folder, "no study folder (a folder holding files) below it")
    name = Pseudonymiser(key_dir)
    rows = []
    for study_dir in tqdm(studies, desc="studies", unit="study", disable=not progress):
        study = name("study", study_dir.relative_to(folder).as_posix())
        t0 = time.perf_counter()
        try:
            result = run_prediction(study_dir, model, out / study, model.device, window, dicom=dicom)
            status, reason = "ok", ""
        except Exception as exc:  # one bad study must not stop the batch
            result, reason = None, public_reason(exc)
            status = "rejected" if isinstance(exc, StudyError) else "failed"
        rows.append(summary_row(study, result, status, reason, time.perf_counter() - t0))
    out.mkdir(parents=True, exist_ok=True)
    path = out / SUMMARY_FILE
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=summary_columns(model.ckpt.labels), restval="")
        writer.writeheader()
        writer.writerows(rows)
    return path, rows
