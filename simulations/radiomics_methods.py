"""The radiomics baseline as a method of the simulation harness (``kind = "radiomics"``).

The literature's anchor for the markers is a radiomics model of the hematoma: handcrafted features
and a logistic regression per marker (``common.radiomics``). Here it is one more method beside the
deep ones, scored on the same test studies and recorded the same way (``Runner.record``: study
outputs, the validation temperature and thresholds), so the report's study-level table, intervals
and paired differences include it.

- Training studies are described on their reference masks; validation and test studies on the
  masks of the U-Net that the method ``unet_from`` (a pooled or federated method listed earlier)
  trained at the same seed, as a clinic would have them (``client.radiomics``).
- ``scope = "local"``: one regression per site on its own training studies, its L2 strength per
  marker chosen on its own validation studies, scored at its own test patients (in a
  leave-one-site-out fold: every site's model at the held-out site, and the one whose own
  validation score is best reported as ``<name> (best site)``).
- ``scope = "pooled"``: one regression on every site's training studies, chosen on all their
  validation studies.
- Local and pooled fits are scikit-learn's ``LogisticRegression`` on the objective that
  ``common.radiomics.logistic_step`` descends (weighted BCE with the pos-weight on positives,
  L2 ``l2 / 2 |w|^2``: C = 1 / (l2 n)); one process holds the data there.
- ``scope = "federated"``: the real thing on Flower's simulation engine, ``radiomics.rounds`` > 0
  (``server.radiomics``): only feature sums, weights and the deep evaluate reply's aggregates
  cross. The sites' U-Net is the checkpoint of the ``unet_from`` run (a federated one's ``best.pt``,
  or the in-process model saved as a checkpoint) passed as ``train.init-checkpoint``; the harness
  then scores the server's ``radiomics.json`` on the test studies, as it scores a deep
  federation's ``best.pt``.

Each marker's L2 strength comes from ``radiomics.l2``; the one with the best validation AUROC
(binned as the federation's, ``common.validation``) is kept, and that model's validation studies
give its temperature and thresholds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression

from client.radiomics import StudyFeatures, predicted_features, radiomics_metrics, reference_features, study_outputs
from common.checkpoint import save_checkpoint
from common.config import MARKERS
from common.model import JointModel
from common.radiomics import (
    MODEL_FILE,
    N_FEATURES,
    RadiomicsModel,
    candidate_stats,
    choose,
    chosen_weights,
    feature_sums,
    marker_pos_weight,
    predict_logits,
    standardise,
    standardised,
)
from common.run_config import parse_run_config
from common.validation import ValidationStats, calibration_meta, selection_score
from simulations.experiment import Method, federated_run_name
from simulations.report.cost_section import stage_costs
from simulations.virtual import write_manifest

#: FedAvg rounds of a federated radiomics method whose run config leaves ``radiomics.rounds`` at 0.
DEFAULT_ROUNDS = 20
#: The deep schedule's privacy options, off in a radiomics federation (which they do not cover, and
#: which ``common.run_config`` refuses with them) even where the ``unet_from`` method had them on.
NO_DEEP_PRIVACY = {
    "privacy.dp": False,
    "privacy.secure-counts": False,
    "privacy.secure-updates": False,
    "privacy.site-dp": "off",
}


@dataclass(frozen=True)
class SiteFeatures:
    """One training site's training (reference masks) and validation (U-Net masks) studies."""

    site_id: str
    train: StudyFeatures
    val: StudyFeatures


def run_radiomics(runner: Any, case: Any, method: Method, rc: dict) -> None:
    """Fit, choose, score and record one radiomics method on one case (a ``simulations.runner.Case``)
    for ``runner`` (a ``simulations.runner.Runner``: its ``record``, device, log and this seed's models)."""
    cfg = parse_run_config(rc)
    unet = unet_of(runner, case, method)
    runner.log(f"  {method.name}: features of every study (U-Net of {method.unet_from!r} for validation and test)")
    device, batch = runner.device, runner.eval_batch
    tests = {e.site_id: predicted_features(e.data, unet, device, batch) for e in case.evaluate if len(e.data)}
    if method.scope == "federated":
        run_federated(runner, case, method, rc, unet, tests)
        return
    val_of = {v.site_id: v.data for v in case.val}
    sites = []
    for plan, train in zip(case.plans, case.train):
        val = val_of.get(plan.site_id)
        sf = reference_features(train).annotated()
        held = predicted_features(val, unet, device, batch) if val is not None else sf.subset(np.zeros(len(sf), bool))
        sites.append(SiteFeatures(plan.site_id, sf, held))
    l2, target = cfg.radiomics.l2_values, cfg.eval.target_sensitivity
    if method.scope == "pooled":
        model = fit_model(
            StudyFeatures.concat([s.train for s in sites]), StudyFeatures.concat([s.val for s in sites]), l2, target
        )
        runner.log(f"  {method.name}: L2 per marker {model.l2}")
        runner.record(case, method.name, scores(model, tests), calibration(model))
        return
    run_local(runner, case, method, sites, tests, l2, target)


def unet_of(runner: Any, case: Any, method: Method) -> JointModel:
    """The U-Net that ``method.unet_from`` trained on this case at this seed."""
    model = runner.seed_models.get(f"{case.name}/{method.unet_from}")
    if model is None:
        raise RuntimeError(
            f"radiomics method {method.name!r}: no trained model of {method.unet_from!r} for {case.name} seed "
            f"{case.seed}; unet_from must be a pooled or federated method listed (and run) before it"
        )
    return model


# --- fitting in one process ----------------------------------------------------------------------


def sklearn_weights(X: np.ndarray, labels: np.ndarray, pos_weight: np.ndarray, l2: float) -> np.ndarray:
    """[M, F + 1]: per marker, scikit-learn's minimiser of the mean weighted BCE + (l2 / 2) |w|^2 on
    the annotated rows (``common.radiomics.weighted_bce``); zeros where a class is missing."""
    W = np.zeros((labels.shape[1], X.shape[1] + 1))
    for m in range(labels.shape[1]):
        known = ~np.isnan(labels[:, m])
        y = labels[known, m]
        if not ((y == 1).any() and (y == 0).any()):
            continue
        fit = LogisticRegression(C=1.0 / (l2 * known.sum()), max_iter=5000)
        fit.fit(X[known], y, sample_weight=np.where(y == 1, pos_weight[m], 1.0))
        W[m, :-1], W[m, -1] = fit.coef_[0], fit.intercept_[0]
    return W


def fit_model(train: StudyFeatures, val: StudyFeatures, l2: tuple[float, ...], target: float) -> RadiomicsModel:
    """The regression of every L2 strength on ``train``, each marker's strength chosen on ``val``
    (as the federation chooses, ``common.radiomics.choose``), calibrated on ``val``."""
    features = train.features.reshape(-1, N_FEATURES)
    mean, sd = standardise(*feature_sums(features))
    X = standardised(features, mean, sd)
    pw = marker_pos_weight(train.labels)
    candidates = np.stack([sklearn_weights(X, train.labels.reshape(len(X), len(MARKERS)), pw, v) for v in l2])
    Xv = standardised(val.features.reshape(-1, N_FEATURES), mean, sd)
    picks = choose(candidate_stats(candidates, Xv, val.labels), len(l2))
    weights = chosen_weights(candidates, picks)
    meta: dict[str, Any] = {}
    if len(val):
        known = ~np.isnan(val.dice_counts).any(axis=1)
        outputs = study_outputs(val, predict_logits(weights, Xv))
        stats = ValidationStats.from_outputs(outputs, val.dice_counts[known].tolist())
        meta = calibration_meta(stats, MARKERS, target)
        meta["validation"] = {"metric": "macro_auroc_study", "score": selection_score(stats, 2, range(len(MARKERS)))}
    return RadiomicsModel(mean, sd, weights, {m: float(l2[k]) for m, k in zip(MARKERS, picks)}, meta)


def calibration(model: RadiomicsModel) -> dict[str, Any]:
    """The temperature and thresholds ``Runner.record`` applies ({} without validation: the defaults)."""
    return {k: model.meta[k] for k in ("temperature", "thresholds", "target_sensitivity") if k in model.meta}


def scores(model: RadiomicsModel, tests: dict[str, StudyFeatures]) -> dict[str, dict[str, Any]]:
    """Per evaluation site, ``client.radiomics.radiomics_metrics`` of the model's test logits."""
    return {site: radiomics_metrics(sf, model.logits(sf.features)) for site, sf in tests.items()}


def run_local(
    runner: Any,
    case: Any,
    method: Method,
    sites: list[SiteFeatures],
    tests: dict[str, StudyFeatures],
    l2: tuple[float, ...],
    target: float,
) -> None:
    """Each site's own regression at its own test patients; in a leave-one-site-out fold every
    site's at the held-out site, the one with the best own validation score reported."""
    models = {s.site_id: fit_model(s.train, s.val, l2, target) for s in sites}
    if not case.held_out:
        for site_id, model in models.items():
            if site_id in tests:
                runner.record(case, method.name, scores(model, {site_id: tests[site_id]}), calibration(model))
        return
    valid = {k: m.meta.get("validation", {}).get("score", np.nan) for k, m in models.items()}
    ranked = {k: -1.0 if v is None or np.isnan(v) else float(v) for k, v in valid.items()}
    best = max(ranked, key=lambda k: ranked[k])
    name = f"{method.name} (best site)"
    runner.results.selections += [
        {
            "scenario": case.name,
            "method": name,
            "seed": case.seed,
            "model": k,
            "validation_score": v,
            "chosen": k == best,
        }
        for k, v in ranked.items()
    ]
    runner.record(case, name, scores(models[best], tests), calibration(models[best]))


# --- the federation ------------------------------------------------------------------------------


def unet_checkpoint(runner: Any, case: Any, method: Method, unet: JointModel, rc: dict, run_dir: Path) -> Path:
    """The checkpoint whose U-Net the sites segment with: a federated ``unet_from``'s own chosen
    checkpoint, else the in-process model saved beside the radiomics run."""
    source = runner.exp.method_named(method.unet_from)
    if source.kind == "federated":
        name = federated_run_name(runner.out_dir.name, case.name, source.name, case.seed)
        for ckpt in ("best.pt", "global.pt"):
            if (run_dir / name / ckpt).is_file():
                return run_dir / name / ckpt
    name = federated_run_name(runner.out_dir.name, case.name, method.name, case.seed)
    _, pre = parse_run_config(rc).architecture()
    meta = {"method": source.name, "seed": case.seed, "purpose": "radiomics U-Net"}
    return save_checkpoint(run_dir / f"{name}.unet.pt", unet, unet.cfg, pre, meta)


def run_federated(
    runner: Any, case: Any, method: Method, rc: dict, unet: JointModel, tests: dict[str, StudyFeatures]
) -> None:
    """``radiomics.rounds`` FedAvg rounds on one virtual SuperNode per site (``server.radiomics``);
    the server's model scored at the evaluation sites here, its history's costs and failures kept."""
    if runner.engine is None:
        raise RuntimeError("federated radiomics methods need a SimulationEngine")
    run_dir = runner.out_dir / "federated"
    name = federated_run_name(runner.out_dir.name, case.name, method.name, case.seed)
    manifest = write_manifest(run_dir / f"{name}.partitions.json", case.plans, case.caches)
    rounds = parse_run_config(rc).radiomics.rounds or DEFAULT_ROUNDS
    overrides = {
        **runner.exp.method_run_config(method),
        "seed": case.seed,
        "data.partitions": str(manifest),
        "output.dir": str(run_dir),
        "output.name": name,
        "radiomics.rounds": rounds,
        "train.init-checkpoint": str(unet_checkpoint(runner, case, method, unet, rc, run_dir)),
        **NO_DEEP_PRIVACY,
        "model.norm": unet.cfg.norm,  # the checkpoint's (a DP run's U-Net has GroupNorm)
    }
    runner.log(f"  {method.name}: flwr run on {len(case.plans)} virtual SuperNodes (1 + {rounds} radiomics rounds)")
    runner.engine.run(overrides, len(case.plans), run_dir / f"{name}.log", on_line=runner._flower_progress(method.name))
    history = json.loads((run_dir / name / "history.json").read_text())
    key = {"scenario": case.name, "method": method.name, "seed": case.seed}
    runner.results.costs += [{**key, **row} for row in stage_costs(history)]
    for r in history["rounds"]:
        for f in r.get("failures", []) + r.get("rejected", []):
            runner.results.failures.append({**key, "round": r["round"], **f})
    path = run_dir / name / MODEL_FILE
    if not path.is_file():
        raise RuntimeError(f"{method.name}: the radiomics federation wrote no model ({path}); see {run_dir / name}")
    model = RadiomicsModel.load(path)
    runner.log(f"  {method.name}: L2 per marker {model.l2}")
    runner.record(case, method.name, scores(model, tests), calibration(model))
