"""``hemexp predict`` reports the expansion probability only when the checkpoint has the head."""

from __future__ import annotations

from types import SimpleNamespace

from client.inference.predict import findings
from common.config import MARKERS
from common.presets import get_preset


def _findings(with_head: bool) -> dict:
    cfg = get_preset("tiny", predict_expansion=with_head)
    scores = dict(zip(cfg.output_names, (0.1, 0.7, 0.3, 0.4, 0.9)))
    ckpt = SimpleNamespace(labels=cfg.output_names, meta={}, model_config=cfg)
    return findings(SimpleNamespace(markers=scores), ckpt)


def test_expansion_risk_with_the_head():
    out = _findings(with_head=True)
    assert out["expansion_risk"] == 0.9
    assert out["present"]["hypodensity"] is False and out["present"]["irregular_margin"] is True


def test_no_expansion_without_the_head():
    out = _findings(with_head=False)
    assert out["expansion_risk"] is None and list(out["present"]) == list(MARKERS)
