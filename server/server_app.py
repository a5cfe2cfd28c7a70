"""The coordinator's Flower ServerApp: stage-aware, class-imbalance-aware federated training.

Round schedule: ``rounds.stage1`` rounds that exchange only the U-Net, then ``rounds.stage2`` rounds
that exchange only the classifier (the U-Net frozen at the sites, paper §4). Before the first
stage-2 round a counts round asks every site for its per-label positive/negative counts; the
server sums them and sends the global ``pos-weight`` = negatives / positives (paper formula 2)
with every stage-2 round, so every site optimises the same weighted loss.

After every round the server assembles the full global model, has every site evaluate it on its
own held-out patients, and hands the results to ``server.history`` (per-site and aggregated
metrics) and ``server.checkpoints`` (one checkpoint per round; ``resume = true`` continues from the
last one). Sites that fail, time out or vanish are logged with their site id and node id and the
reason, and the round goes on with the others. A train reply holding a NaN or infinite value is
rejected before aggregation (logged, and listed under the round's ``rejected``), and the round
aggregates the others: no strategy survives a NaN (the median of a column holding one is NaN).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.exception import AggregationError, InconsistentMessageReplies
from flwr.serverapp.strategy import Strategy
from torch import nn

from common.config import PreprocessConfig
from common.losses import pos_weight_from_counts
from common.model import JointModel, build_joint_model, half_state_dict, load_half_state_dict, norm_state_keys
from common.presets import ModelConfig
from common.records import (
    CONFIG,
    FROZEN_UNET,
    HALF_OF_STAGE,
    LABEL_NEG,
    LABEL_POS,
    METRICS,
    NUM_EXAMPLES,
    PRIVACY_EPSILON,
    PRIVACY_EXHAUSTED,
    SERVER_ROUND,
    SITE,
    SITE_ID,
    EvaluateInstruction,
    TrainInstruction,
    arrays_digest,
    model_from_run_config,
    pos_weight_mode,
    record_to_state,
    run_value,
    state_to_record,
)
from server.checkpoints import latest_checkpoint, publish_final, save_round_checkpoint
from server.history import History, finite_or_none
from server.secure_counts import secure_label_counts
from server.strategies import StrategyConfig, build_strategy

app = ServerApp()

#: How often the server asks for replies. Flower's own ``Grid.send_and_receive`` waits 3 s between
#: pulls, which adds up to 3 s to each of a round's two or three exchanges.
POLL_SECONDS = 0.2


@dataclass(frozen=True)
class ServerRunConfig:
    """The run config the server reads, typed (keys and defaults: ``[tool.flwr.app.config]``)."""

    model: ModelConfig
    preprocess: PreprocessConfig
    seed: int
    rounds_stage1: int
    rounds_stage2: int
    timeout: float | None
    lr: float
    lr_stage2: float
    local_epochs: int
    local_steps: int
    max_pos_weight: float | None
    pos_weight: str
    strategy: StrategyConfig
    output_dir: Path
    run_name: str
    keep_checkpoints: int
    resume: bool
    #: ``privacy.secure-counts``: the counts round is a secure sum (server.secure_counts).
    secure_counts: bool = False

    @classmethod
    def from_run_config(cls, rc: Mapping[str, Any]) -> ServerRunConfig:
        model, pre = model_from_run_config(rc)
        v = lambda key: run_value(rc, key)  # noqa: E731
        strategy = StrategyConfig(
            name=str(v("strategy.name")),
            fraction_train=float(v("strategy.fraction-train")),
            fraction_evaluate=float(v("strategy.fraction-evaluate")),
            min_train_nodes=int(v("strategy.min-train-nodes")),
            min_evaluate_nodes=int(v("strategy.min-evaluate-nodes")),
            min_available_nodes=int(v("strategy.min-available-nodes")),
            accept_failures=bool(v("strategy.accept-failures")),
            imbalance_head=bool(v("strategy.imbalance-head")),
            proximal_mu=float(v("strategy.proximal-mu")),
            server_lr=float(v("strategy.server-lr")),
            tau=float(v("strategy.tau")),
            trim_beta=float(v("strategy.trim-beta")),
            num_malicious=int(v("strategy.num-malicious")),
        )
        lr = float(v("train.lr"))
        rounds = int(v("rounds.stage1")), int(v("rounds.stage2"))
        if min(rounds) < 0 or sum(rounds) == 0:
            raise ValueError(f"rounds.stage1 and rounds.stage2 must be >= 0 and not both 0, got {rounds}")
        timeout = float(v("rounds.timeout"))
        max_w = float(v("train.max-pos-weight"))
        secure_counts = bool(v("privacy.secure-counts"))
        if secure_counts and strategy.imbalance_head:
            raise ValueError(
                "strategy.imbalance-head weights each head row by every site's own positive counts, "
                "which privacy.secure-counts keeps from the server (only their sum is learnt): "
                "switch one of the two off"
            )
        return cls(
            model=model,
            preprocess=pre,
            seed=int(v("seed")),
            rounds_stage1=rounds[0],
            rounds_stage2=rounds[1],
            timeout=timeout if timeout > 0 else None,
            lr=lr,
            lr_stage2=float(v("train.lr-stage2")) or lr,
            local_epochs=int(v("train.local-epochs")),
            local_steps=int(v("train.local-steps")),
            max_pos_weight=max_w if max_w > 0 else None,
            pos_weight=pos_weight_mode(rc),
            strategy=strategy,
            output_dir=Path(str(v("output.dir"))).expanduser().resolve(),
            run_name=str(v("output.name")),
            keep_checkpoints=int(v("output.keep-checkpoints")),
            resume=bool(v("resume")),
            secure_counts=secure_counts,
        )

    @property
    def total_rounds(self) -> int:
        return self.rounds_stage1 + self.rounds_stage2

    def stage_of(self, server_round: int) -> int:
        return 1 if server_round <= self.rounds_stage1 else 2

    def summary(self) -> dict[str, Any]:
        return {
            "model": self.model.to_dict(),
            "preprocess": self.preprocess.to_dict(),
            "seed": self.seed,
            "rounds": {"stage1": self.rounds_stage1, "stage2": self.rounds_stage2},
            "lr": self.lr,
            "lr_stage2": self.lr_stage2,
            "local_epochs": self.local_epochs,
            "local_steps": self.local_steps,
            "max_pos_weight": self.max_pos_weight,
            "pos_weight": self.pos_weight,
            "strategy": asdict(self.strategy),
            "secure_counts": self.secure_counts,
        }


def resolve_run_dir(cfg: ServerRunConfig) -> Path:
    """The run's output folder: ``output.dir/output.name``. An empty name is a new timestamped
    folder, or with ``resume`` the most recent one. A named folder that already holds checkpoints
    is only reused with ``resume`` (no run silently overwrites another)."""
    if cfg.run_name:
        out = cfg.output_dir / cfg.run_name
        if not cfg.resume and (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()):
            raise FileExistsError(
                f"{out} already holds a run: set resume = true to continue it, or choose another output.name"
            )
        return out
    if cfg.resume:
        runs = (
            sorted(p for p in cfg.output_dir.glob("*") if (p / "checkpoints").is_dir())
            if cfg.output_dir.is_dir()
            else []
        )
        if runs:
            return max(runs, key=lambda p: p.stat().st_mtime)
    return cfg.output_dir / datetime.now().strftime("%Y%m%d-%H%M%S")


def final_layer_keys(model: JointModel) -> tuple[str, str]:
    """State-dict keys (weight, bias) of the classifier's last linear layer: one row per label."""
    name = [n for n, m in model.classifier.named_modules() if isinstance(m, nn.Linear)][-1]
    return f"classifier.{name}.weight", f"classifier.{name}.bias"


def metrics_dict(record: MetricRecord) -> dict[str, Any]:
    """A MetricRecord as plain JSON-able values (NaN as None)."""
    return {
        k: (list(v) if isinstance(v, list) else finite_or_none(float(v)) if isinstance(v, float) else v)
        for k, v in record.items()
    }


def _with_record(msg: Message, name: str, record: ArrayRecord) -> Message:
    """A copy of ``msg`` with one more record (strategies share one RecordDict among messages)."""
    content = RecordDict({**dict(msg.content.items()), name: record})
    return Message(
        content,
        dst_node_id=msg.metadata.dst_node_id,
        message_type=msg.metadata.message_type,
        group_id=msg.metadata.group_id,
    )


class Federation:
    """One federated run: the global model, the schedule, and what the server learns about sites."""

    def __init__(self, grid: Grid, cfg: ServerRunConfig) -> None:
        self.grid, self.cfg = grid, cfg
        self.model = build_joint_model(cfg.model, seed=cfg.seed)
        self.local_keys = norm_state_keys(self.model) if cfg.strategy.name == "fedbn" else set()
        head = final_layer_keys(self.model)
        # One strategy per stage: server-side optimiser state is per array, and stages exchange different arrays.
        self.strategies: dict[int, Strategy] = {
            s: build_strategy(cfg.strategy, local_keys=self.local_keys, head_keys=head) for s in HALF_OF_STAGE
        }
        self.out_dir = resolve_run_dir(cfg)
        self.history = History(self.out_dir)
        self.start_round = 0
        self.sites: dict[int, str] = {}  # node id -> site id, learned from replies
        self.unet_sent: dict[int, str] = {}  # node id -> digest of the frozen U-Net it holds
        self.counts: tuple[np.ndarray, np.ndarray] | None = None

    # --- the schedule --------------------------------------------------------------------

    def run(self) -> History:
        cfg = self.cfg
        if cfg.resume:
            self._resume()
        self.history.run = {**cfg.summary(), "output": str(self.out_dir)}
        log(
            INFO,
            "hemexp: %d stage-1 + %d stage-2 rounds, strategy %s%s, output %s",
            cfg.rounds_stage1,
            cfg.rounds_stage2,
            cfg.strategy.name,
            " + imbalance-aware head" if cfg.strategy.imbalance_head else "",
            self.out_dir,
        )
        last = None
        for rnd in range(self.start_round + 1, cfg.total_rounds + 1):
            t0 = time.perf_counter()
            stage = cfg.stage_of(rnd)
            entry: dict[str, Any] = {"round": rnd, "stage": stage, "failures": [], "rejected": []}
            log(INFO, "[ROUND %d/%d] stage %d (%s)", rnd, cfg.total_rounds, stage, HALF_OF_STAGE[stage])
            entry["train"] = self.train_round(rnd, stage, entry)
            entry["evaluate"] = self.evaluate_round(rnd, stage, entry)
            entry["seconds"] = time.perf_counter() - t0
            self.history.add_round(entry)
            self.history.save()
            last = save_round_checkpoint(
                self.out_dir,
                self.model,
                cfg.model,
                cfg.preprocess,
                {"method": "federated", "strategy": cfg.strategy.name, "round": rnd, "stage": stage, "seed": cfg.seed},
                keep=cfg.keep_checkpoints,
            )
        if last is not None:
            publish_final(self.out_dir, last)
        log(INFO, "hemexp: run finished; global model %s", self.out_dir / "global.pt")
        return self.history

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
        self.history = History.load(self.out_dir, up_to_round=self.start_round)
        log(INFO, "resume: continuing %s after round %d", self.out_dir, self.start_round)

    # --- one round -----------------------------------------------------------------------

    def train_round(self, rnd: int, stage: int, entry: dict) -> dict[str, Any]:
        cfg, half, strategy = self.cfg, HALF_OF_STAGE[stage], self.strategies[stage]
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
        order = TrainInstruction(
            server_round=rnd,
            stage=stage,
            lr=cfg.lr if stage == 1 else cfg.lr_stage2,
            local_epochs=cfg.local_epochs,
            local_steps=cfg.local_steps,
            pos_weight=pos_weight,
            unet_digest=digest,
            run_name=self.out_dir.name,
        )
        arrays = state_to_record(half_state_dict(self.model, half))
        messages = self._attach_unet(strategy.configure_train(rnd, arrays, order.to_record(), self.grid), unet, digest)
        replies = self._exchange("train", messages, entry, digest)
        sites = {self._site(r): metrics_dict(r.content[METRICS]) for r in replies}
        usable = []
        for r in replies:
            if float(r.content[METRICS][NUM_EXAMPLES]) > 0:
                usable.append(r)
            else:
                log(
                    INFO,
                    "train: site %s %s in stage %d; left out of the aggregate",
                    self._site(r),
                    idle_reason(r.content[METRICS]),
                    stage,
                )
        usable = self._reject_non_finite(usable, entry)
        aggregated = self._aggregate_train(rnd, half, strategy, usable, entry)
        return {"aggregated": aggregated, "sites": sites, "sent": len(messages), "received": len(replies)}

    def _aggregate_train(self, rnd: int, half: str, strategy: Strategy, replies: list[Message], entry: dict) -> dict:
        cfg = self.cfg
        needed = getattr(strategy, "min_train_nodes", 1)
        if len(replies) < max(needed, 1) or (entry["failures"] and not cfg.strategy.accept_failures):
            log(
                WARNING,
                "round %d: %d usable repl%s (%d needed), %d failure(s), accept-failures=%s: "
                "the global %s stays as it was",
                rnd,
                len(replies),
                "y" if len(replies) == 1 else "ies",
                needed,
                len(entry["failures"]),
                cfg.strategy.accept_failures,
                half,
            )
            entry["skipped"] = True
            return {}
        try:
            arrays, metrics = strategy.aggregate_train(rnd, replies)
        except (InconsistentMessageReplies, AggregationError) as exc:
            log(WARNING, "round %d: aggregation failed (%s); the global %s stays as it was", rnd, exc, half)
            entry["skipped"] = True
            return {}
        if arrays is not None:
            state = half_state_dict(self.model, half)
            state.update(record_to_state(arrays))  # FedBN: the server's norm keys stay as they were
            load_half_state_dict(self.model, half, state)
        return metrics_dict(metrics) if metrics is not None else {}

    def _reject_non_finite(self, replies: list[Message], entry: dict) -> list[Message]:
        """The replies whose arrays are all finite; each other one is logged and listed in ``entry["rejected"]``."""
        kept = []
        for r in replies:
            bad = [k for record in r.content.array_records.values() for k in non_finite_arrays(record)]
            if not bad:
                kept.append(r)
                continue
            node, reason = r.metadata.src_node_id, f"non-finite values in {len(bad)} array(s)"
            log(WARNING, "train: %s (node %d) sent %s; update rejected", self._site(r), node, reason)
            entry.setdefault("rejected", []).append(
                {"phase": "train", "site": self._site(r), "node": node, "reason": reason, "arrays": bad[:5]}
            )
        return kept

    def evaluate_round(self, rnd: int, stage: int, entry: dict) -> dict[str, Any]:
        """Every sampled site scores the global model; only the half of this stage is sent."""
        strategy = self.strategies[stage]
        unet, digest = self._frozen_unet(stage)
        order = EvaluateInstruction(server_round=rnd, stage=stage, unet_digest=digest, run_name=self.out_dir.name)
        arrays = state_to_record(half_state_dict(self.model, HALF_OF_STAGE[stage]))
        messages = self._attach_unet(
            strategy.configure_evaluate(rnd, arrays, order.to_record(), self.grid), unet, digest
        )
        if not messages:
            return {}
        replies = self._exchange("evaluate", messages, entry, digest)
        sites = {self._site(r): metrics_dict(r.content[METRICS]) for r in replies}
        aggregated = None
        if replies:
            try:
                aggregated = strategy.aggregate_evaluate(rnd, replies)
            except InconsistentMessageReplies as exc:
                log(WARNING, "round %d: evaluation replies inconsistent (%s)", rnd, exc)
        out = {"aggregated": metrics_dict(aggregated) if aggregated is not None else {}, "sites": sites}
        agg = out["aggregated"]
        log(
            INFO,
            "round %d: %d site(s) evaluated: dice %s, macro AUC (study) %s",
            rnd,
            len(replies),
            _fmt(agg.get("dice")),
            _fmt(agg.get("macro_auc_study")),
        )
        return out

    def _frozen_unet(self, stage: int) -> tuple[ArrayRecord | None, str]:
        """Stage 2: the global U-Net the sites train and evaluate on (FedBN: without its norm layers)."""
        if stage == 1:
            return None, ""
        unet = state_to_record(half_state_dict(self.model, "unet"), exclude=self.local_keys)
        return unet, arrays_digest(unet)

    def _attach_unet(self, messages: Iterable[Message], unet: ArrayRecord | None, digest: str) -> list[Message]:
        """Add the frozen U-Net to the messages of sites not known to hold it already."""
        messages = list(messages)
        if unet is None:
            return messages
        return [
            m if self.unet_sent.get(m.metadata.dst_node_id) == digest else _with_record(m, FROZEN_UNET, unet)
            for m in messages
        ]

    def count_labels(self, rnd: int, entry: dict) -> tuple[np.ndarray, np.ndarray] | None:
        """The counts round: every connected site's per-label positives and negatives, summed
        (with ``privacy.secure-counts`` by a secure sum: no site's own counts reach the server)."""
        if self.cfg.secure_counts:
            result = secure_label_counts(
                self.grid.get_node_ids(),
                lambda phase, msgs: self._exchange(phase, msgs, entry),
                rnd,
                len(self.cfg.model.output_names),
                site_name=lambda node: f"{self.sites.get(node, 'unknown site')} (node {node})",
            )
            if result is None:
                return None
            log(INFO, "counts round (secure): positives %s, negatives %s", result[0].tolist(), result[1].tolist())
            return result[0], result[1]
        config = ConfigRecord({SERVER_ROUND: rnd})
        messages = [
            Message(
                RecordDict({CONFIG: config}), dst_node_id=node, message_type=MessageType.QUERY, group_id=f"{rnd}-counts"
            )
            for node in self.grid.get_node_ids()
        ]
        replies = self._exchange("count labels", messages, entry)
        if not replies:
            log(WARNING, "counts round: no site replied; stage 2 runs with unweighted BCE until one does")
            return None
        pos = np.sum([r.content[METRICS][LABEL_POS] for r in replies], axis=0)
        neg = np.sum([r.content[METRICS][LABEL_NEG] for r in replies], axis=0)
        log(INFO, "counts round: %d site(s); positives %s, negatives %s", len(replies), pos.tolist(), neg.tolist())
        return pos, neg

    # --- messages and failures -----------------------------------------------------------

    def _exchange(self, phase: str, messages: list[Message], entry: dict, digest: str = "") -> list[Message]:
        """Send, wait up to ``rounds.timeout``, return the good replies; log every failure.
        A site that replied to a stage-2 message holds the U-Net ``digest`` from then on."""
        if not messages:
            return []
        replies = send_and_receive(self.grid, messages, self.cfg.timeout)
        good = []
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                self._failure(phase, node, reply.error.reason or f"error code {reply.error.code}", entry)
            elif SITE in reply.content and METRICS in reply.content:
                self.sites[node] = str(reply.content[SITE].get(SITE_ID, node))
                if digest:
                    self.unet_sent[node] = digest
                good.append(reply)
            else:
                self._failure(phase, node, "malformed reply (no metrics or site record)", entry)
        answered = {r.metadata.src_node_id for r in replies}
        for node in sorted({m.metadata.dst_node_id for m in messages} - answered):
            self._failure(
                phase, node, f"no reply within {self.cfg.timeout or 'unlimited'} s (site down or too slow)", entry
            )
        return good

    def _failure(self, phase: str, node: int, reason: str, entry: dict) -> None:
        site = self.sites.get(node, "unknown site")
        log(WARNING, "%s: %s (node %d) failed: %s", phase, site, node, reason)
        entry["failures"].append({"phase": phase, "site": site, "node": node, "reason": reason})
        self.unet_sent.pop(node, None)  # it may have lost its copy; send it again next time

    def _site(self, reply: Message) -> str:
        return self.sites.get(reply.metadata.src_node_id, str(reply.metadata.src_node_id))


def non_finite_arrays(record: ArrayRecord) -> list[str]:
    """Keys of the floating-point arrays of ``record`` that hold a NaN or an infinity."""
    bad = []
    for key, array in record.items():
        a = array.numpy()
        if np.issubdtype(a.dtype, np.inexact) and not np.isfinite(a).all():
            bad.append(key)
    return bad


def send_and_receive(grid: Grid, messages: list[Message], timeout: float | None) -> list[Message]:
    """``Grid.send_and_receive`` with a short pull interval (``POLL_SECONDS``)."""
    pending = set(grid.push_messages(messages))
    deadline = None if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    while pending:
        got = list(grid.pull_messages(pending))
        replies += got
        pending -= {m.metadata.reply_to_message_id for m in got}
        if not pending or (deadline is not None and time.monotonic() >= deadline):
            break
        time.sleep(POLL_SECONDS)
    return replies


def idle_reason(metrics: MetricRecord) -> str:
    """Why a site's train reply has nothing to aggregate (num-examples 0)."""
    if int(metrics.get(PRIVACY_EXHAUSTED, 0)):
        return f"did not train: privacy budget spent (epsilon {float(metrics.get(PRIVACY_EPSILON, math.nan)):.3f})"
    return "had nothing to learn from"


def _fmt(value: Any) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def run_federation(grid: Grid, run_config: Mapping[str, Any]) -> History:
    """Run the whole schedule on ``grid``; what ``main`` does, callable from tests and benchmarks."""
    return Federation(grid, ServerRunConfig.from_run_config(run_config)).run()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_federation(grid, context.run_config)
