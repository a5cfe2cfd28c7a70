"""What the expansion head must beat (docs/gan.md, "Expansion prediction"): two study-level scores.

- **volume alone**: the baseline hematoma volume (larger hematomas grow more often in the clinic;
  the synthetic generator draws growth independently of size, so there it should score about 0.5);
- **marker-count score**: in the spirit of the BAT score (blend sign, any hypodensity, timing), a
  logistic regression on the number of reader-labelled markers and the baseline volume, fitted on
  the training split only and scored on the test split.

Both read the reference (reader) annotations, which the model never sees at prediction time: they
are an upper bound on what a marker-reading clinician could do with the same studies.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import LogisticRegression
from torch.utils.data import Dataset

from client.data.dataset import parts_of
from client.data.expansion import study_volume_ml
from common.config import LABELS, MARKERS
from common.study_metrics import auroc

_EXPANSION = LABELS.index("expansion")
_MARKER_COLUMNS = [LABELS.index(m) for m in MARKERS]


@dataclass(frozen=True)
class StudyTable:
    """One row per baseline study with an expansion label and a reference hematoma."""

    studies: np.ndarray  # [n] study keys (cache name / study pseudonym)
    volume_ml: np.ndarray  # [n] reference baseline volume
    marker_count: np.ndarray  # [n] reader-labelled markers present (unannotated counts as absent)
    expansion: np.ndarray  # [n] 0/1

    def features(self) -> np.ndarray:
        """``[n, 2]``: marker count and volume, the marker-count score's inputs."""
        return np.stack([self.marker_count, self.volume_ml], axis=1)


def study_table(ds: Dataset) -> StudyTable:
    """The studies of a (pooled) dataset that have an expansion label and a hematoma volume."""
    keys, vols, counts, labels = [], [], [], []
    for part in parts_of(ds):
        in_split = set(np.unique(part.study_keys()))
        for s in part.cache.studies:
            key = f"{part.cache.path.name}/{s['study']}"
            exp = s["labels"][_EXPANSION]
            vol = study_volume_ml(s)
            if key not in in_split or exp is None or not s["has_mask"] or vol <= 0:
                continue
            keys.append(key)
            vols.append(vol)
            counts.append(sum(1 for j in _MARKER_COLUMNS if s["labels"][j] == 1))
            labels.append(int(exp))
    return StudyTable(np.asarray(keys), np.asarray(vols, float), np.asarray(counts, float), np.asarray(labels, int))


def fit_marker_score(train: StudyTable) -> LogisticRegression | None:
    """Logistic regression of expansion on (marker count, volume); None with a single class."""
    if np.unique(train.expansion).size < 2:
        return None
    return LogisticRegression().fit(train.features(), train.expansion)


def comparator_scores(train: StudyTable, test: StudyTable) -> dict[str, np.ndarray]:
    """Per test study, the two comparators' scores: ``volume`` (the baseline volume itself) and
    ``marker_score`` (the probability of the score fitted on ``train``; NaN where it cannot be fitted)."""
    fitted = fit_marker_score(train)
    marker = np.full(len(test.studies), np.nan)
    if fitted is not None and len(test.studies):
        marker = fitted.predict_proba(test.features())[:, 1]
    return {"volume": test.volume_ml, "marker_score": marker}


def compare_expansion(train: StudyTable, test: StudyTable, model_auc: float) -> dict[str, float]:
    """The head's study AUROC beside volume alone and the marker-count score, on the same test studies."""
    scores = comparator_scores(train, test)
    defined = len(test.studies) > 0
    fitted = np.isfinite(scores["marker_score"]).all()
    return {
        "model": float(model_auc),
        "volume": auroc(test.expansion, scores["volume"]) if defined else float("nan"),
        "marker_score": auroc(test.expansion, scores["marker_score"]) if defined and fitted else float("nan"),
        "n_train": int(len(train.studies)),
        "n_test": int(len(test.studies)),
        "n_test_positive": int(test.expansion.sum()),
    }
