"""The radiomics baseline's federation (``radiomics.rounds`` > 0): what the ServerApp runs instead of
the deep model's schedule.

1. A stats round (``query.radiomics_stats``): every site sends per-feature counts, sums and sums
   of squares of its training studies' features (``common.radiomics.feature_sums``) and their
   label counts; the server adds them up into the features' global mean and sd and each marker's
   pos-weight (negatives / positives, the paper's formula 2, as the deep loss).
2. ``radiomics.rounds`` rounds of FedAvg (``train.radiomics``): the global logistic weights of every
   L2 candidate go out, each site takes ``radiomics.local-steps`` gradient steps on its
   standardised training features, and the server averages the replies weighted by the sites'
   training studies (bounded as the deep train replies are, ``server.validation.bound_examples``).
3. After the last round, two evaluate phases (``evaluate.radiomics``) on the global U-Net of
   ``train.init-checkpoint`` (sent once per site, named by its digest after): "select", every
   site's validation sums of every candidate, from which each marker's L2 strength is chosen
   (highest pooled validation AUROC, ``common.radiomics.choose``); then "score", the chosen
   weights' scalar test metrics and validation sums, as a deep evaluate reply, from which the
   temperature and thresholds are chosen (``common.validation``).

Only sums, weight vectors and the deep evaluate reply's aggregates cross the network: never a
study's features or score (docs/design.md §5). Every reply passes its ``server.validation`` schema.
The run folder gets ``history.json`` (one round per FedAvg round, stage ``radiomics``) and the model,
``radiomics.json`` (``common.radiomics.RadiomicsModel``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import replace
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from common.config import MARKERS
from common.radiomics import (
    MODEL_FILE,
    N_FEATURES,
    RadiomicsModel,
    choose,
    chosen_stats,
    chosen_weights,
    initial_weights,
    pos_weight_of_counts,
    standardise,
)
from common.records import (
    CANDIDATES_PREFIX,
    CONFIG,
    FEATURE_N,
    FEATURE_SUM,
    FEATURE_SUMSQ,
    LABEL_NEG,
    LABEL_POS,
    METRICS,
    NUM_EXAMPLES,
    RADIOMICS_STAGE,
    RADIOMICS_WEIGHTS,
    SCORE_PHASE,
    SELECT_PHASE,
    RadiomicsInstruction,
)
from common.run_config import RadiomicsOptions, parse_run_config
from common.validation import ValidationStats, calibration_meta
from server.federation import Federation, wait_for_nodes
from server.history import History, finite_or_none
from server.replies import metrics_dict, retyped
from server.server_config import ServerRunConfig
from server.strategies import build_strategy
from server.validation import (
    RADIOMICS_EVALUATE_TYPE,
    RADIOMICS_STATS_TYPE,
    RADIOMICS_TRAIN_TYPE,
    array_specs,
    radiomics_score_schema,
    radiomics_select_schema,
    radiomics_stats_schema,
    radiomics_train_schema,
)


class RadiomicsFederation(Federation):
    """The radiomics schedule on a ``Federation``'s machinery: its grid, messenger (failures,
    rejections, bytes), history, example bounds and the global model (whose U-Net, from
    ``train.init-checkpoint``, segments the sites' validation and test studies)."""

    def __init__(self, grid: Grid, cfg: ServerRunConfig, radiomics: RadiomicsOptions) -> None:
        if not cfg.init_checkpoint:
            raise ValueError(
                "radiomics.rounds > 0 segments the sites' validation and test studies with the U-Net of "
                "train.init-checkpoint: set it to a trained model's checkpoint"
            )
        super().__init__(grid, cfg)
        self.radiomics = radiomics
        self.l2 = radiomics.l2_values
        self.strategy = build_strategy(replace(cfg.strategy, name="fedavg", imbalance_head=False))
        self.weights = np.stack([initial_weights() for _ in self.l2])  # [K, M, F + 1]
        self.mean, self.sd = np.zeros(N_FEATURES), np.ones(N_FEATURES)
        self.pos_weight = np.ones(len(MARKERS))

    def run(self) -> History:
        cfg, rounds = self.cfg, self.radiomics.rounds
        self.history.run = {
            **cfg.summary(),
            "radiomics": {"rounds": rounds, "local_steps": self.radiomics.local_steps, "lr": self.radiomics.lr},
            "output": str(self.out_dir),
        }
        log(
            INFO,
            "hemexp: radiomics baseline: a feature-sums round, %d FedAvg rounds of %d marker weight vectors "
            "x %d L2 strengths, output %s",
            rounds,
            len(MARKERS),
            len(self.l2),
            self.out_dir,
        )
        model = None
        for rnd in range(1, rounds + 1):
            t0 = time.perf_counter()
            entry: dict[str, Any] = {"round": rnd, "stage": RADIOMICS_STAGE, "failures": [], "rejected": []}
            log(INFO, "[ROUND %d/%d] stage %s (logistic weights)", rnd, rounds, RADIOMICS_STAGE)
            if rnd == 1 and not self.feature_stats(rnd, entry):
                entry["skipped"] = True
                self._save(entry, t0)
                log(WARNING, "radiomics: no site sent its feature sums; nothing to train")
                break
            entry["train"] = self.train_round(rnd, entry)
            if rnd == rounds:
                entry["evaluate"], model = self.evaluate_round(rnd, entry)
            self._save(entry, t0)
        if model is not None:
            path = model.save(self.out_dir / MODEL_FILE)
            log(INFO, "hemexp: run finished; radiomics model %s", path)
        else:
            log(WARNING, "hemexp: run finished without a radiomics model (see the failures in history.json)")
        return self.history

    def _save(self, entry: dict[str, Any], t0: float) -> None:
        entry["seconds"] = time.perf_counter() - t0
        self.history.add_round(entry)
        self.history.save()

    def _order(self, rnd: int, **fields: Any) -> RadiomicsInstruction:
        return RadiomicsInstruction(
            server_round=rnd,
            run_name=self.out_dir.name,
            lr=self.radiomics.lr,
            local_steps=self.radiomics.local_steps,
            l2=self.l2,
            pos_weight=tuple(self.pos_weight.tolist()),
            mean=tuple(self.mean.tolist()),
            sd=tuple(self.sd.tolist()),
            **fields,
        )

    # --- 1. the features' global statistics ---------------------------------------------------

    def feature_stats(self, rnd: int, entry: dict) -> bool:
        """The stats round: the summed feature sums give the global mean and sd, the summed study
        label counts each marker's pos-weight; the sites' studies bound their train weights later."""
        nodes = wait_for_nodes(self.grid, self.cfg.strategy.min_available_nodes, self.cfg.timeout)
        config = RadiomicsInstruction(server_round=rnd, run_name=self.out_dir.name).to_record()
        messages = [
            Message(
                RecordDict({CONFIG: config}), dst_node_id=n, message_type=RADIOMICS_STATS_TYPE, group_id=f"{rnd}-stats"
            )
            for n in nodes
        ]
        schema = radiomics_stats_schema(N_FEATURES, len(MARKERS), self.cfg.strategy.max_reply_mb)
        replies = self.messenger.exchange("radiomics stats", messages, entry, schema=schema)
        if not replies:
            return False
        sums = {k: np.sum([r.content[METRICS][k] for r in replies], axis=0) for k in STATS_KEYS}
        self.declared.update({self.messenger.site_of(r): float(r.content[METRICS][NUM_EXAMPLES]) for r in replies})
        self.mean, self.sd = standardise(sums[FEATURE_N], sums[FEATURE_SUM], sums[FEATURE_SUMSQ])
        self.pos_weight = pos_weight_of_counts(sums[LABEL_POS], sums[LABEL_NEG])
        entry["radiomics-stats"] = {
            "sites": len(replies),
            "studies": int(sum(float(r.content[METRICS][NUM_EXAMPLES]) for r in replies)),
            "pos": sums[LABEL_POS].tolist(),
            "neg": sums[LABEL_NEG].tolist(),
            "pos-weight": self.pos_weight.tolist(),
        }
        log(INFO, "radiomics stats: %d site(s), %d training studies", len(replies), entry["radiomics-stats"]["studies"])
        return True

    # --- 2. FedAvg of the logistic weights ------------------------------------------------------

    def train_round(self, rnd: int, entry: dict) -> dict[str, Any]:
        arrays = ArrayRecord({RADIOMICS_WEIGHTS: Array(self.weights)})
        messages = [
            retyped(m, RADIOMICS_TRAIN_TYPE)
            for m in self.strategy.configure_train(rnd, arrays, self._order(rnd).to_record(), self.grid)
        ]
        schema = radiomics_train_schema(array_specs(arrays), self.cfg.strategy.max_reply_mb)
        replies = self.messenger.exchange("radiomics train", messages, entry, schema=schema)
        usable = self._bound_weights(self._with_examples(replies, RADIOMICS_STAGE), entry)
        state, aggregated = self._aggregate(rnd, "radiomics weights", self.strategy, usable, entry)
        if state is not None:
            self.weights = state[RADIOMICS_WEIGHTS].numpy().astype(np.float64)
        return {
            "aggregated": aggregated,
            "sites": self._site_metrics(replies),
            "sent": len(messages),
            "received": len(replies),
        }

    # --- 3. choose on validation, then score ---------------------------------------------------

    def _evaluate(self, rnd: int, entry: dict, weights: np.ndarray, phase: str, schema) -> list[Message]:
        unet, digest = self._frozen_unet(2)
        arrays = ArrayRecord({RADIOMICS_WEIGHTS: Array(np.ascontiguousarray(weights))})
        order = self._order(rnd, phase=phase, unet_digest=digest).to_record()
        messages = [
            retyped(m, RADIOMICS_EVALUATE_TYPE) for m in self.strategy.configure_evaluate(rnd, arrays, order, self.grid)
        ]
        messages = self.messenger.attach_unet(messages, unet, digest)
        return self.messenger.exchange(f"radiomics {phase}", messages, entry, digest, schema)

    def evaluate_round(self, rnd: int, entry: dict) -> tuple[dict[str, Any], RadiomicsModel | None]:
        """Each marker's L2 strength chosen on the summed validation sums, then the chosen weights
        scored: the round's evaluate record (as a deep round's) and the model (None: no site answered)."""
        k, mb = len(self.l2), self.cfg.strategy.max_reply_mb
        replies = self._evaluate(rnd, entry, self.weights, SELECT_PHASE, radiomics_select_schema(k * len(MARKERS), mb))
        parts = [ValidationStats.from_metrics(r.content[METRICS], k * len(MARKERS), CANDIDATES_PREFIX) for r in replies]
        if not parts:
            return {}, None
        candidates = sum(parts[1:], parts[0])
        picks = choose(candidates, k)
        weights = chosen_weights(self.weights, picks)
        entry["radiomics-selection"] = {
            "l2": {m: self.l2[p] for m, p in zip(MARKERS, picks)},
            "validation_auroc": {
                f"l2={v:g}": {m: finite_or_none(a) for m, a in zip(MARKERS, row)}
                for v, row in zip(self.l2, candidates.auroc().reshape(k, -1).tolist())
            },
        }
        replies = self._evaluate(rnd, entry, weights[None], SCORE_PHASE, radiomics_score_schema(MARKERS, mb))
        meta = self.calibration(replies) or self.calibration_of(chosen_stats(candidates, picks))
        sites = {self.messenger.site_of(r): _scalars(metrics_dict(r.content[METRICS])) for r in replies}
        aggregated = self.strategy.aggregate_evaluate(rnd, replies) if replies else None
        out = {
            "aggregated": _scalars(metrics_dict(aggregated)) if aggregated is not None else {},
            "sites": sites,
            "validation": meta.get("validation", {}),
        }
        log(
            INFO,
            "round %d: %d site(s) evaluated the radiomics model: test macro AUC (study) %s; validation score %s",
            rnd,
            len(replies),
            _fmt(out["aggregated"].get("macro_auc_study")),
            _fmt(out["validation"].get("score")),
        )
        l2 = {m: float(self.l2[p]) for m, p in zip(MARKERS, picks)}
        return out, RadiomicsModel(self.mean, self.sd, weights, l2, {**meta, "rounds": self.radiomics.rounds})

    def calibration(self, replies: list[Message]) -> dict[str, Any]:
        """The chosen weights' summed validation sums (``val/``) -> temperature, thresholds, score."""
        stats, _ = self.messenger.summed_validation(replies, len(MARKERS))
        return self.calibration_of(stats) if stats is not None else {}

    def calibration_of(self, stats: ValidationStats) -> dict[str, Any]:
        meta = calibration_meta(stats, MARKERS, self.cfg.target_sensitivity)
        auc = stats.auroc()
        meta["validation"] = {
            "metric": "macro_auroc_study",
            "score": stats.macro_auroc(range(len(MARKERS))),
            "dice": stats.dice(),
            "auroc_study": {n: float(v) for n, v in zip(MARKERS, auc)},
        }
        return meta


#: The summed keys of a stats reply.
STATS_KEYS = (FEATURE_N, FEATURE_SUM, FEATURE_SUMSQ, LABEL_POS, LABEL_NEG)


def _scalars(metrics: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if not isinstance(v, list)}


def _fmt(value: Any) -> str:
    return "n/a" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.3f}"


def run_radiomics_federation(grid: Grid, run_config: Mapping[str, Any]) -> History:
    """The radiomics schedule on ``grid`` (``radiomics.rounds`` > 0); callable from tests."""
    cfg = parse_run_config(run_config)
    return RadiomicsFederation(grid, ServerRunConfig.from_config(cfg), cfg.radiomics).run()
