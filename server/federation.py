"""One federated run on the coordinator: stage-aware, class-imbalance-aware federated training.

Round schedule: ``rounds.stage1`` rounds that exchange only the U-Net, then ``rounds.gan`` rounds of
the federated GAN stage (0 by default; the conditional SNGAN's G and D trained at the sites and
FedAvg'd, docs/gan.md design (i)), then ``rounds.stage2`` rounds that exchange only the classifier
(the U-Net frozen at the sites, paper §4; after a GAN stage every site samples its augmentation from
the final global generator, sent once per site). Before the first
stage-2 round a counts round (``server.counts``) asks every site for its per-label positive/negative
counts; the server sums them and sends the global ``pos-weight`` = negatives / positives (paper
formula 2) with every stage-2 round, so every site optimises the same weighted loss.

After every round the server assembles the full global model, has every site evaluate it on its
own held-out patients, and hands the results to ``server.history`` (per-site and aggregated
metrics) and ``server.checkpoints`` (one checkpoint per round; ``resume = true`` continues from the
last one). Failed sites and replies that break a rule of ``server.validation`` are handled by
``server.replies``: the round goes on with the others; ``num-examples`` is bounded before FedAvg
weights by it (``server.validation.bound_examples``).

Model selection is on validation, never on test: every site also scores the global model on its
validation patients and sends sums only (``common.validation.ValidationStats``), and those only masked
(``server.secure_validation``): the server learns their total over the sites, never one site's. From
the total it scores the round (stage 2: pooled validation macro study-AUROC over the markers; stage 1:
pooled validation Dice), fits a temperature per marker and picks each marker's threshold (Youden,
or ``eval.target-sensitivity``). Every round checkpoint carries these in its meta (``temperature``,
``thresholds``, ``validation``); ``best.pt`` is the round with the best score (a stage-2 round
whenever there is one: stage-1 rounds have an untrained classifier).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import replace
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.exception import AggregationError, InconsistentMessageReplies
from flwr.serverapp.strategy import Strategy
from torch import Tensor, nn

from common.checkpoint import load_checkpoint
from common.config import LABELS
from common.gan import build_gan, gan_state_dict, get_gan_preset, load_gan_state_dict, with_unit_power_vectors
from common.losses import pos_weight_from_counts
from common.model import JointModel, build_joint_model, half_state_dict, load_half_state_dict, norm_state_keys
from common.records import (
    ARRAYS,
    CONFIG,
    GAN_STAGE,
    HALF_OF_STAGE,
    METRICS,
    NUM_EXAMPLES,
    SECURE_PHASE,
    EvaluateInstruction,
    GanInstruction,
    TrainInstruction,
    arrays_digest,
    record_to_state,
    state_to_record,
)
from common.run_config import strategy_traits
from common.validation import calibration_meta, selectable, selection_score
from server.census import run_census, write_census
from server.checkpoints import (
    latest_checkpoint,
    publish_best,
    publish_final,
    round_checkpoint_path,
    save_round_checkpoint,
)
from server.counts import count_labels
from server.history import History
from server.replies import Messenger, idle_reason, metrics_dict, retyped, with_metric
from server.secure_counts import public_keys
from server.secure_updates import secure_train
from server.secure_validation import secure_validation_sum, validation_session
from server.server_config import ServerRunConfig, resolve_run_dir
from server.site_dp import with_site_dp
from server.strategies import build_strategy
from server.validation import (
    GAN_MESSAGE_TYPE,
    array_specs,
    bound_examples,
    counts_schema,
    evaluate_schema,
    gan_schema,
    train_schema,
    validation_step_schema,
)

#: What a round of each stage exchanges, for the log.
EXCHANGED = {**HALF_OF_STAGE, GAN_STAGE: "generator and discriminator"}


class Federation:
    """One federated run: the global model, the schedule, and what the server learns about sites."""

    def __init__(self, grid: Grid, cfg: ServerRunConfig) -> None:
        self.grid, self.cfg = grid, cfg
        self.model = build_joint_model(cfg.model, seed=cfg.seed)
        if cfg.init_checkpoint:
            load_initial_weights(self.model, cfg.init_checkpoint)
        self.local_keys = norm_state_keys(self.model) if strategy_traits(cfg.strategy.name).site_norms else set()
        head = final_layer_keys(self.model)
        # One strategy per stage: server-side optimiser state is per array, and stages exchange different arrays.
        # With privacy.site-dp each sits inside Flower's fixed-clipping wrapper (server.site_dp).
        self.strategies: dict[int, Strategy] = {
            s: with_site_dp(build_strategy(cfg.strategy, local_keys=self.local_keys, head_keys=head), cfg.privacy)
            for s in HALF_OF_STAGE
        }
        self.out_dir = resolve_run_dir(cfg)
        self.history = History(self.out_dir)
        self.start_round = 0
        self.messenger = Messenger(grid, cfg.timeout)
        self.counts: tuple[np.ndarray, np.ndarray] | None = None
        self.declared: dict[str, float] = {}  # site -> training slices it declared in the counts round
        self.best: tuple[int, float] | None = None  # (stage, validation score) of best.pt
        # rounds.gan > 0: the global G and D (built from the run's seed), FedAvg'd by num-examples (crops)
        self.gan = build_gan(get_gan_preset(cfg.gan.preset), seed=cfg.seed) if cfg.rounds_gan else None
        self.gan_strategy = build_strategy(replace(cfg.strategy, name="fedavg", imbalance_head=False))

    # --- the schedule --------------------------------------------------------------------

    def run(self) -> History:
        cfg = self.cfg
        if cfg.resume:
            self._resume()
        self.history.run = {**cfg.summary(), "output": str(self.out_dir)}
        if cfg.census == "only":
            self.census()
            self.history.save()
            log(INFO, "hemexp: run finished: census only (rounds.census = only), no training")
            return self.history
        log(
            INFO,
            "hemexp: %d stage-1 + %d GAN + %d stage-2 rounds, strategy %s%s%s, output %s",
            cfg.rounds_stage1,
            cfg.rounds_gan,
            cfg.rounds_stage2,
            cfg.strategy.name,
            " + imbalance-aware head" if cfg.strategy.imbalance_head else "",
            "" if cfg.privacy.site_dp == "off" else f" + site-level DP ({cfg.privacy.site_dp})",
            self.out_dir,
        )
        if cfg.census == "before" and self.start_round == 0:
            self.census()
        last = None
        for rnd in range(self.start_round + 1, cfg.total_rounds + 1):
            t0 = time.perf_counter()
            stage = cfg.stage_of(rnd)
            entry: dict[str, Any] = {"round": rnd, "stage": stage, "failures": [], "rejected": []}
            log(INFO, "[ROUND %d/%d] stage %s (%s)", rnd, cfg.total_rounds, stage, EXCHANGED[stage])
            if stage == GAN_STAGE:  # the joint model does not change: nothing to evaluate
                entry["train"], entry["evaluate"], calibration = self.gan_round(rnd, entry), {}, {}
            else:
                entry["train"] = self.train_round(rnd, stage, entry)
                entry["evaluate"], calibration = (
                    self.evaluate_round(rnd, stage, entry) if cfg.evaluates(rnd) else ({}, {})
                )
            entry["seconds"] = time.perf_counter() - t0
            self.history.add_round(entry)
            self.history.save()
            meta = {
                "method": "federated",
                "strategy": cfg.strategy.name,
                "round": rnd,
                "stage": stage,
                "seed": cfg.seed,
            }
            gan = gan_state_dict(*self.gan) if stage == GAN_STAGE else None  # never in a stage-2 checkpoint
            last = save_round_checkpoint(
                self.out_dir, self.model, cfg.model, cfg.preprocess, meta | calibration, cfg.keep_checkpoints, gan
            )
            self._keep_if_best(last, stage, calibration.get("validation", {}).get("score"))
        if last is not None:
            publish_final(self.out_dir, last)
        log(INFO, "hemexp: run finished; global model %s", self.out_dir / "global.pt")
        return self.history

    def census(self) -> None:
        """The data census before round 1 (``server.census``): census.json and census.html in the run's folder."""
        entry: dict[str, Any] = {"round": 0, "failures": []}
        nodes = wait_for_nodes(self.grid, self.cfg.strategy.min_available_nodes, self.cfg.timeout)
        result = run_census(nodes, lambda phase, msgs: self.messenger.exchange(phase, msgs, entry))
        page = write_census(self.out_dir, result)
        self.history.run["census"] = {
            "html": str(page),
            "sites": sorted(result["sites"]),
            "failures": entry["failures"],
        }
        log(INFO, "census: %s", page)

    def _keep_if_best(self, path, stage: int, score: float | None) -> None:
        """``best.pt``: a later stage beats an earlier one; within a stage, the higher validation score."""
        if score is None or math.isnan(score):
            return
        if self.best is None or (stage, score) > self.best:
            self.best = (stage, score)
            publish_best(self.out_dir, path)
            log(INFO, "best.pt: round %s (stage %d, validation score %.3f)", path.stem, stage, score)

    def _resume(self) -> None:
        ckpt = latest_checkpoint(self.out_dir)
        if ckpt is None:
            log(INFO, "resume: no checkpoint in %s, starting at round 1", self.out_dir)
            return
        if ckpt.model_config != self.cfg.model:
            raise ValueError(
                f"{self.out_dir}: its checkpoints hold another model config; "
                "resume with the run's original model.* settings"
            )
        self.model.load_state_dict(ckpt.state_dict, strict=True)
        self.start_round = int(ckpt.meta["round"])
        self._resume_gan()
        self.history = History.load(self.out_dir, up_to_round=self.start_round)
        best = self.out_dir / "best.pt"
        if best.is_file():
            meta = load_checkpoint(best).meta
            self.best = (int(meta["stage"]), float(meta["validation"]["score"]))
        log(INFO, "resume: continuing %s after round %d", self.out_dir, self.start_round)

    def _resume_gan(self) -> None:
        """The global G and D after the last GAN round already run: from that round's checkpoint."""
        last_gan = min(self.start_round, self.cfg.rounds_stage1 + self.cfg.rounds_gan)
        if self.gan is None or last_gan <= self.cfg.rounds_stage1:
            return
        path = round_checkpoint_path(self.out_dir, last_gan)
        gan = load_checkpoint(path).gan if path.is_file() else None
        if gan is None:
            raise ValueError(
                f"resume: {path} (the last GAN round's G and D) is missing or holds no GAN state; "
                "output.keep-checkpoints may have removed it"
            )
        load_gan_state_dict(*self.gan, gan)

    # --- one round -----------------------------------------------------------------------

    def train_round(self, rnd: int, stage: int, entry: dict) -> dict[str, Any]:
        cfg, half, strategy, messenger = self.cfg, HALF_OF_STAGE[stage], self.strategies[stage], self.messenger
        pos_weight = None
        if stage == 2:
            if self.counts is None:
                self.counts = self.count_labels(rnd, entry)
            if self.counts is not None:
                weights = tuple(pos_weight_from_counts(*self.counts, max_weight=cfg.max_pos_weight).tolist())
                entry["label-counts"] = {
                    "pos": self.counts[0].tolist(),
                    "neg": self.counts[1].tolist(),
                    "pos-weight": list(weights),
                    "pos-weight-mode": cfg.pos_weight,
                }
                pos_weight = weights if cfg.pos_weight == "global" else None
        unet, digest = self._frozen_unet(stage)
        generator, gan_digest = self._global_generator(stage)
        order = TrainInstruction(
            server_round=rnd,
            stage=stage,
            lr=cfg.lr if stage == 1 else cfg.lr_stage2,
            local_epochs=cfg.local_epochs,
            local_steps=cfg.local_steps[stage],
            pos_weight=pos_weight,
            unet_digest=digest,
            run_name=self.out_dir.name,
            gan_digest=gan_digest,
        )
        arrays = state_to_record(half_state_dict(self.model, half))
        messages = messenger.attach_unet(
            strategy.configure_train(rnd, arrays, order.to_record(), self.grid), unet, digest
        )
        messages = messenger.attach_generator(messages, generator, gan_digest)
        if cfg.secure_updates:  # masked updates: validated by the secure protocol's own checks
            return self._secure_train_round(rnd, half, strategy, messages, entry, digest)
        n_labels, max_mb = len(cfg.model.output_names), cfg.strategy.max_reply_mb
        schema = train_schema(array_specs(arrays, exclude=self.local_keys), n_labels, stage, max_mb)
        replies = messenger.exchange("train", messages, entry, digest, schema, generator=gan_digest)
        usable = self._bound_weights(self._with_examples(replies, stage), entry)
        aggregated = self._aggregate_train(rnd, half, strategy, usable, entry)
        return {
            "aggregated": aggregated,
            "sites": self._site_metrics(replies),
            "sent": len(messages),
            "received": len(replies),
        }

    def gan_round(self, rnd: int, entry: dict) -> dict[str, Any]:
        """One round of the GAN stage: the global G and D to every sampled site (``train.gan``), each
        trains them on its crops; their mean weighted by num-examples (crops) becomes the global pair.
        Replies pass ``server.validation.gan_schema`` (the exact G and D arrays), weights
        ``bound_examples``; a failed, rejected or idle (0 crops) site is logged and left out."""
        assert self.gan is not None
        messenger, strategy = self.messenger, self.gan_strategy
        order = GanInstruction(server_round=rnd, local_steps=self.cfg.gan.local_steps, run_name=self.out_dir.name)
        arrays = state_to_record(gan_state_dict(*self.gan))
        messages = [
            retyped(m, GAN_MESSAGE_TYPE) for m in strategy.configure_train(rnd, arrays, order.to_record(), self.grid)
        ]
        replies = messenger.exchange(
            GAN_STAGE, messages, entry, schema=gan_schema(array_specs(arrays), self.cfg.strategy.max_reply_mb)
        )
        usable = self._bound_weights(self._with_examples(replies, GAN_STAGE), entry)
        state, aggregated = self._aggregate(rnd, EXCHANGED[GAN_STAGE], strategy, usable, entry)
        if state is not None:  # power-iteration vectors back to unit length (common.gan.with_unit_power_vectors)
            load_gan_state_dict(*self.gan, with_unit_power_vectors(in_dtypes_of(state, gan_state_dict(*self.gan))))
        return {
            "aggregated": aggregated,
            "sites": self._site_metrics(replies),
            "sent": len(messages),
            "received": len(replies),
        }

    def _site_metrics(self, replies: list[Message]) -> dict[str, dict[str, Any]]:
        return {self.messenger.site_of(r): metrics_dict(r.content[METRICS]) for r in replies}

    def _with_examples(self, replies: list[Message], stage: int | str) -> list[Message]:
        """The replies with num-examples > 0; the others are logged (why: ``idle_reason``) and left out."""
        usable = []
        for r in replies:
            if float(r.content[METRICS][NUM_EXAMPLES]) > 0:
                usable.append(r)
                continue
            why = idle_reason(r.content[METRICS])
            log(INFO, "train: site %s %s in stage %s; left out of the aggregate", self.messenger.site_of(r), why, stage)
        return usable

    def _global_generator(self, stage: int) -> tuple[ArrayRecord | None, str]:
        """Stage 2 after a GAN stage: the final global generator (G only) and its digest, for the sites to sample from."""
        if stage != 2 or self.gan is None:
            return None, ""
        generator = state_to_record(gan_state_dict(self.gan[0]))
        return generator, arrays_digest(generator)

    def _bound_weights(self, replies: list[Message], entry: dict) -> list[Message]:
        """Cap each reply's ``num-examples`` by ``server.validation.bound_examples``; the capped sites
        are logged and listed under the round's ``capped`` with the weight they get."""
        site_of = self.messenger.site_of
        claimed = {site_of(r): float(r.content[METRICS][NUM_EXAMPLES]) for r in replies}
        caps = bound_examples(claimed, self.declared, self.cfg.strategy.max_examples_factor)
        bounded = []
        for r in replies:
            site = site_of(r)
            if site in caps:
                r = with_metric(r, NUM_EXAMPLES, int(caps[site]))
                log(WARNING, "train: %s num-examples above its bound; weighted by %d", site, int(caps[site]))
                entry.setdefault("capped", []).append(
                    {"site": site, "node": r.metadata.src_node_id, "key": NUM_EXAMPLES, "weight": int(caps[site])}
                )
            bounded.append(r)
        return [r for r in bounded if float(r.content[METRICS][NUM_EXAMPLES]) > 0]

    def _secure_train_round(
        self, rnd: int, half: str, strategy: Strategy, messages: list[Message], entry: dict, digest: str
    ) -> dict[str, Any]:
        """``privacy.secure-updates``: the sites' masked updates unmasked as their weighted mean only
        (``server.secure_updates``), handed to the strategy as one reply standing for the survivors."""
        messenger = self.messenger

        def exchange(phase: str, msgs: list[Message]) -> list[Message]:
            return messenger.exchange(phase, msgs, entry, digest if phase == "train" else "")

        sent = record_to_state(messages[0].content[ARRAYS]) if messages else {}
        result = secure_train(messages, exchange, rnd, {k: v.numpy() for k, v in sent.items()}, messenger.site_name)
        sites = self._site_metrics(result.replies)
        trained = sum(1 for r in result.replies if float(r.content[METRICS][NUM_EXAMPLES]) > 0)
        usable = [result.aggregate] if result.aggregate is not None else []
        aggregated = self._aggregate_train(rnd, half, strategy, usable, entry, counted=trained if usable else 0)
        return {"aggregated": aggregated, "sites": sites, "sent": len(messages), "received": len(result.replies)}

    def _aggregate_train(
        self, rnd: int, half: str, strategy: Strategy, replies: list[Message], entry: dict, counted: int | None = None
    ) -> dict:
        """The half's aggregate loaded into the global model; the aggregated metrics returned."""
        state, metrics = self._aggregate(rnd, half, strategy, replies, entry, counted)
        if state is not None:
            full = half_state_dict(self.model, half)
            full.update(state)  # FedBN: the server's norm keys stay as they were
            load_half_state_dict(self.model, half, full)
        return metrics

    def _aggregate(
        self, rnd: int, what: str, strategy: Strategy, replies: list[Message], entry: dict, counted: int | None = None
    ) -> tuple[dict | None, dict]:
        """The strategy's aggregate of ``replies`` as a state dict (None when the round's aggregation is
        skipped: too few usable replies, a failure without ``accept-failures``, or the strategy refused)
        and the aggregated metrics. ``counted``: how many sites the replies stand for (secure updates:
        one reply for all)."""
        cfg = self.cfg
        needed = getattr(strategy, "min_train_nodes", 1)
        n = len(replies) if counted is None else counted
        if n < max(needed, 1) or (entry["failures"] and not cfg.strategy.accept_failures):
            log(
                WARNING,
                "round %d: %d usable repl%s (%d needed), %d failure(s), accept-failures=%s: "
                "the global %s stays as it was",
                rnd,
                n,
                "y" if n == 1 else "ies",
                needed,
                len(entry["failures"]),
                cfg.strategy.accept_failures,
                what,
            )
            entry["skipped"] = True
            return None, {}
        try:
            arrays, metrics = strategy.aggregate_train(rnd, replies)
        except (InconsistentMessageReplies, AggregationError) as exc:
            log(WARNING, "round %d: aggregation failed (%s); the global %s stays as it was", rnd, exc, what)
            entry["skipped"] = True
            return None, {}
        state = record_to_state(arrays) if arrays is not None else None
        return state, metrics_dict(metrics) if metrics is not None else {}

    def evaluate_round(self, rnd: int, stage: int, entry: dict) -> tuple[dict[str, Any], dict[str, Any]]:
        """Every sampled site scores the global model; only the half of this stage is sent.

        Returns the round's record (test metrics, per site and aggregated: scalars only) and the
        checkpoint meta chosen on the summed validation statistics (``calibration_on_validation``).
        """
        strategy, messenger = self.strategies[stage], self.messenger
        unet, digest = self._frozen_unet(stage)
        chosen = selectable(stage, self.cfg.rounds_stage2)  # its validation sums come, masked, with the reply
        order = EvaluateInstruction(
            server_round=rnd,
            stage=stage,
            unet_digest=digest,
            run_name=self.out_dir.name,
            secure_session=validation_session(rnd) if chosen else "",
        )
        arrays = state_to_record(half_state_dict(self.model, HALF_OF_STAGE[stage]))
        messages = messenger.attach_unet(
            strategy.configure_evaluate(rnd, arrays, order.to_record(), self.grid), unet, digest
        )
        if not messages:
            return {}, {}
        schema = evaluate_schema(self.cfg.model.output_names, self.cfg.strategy.max_reply_mb, secure_keys=chosen)
        replies = messenger.exchange("evaluate", messages, entry, digest, schema)
        sites = {messenger.site_of(r): _scalars(metrics_dict(r.content[METRICS])) for r in replies}
        aggregated = None
        if replies:
            try:
                aggregated = strategy.aggregate_evaluate(rnd, replies)
            except InconsistentMessageReplies as exc:
                log(WARNING, "round %d: evaluation replies inconsistent (%s)", rnd, exc)
        out = {"aggregated": _scalars(metrics_dict(aggregated)) if aggregated is not None else {}, "sites": sites}
        calibration = self.calibration_on_validation(rnd, stage, replies, entry)
        out["validation"] = calibration.get("validation", {})
        agg = out["aggregated"]
        log(
            INFO,
            "round %d: %d site(s) evaluated: test dice %s, test macro AUC (study) %s; validation score %s",
            rnd,
            len(replies),
            _fmt(agg.get("dice")),
            _fmt(agg.get("macro_auc_study")),
            _fmt(out["validation"].get("score")),
        )
        return out, calibration

    def calibration_on_validation(self, rnd: int, stage: int, replies: list[Message], entry: dict) -> dict[str, Any]:
        """The sites' validation sums added up: the round's selection score, per-marker temperature
        and thresholds (``common.validation``). The server sees only the total over the sites that
        replied: the sums are summed securely (``server.secure_validation``), never one site's.
        Rounds that cannot be chosen (``selectable``) carry no sums: the sites skip them, and so does this."""
        if not selectable(stage, self.cfg.rounds_stage2):
            return {}
        names = list(self.cfg.model.output_names)

        def exchange(phase: str, msgs: list[Message]) -> list[Message]:
            step = str(msgs[0].content[CONFIG][SECURE_PHASE]) if msgs else ""
            schema = validation_step_schema(step, len(names), self.cfg.strategy.max_reply_mb)
            return self.messenger.exchange(phase, msgs, entry, schema=schema)

        summed = secure_validation_sum(
            public_keys(replies), exchange, rnd, len(names), site_name=self.messenger.site_name
        )
        if summed is None:
            return {}
        stats, n_sites = summed
        markers = [c for c, n in enumerate(names) if n != LABELS[-1]]
        score = selection_score(stats, stage, markers)
        meta = calibration_meta(stats, names, self.cfg.target_sensitivity)
        metric = "macro_auroc_study" if stage == 2 else "dice"
        meta["validation"] = {"metric": metric, "score": score, "sites": n_sites, "dice": stats.dice()}
        meta["validation"]["auroc_study"] = {n: float(v) for n, v in zip(names, stats.auroc())}
        return meta

    def _frozen_unet(self, stage: int) -> tuple[ArrayRecord | None, str]:
        """Stage 2: the global U-Net the sites train and evaluate on (FedBN: without its norm layers)."""
        if stage == 1:
            return None, ""
        unet = state_to_record(half_state_dict(self.model, "unet"), exclude=self.local_keys)
        return unet, arrays_digest(unet)

    def count_labels(self, rnd: int, entry: dict) -> tuple[np.ndarray, np.ndarray] | None:
        """The counts round (``server.counts``), its failures logged in this round's ``entry``."""
        n_labels = len(self.cfg.model.output_names)

        def exchange(phase: str, msgs: list[Message]) -> list[Message]:
            step = str(msgs[0].content[CONFIG].get(SECURE_PHASE, "")) if msgs else ""
            schema = counts_schema(step, n_labels, self.cfg.strategy.max_reply_mb)
            good = self.messenger.exchange(phase, msgs, entry, schema=schema)
            self.declared.update(
                {
                    self.messenger.site_of(r): float(r.content[METRICS][NUM_EXAMPLES])
                    for r in good
                    if NUM_EXAMPLES in r.content[METRICS]
                }
            )
            return good

        return count_labels(
            self.grid.get_node_ids(),
            exchange,
            rnd,
            n_labels,
            secure=self.cfg.secure_counts,
            site_name=self.messenger.site_name,
        )


def load_initial_weights(model: JointModel, path: str) -> None:
    """``train.init-checkpoint``: start from a checkpoint (e.g. pretrained on synthetic data, no
    privacy cost) of the same architecture; every site receives it with round 1."""
    ckpt = load_checkpoint(path)
    try:
        model.load_state_dict(ckpt.state_dict, strict=True)
    except RuntimeError as exc:
        raise ValueError(
            f"train.init-checkpoint {path}: its architecture differs from the run's model.* "
            f"(with privacy.dp the norm is group): {str(exc).splitlines()[0]}"
        ) from None
    log(INFO, "train.init-checkpoint: the global model starts from %s", path)


def in_dtypes_of(state: Mapping[str, Tensor], like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """An aggregate in the dtypes of ``like``: a mean of integer counters (batch norm's steps) is
    rounded, where loading the float into the integer buffer would truncate it."""
    return {k: (v if like[k].is_floating_point() else v.round()).to(like[k].dtype) for k, v in state.items()}


def final_layer_keys(model: JointModel) -> tuple[str, str]:
    """State-dict keys (weight, bias) of the classifier's last linear layer: one row per label."""
    name = [n for n, m in model.classifier.named_modules() if isinstance(m, nn.Linear)][-1]
    return f"classifier.{name}.weight", f"classifier.{name}.bias"


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    """A reply's metrics without the validation sums (lists): what the history keeps per round."""
    return {k: v for k, v in metrics.items() if not isinstance(v, list)}


def _fmt(value: Any) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def wait_for_nodes(grid: Grid, needed: int, timeout: float | None, poll: float = 1.0) -> list[int]:
    """The connected nodes once ``needed`` are there (or ``timeout`` s passed): a census asks every one."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < needed and (deadline is None or time.monotonic() < deadline):
        time.sleep(poll)
    return nodes


def run_federation(grid: Grid, run_config: Mapping[str, Any]) -> History:
    """Run the whole schedule on ``grid``; what ``main`` does, callable from tests and benchmarks."""
    return Federation(grid, ServerRunConfig.from_run_config(run_config)).run()
