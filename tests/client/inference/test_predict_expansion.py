"""``hemexp predict`` reports the expansion probability only when the checkpoint has the head."""

from __future__ import annotations

import numpy as np

from client.inference.predict import StudyPrediction, study_outputs
from common.config import MARKERS
from common.presets import get_preset


def _prediction(expansion: float | None) -> StudyPrediction:
    k = 2
    return StudyPrediction(
        {m: 0.5 for m in MARKERS},
        1.0,
        [0],
        [0, 1],
        0,
        np.zeros((k, 4)),
        np.zeros((k, 4, 4)),
        np.zeros((k, 4, 4)),
        "max",
        expansion,
    )


def test_expansion_is_reported_apart_from_the_markers_with_the_head():
    labels = get_preset("tiny", predict_expansion=True).output_names
    scores = np.array([[0.1, 0.2, 0.3, 0.4, 0.9], [0.5, 0.1, 0.1, 0.1, 0.2]])
    markers, expansion = study_outputs(scores, labels)
    assert expansion == 0.9 and list(markers) == list(MARKERS)
    assert markers["hypodensity"] == 0.5
    assert _prediction(expansion).to_json()["expansion"] == 0.9


def test_no_expansion_without_the_head():
    labels = get_preset("tiny").output_names
    markers, expansion = study_outputs(np.array([[0.1, 0.2, 0.3, 0.4]]), labels)
    assert expansion is None and list(markers) == list(MARKERS)
    assert "expansion" not in _prediction(None).to_json()
