"""The site's Flower ClientApp: train one stage on local data, evaluate the global model, count labels.

Deployment starts a fresh process for every message (docs/design.md §6), so nothing is kept in memory
between rounds: the preprocessed site cache is reused from disk (``client.data.cache``), and what must
persist at the site between rounds (FedBN's normalisation layers, the frozen global U-Net of
stage 2) lives under ``<cache dir>/federation/<site id>/<run name>/``.

Only the half being trained, label counts and scalar metrics leave the site (``common.records``).
Errors are reported to the server by type only; the traceback stays in the site's log, because
an exception's text may hold a file path, and file paths hold patient ids.
"""

from __future__ import annotations

import functools
import re
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from logging import ERROR, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log

from client.data.cache import DEFAULT_CACHE, build_site_cache, open_cache
from client.data.dataset import SliceDataset, dataset_labels, make_loader, split_slices
from client.ingest.layouts import list_site_folders
from client.ingest.site_settings import read_site_settings
from client.simulation.faults import FaultError, corrupt_training_data, corrupt_update, fault_seed
from client.simulation.partitions import Partition, read_partitions
from client.training.evaluate import evaluate
from client.training.privacy import SitePrivacy
from client.training.train import TrainConfig, output_columns, train_stage
from common.config import LABELS, PreprocessConfig
from common.losses import label_counts, pos_weight_from_counts
from common.model import JointModel, build_joint_model, half_state_dict, load_half_state_dict, norm_state_keys
from common.presets import ModelConfig
from common.records import (
    ARRAYS,
    CONFIG,
    FROZEN_UNET,
    HALF_OF_STAGE,
    LABEL_NEG,
    LABEL_POS,
    MASKED_COUNTS,
    METRICS,
    NODE_CACHE_DIR,
    NODE_DATA_PATH,
    NODE_DEVICE,
    NODE_PARTITION_ID,
    NODE_SITE_ID,
    NUM_EXAMPLES,
    PEER_KEYS,
    PEER_NODES,
    PUBLIC_KEY,
    SECURE,
    SECURE_KEYS,
    SECURE_MASK,
    SECURE_PHASE,
    SECURE_SESSION,
    SITE,
    SITE_ID,
    STEPS,
    TRAIN_LOSS,
    TRAIN_SECONDS,
    EvaluateInstruction,
    TrainInstruction,
    arrays_digest,
    model_from_run_config,
    pack_counts,
    pos_weight_mode,
    record_to_state,
    run_value,
    state_to_record,
)
from common.runtime import resolve_device
from common.secure_sum import SecureSumError, generate_key_pair, mask_vector

app = ClientApp()


class SiteError(RuntimeError):
    """A site failure whose message is safe to send to the server (no path, no identifier)."""


# --- configuration, parsed once at the top of each handler --------------------------------


@dataclass(frozen=True)
class SiteConfig:
    """Facts about this site: from ``node_config`` in deployment, ``partition-id`` in simulation."""

    data_path: Path
    site_id: str
    cache_dir: Path
    device: str = "auto"
    #: Simulation with ``data.partitions``: the partition's prebuilt cache (``data_path`` unused).
    cache_path: Path | None = None
    #: Simulation robustness experiments only: how this virtual site misbehaves (``client.simulation.partitions``).
    fault: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_context(cls, context: Context) -> SiteConfig:
        node = context.node_config
        if NODE_DATA_PATH in node:
            data = Path(str(node[NODE_DATA_PATH])).expanduser()
            site_id = str(node.get(NODE_SITE_ID) or read_site_settings(data).site_id)
            cache = Path(str(node.get(NODE_CACHE_DIR) or DEFAULT_CACHE)).expanduser()
        elif NODE_PARTITION_ID in node and str(run_value(context.run_config, "data.partitions")):
            part = manifest_partition(
                Path(str(run_value(context.run_config, "data.partitions"))), int(node[NODE_PARTITION_ID])
            )
            cache_path = Path(part.cache)
            return cls(
                cache_path, part.site_id, cache_path.parent, str(node.get(NODE_DEVICE, "auto")), cache_path, part.fault
            )
        elif NODE_PARTITION_ID in node:
            root = Path(str(run_value(context.run_config, "data.root"))).expanduser()
            data = partition_site(root, int(node[NODE_PARTITION_ID]))
            site_id = read_site_settings(data).site_id
            cache_value = str(run_value(context.run_config, "data.cache-dir"))
            cache = Path(cache_value).expanduser() if cache_value else root / ".cache"
        else:
            raise SiteError(f"node config needs {NODE_DATA_PATH!r} (deployment) or {NODE_PARTITION_ID!r} (simulation)")
        return cls(data, site_id, cache, str(node.get(NODE_DEVICE, "auto")))


@dataclass(frozen=True)
class SiteRunConfig:
    """The run-config values a site needs (the per-round ones come in the ConfigRecord)."""

    model: ModelConfig
    preprocess: PreprocessConfig
    batch_size: int
    eval_batch_size: int
    weight_decay: float
    optimizer: str
    augment: bool
    balanced: bool
    split: tuple[float, float, float]
    seed: int
    pos_weight: str  # "global" (the server's, from every site's counts) | "local" (this site's) | "none"
    #: ``privacy.secure-counts``: label counts leave the site only masked (docs/secure-aggregation.md).
    secure_counts: bool = False

    @classmethod
    def from_run_config(cls, rc: Mapping) -> SiteRunConfig:
        model, pre = model_from_run_config(rc)
        val, test = float(run_value(rc, "data.val-fraction")), float(run_value(rc, "data.test-fraction"))
        if not (0 <= val and 0 < test and val + test < 1):
            raise SiteError(f"data.val-fraction ({val}) and data.test-fraction ({test}) must leave a training split")
        return cls(
            model,
            pre,
            int(run_value(rc, "train.batch-size")),
            int(run_value(rc, "train.eval-batch-size")),
            float(run_value(rc, "train.weight-decay")),
            str(run_value(rc, "train.optimizer")),
            bool(run_value(rc, "train.augment")),
            bool(run_value(rc, "train.balanced")),
            (1.0 - val - test, val, test),
            int(run_value(rc, "seed")),
            pos_weight_mode(rc),
            secure_counts=bool(run_value(rc, "privacy.secure-counts")),
        )

    def train_config(self, order: TrainInstruction) -> TrainConfig:
        """The local training of one round: the server's per-round values, the run's others.
        The learning rate is constant within a round (a cosine would restart every round)."""
        return TrainConfig(
            epochs=order.local_epochs,
            max_steps=order.local_steps,
            batch_size=self.batch_size,
            lr=order.lr,
            weight_decay=self.weight_decay,
            optimizer=self.optimizer,
            schedule="constant",
            augment=self.augment,
            balanced=self.balanced,
            proximal_mu=order.proximal_mu,
            seed=self.seed + order.server_round,
        )


def stage2_pos_weight(mode: str, order: TrainInstruction, model, train_ds) -> torch.Tensor | None:
    """The marker weights of this round's loss: the server's global ones (paper formula 2 on the
    summed counts), this site's own (the baseline the global ones replace), or none."""
    if mode == "global":
        return torch.tensor(order.pos_weight) if order.pos_weight is not None else None
    if mode == "local":
        pos, neg = label_counts(dataset_labels(train_ds)[:, output_columns(model)])
        return pos_weight_from_counts(pos, neg)
    return None


def manifest_partition(manifest: Path, partition_id: int) -> Partition:
    """The ``partition_id``-th entry of a simulation's partition manifest (errors name no path)."""
    try:
        parts = read_partitions(manifest)
    except FaultError as exc:  # the fault dict's own problem (no path in it)
        raise SiteError(f"data.partitions has an invalid fault: {exc}") from None
    except ValueError:
        raise SiteError("data.partitions is not a readable partition manifest") from None
    if not 0 <= partition_id < len(parts):
        raise SiteError(f"partition {partition_id} has no entry: the manifest lists {len(parts)} partition(s)")
    return parts[partition_id]


def partition_site(data_root: Path, partition_id: int) -> Path:
    """The ``partition_id``-th site folder of ``data_root`` (``client.ingest.layouts.list_site_folders``).

    Errors name no path: their text reaches the server.
    """
    if not data_root.is_dir():
        raise SiteError("data.root does not exist on this machine")
    sites = list_site_folders(data_root)
    if not 0 <= partition_id < len(sites):
        raise SiteError(f"partition {partition_id} has no site: data.root holds {len(sites)} site folder(s)")
    return sites[partition_id]


# --- the site's data and the state it keeps between rounds --------------------------------


@dataclass(frozen=True)
class SiteData:
    train: SliceDataset
    test: SliceDataset


def open_site(site: SiteConfig, run: SiteRunConfig) -> SiteData:
    """The site's cache (built on first use, reused after; a simulation partition's is prebuilt)
    split patient-wise with the run's seed."""
    if site.cache_path is not None:
        cache, problems = open_cache(site.cache_path), []
    else:
        cache, problems = build_site_cache(site.data_path, site.cache_dir, run.preprocess)
    if problems:
        log(
            WARNING,
            "%s: %d data problem(s) while building the cache (see 'flwr-client check')",
            site.site_id,
            len(problems),
        )
    idx = split_slices(cache, run.split, seed=run.seed, by="patient")
    # A simulated label-flip site (client.simulation.faults) learns and counts from wrong labels; its test split stays true.
    return SiteData(
        corrupt_training_data(SliceDataset(cache, idx["train"]), site.fault), SliceDataset(cache, idx["test"])
    )


@dataclass(frozen=True)
class SiteStore:
    """Tensors a site keeps on its own disk between rounds of one run (never sent anywhere)."""

    root: Path

    @classmethod
    def for_run(cls, site: SiteConfig, run_name: str) -> SiteStore:
        name = re.sub(r"[^A-Za-z0-9._-]", "_", run_name) or "run"
        return cls(site.cache_dir / "federation" / site.site_id / name)

    def load(self, name: str) -> dict[str, torch.Tensor] | None:
        path = self.root / f"{name}.pt"
        return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None

    def save(self, name: str, state: Mapping[str, torch.Tensor]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{name}.pt.tmp"
        torch.save({k: v.detach().cpu().clone() for k, v in state.items()}, tmp)
        tmp.replace(self.root / f"{name}.pt")


def load_half(
    model: JointModel, half: str, received: Mapping[str, torch.Tensor], store: SiteStore, local_keys: set[str]
) -> None:
    """Load the server's arrays for one half; with FedBN the norm layers come from the site's disk
    (or stay at their initial values before the site's first round)."""
    if not local_keys:
        load_half_state_dict(model, half, received)
        return
    state = half_state_dict(model, half)
    state.update(store.load(f"norm-{half}") or {})
    state.update(received)
    load_half_state_dict(model, half, state)


def frozen_unet(msg: Message, digest: str, store: SiteStore) -> dict[str, torch.Tensor]:
    """Stage 2 runs on the global U-Net: sent once per site, then read back from the site's disk."""
    name = f"unet-{digest}"
    if FROZEN_UNET in msg.content:
        record = msg.content[FROZEN_UNET]
        if arrays_digest(record) != digest:
            raise SiteError("the global U-Net received does not match its digest")
        state = record_to_state(record)
        store.save(name, state)
        return state
    state = store.load(name)
    if state is None:
        raise SiteError(
            f"the global U-Net {digest[:12]} is not stored at this site; the server sends it again next round"
        )
    return state


def receive_model(
    msg: Message, run: SiteRunConfig, store: SiteStore, stage: int, local_norm: bool, unet_digest: str
) -> tuple[JointModel, set[str]]:
    """The global model as this site holds it: the stage's half from the message, the frozen U-Net
    in stage 2, the site's own normalisation layers under FedBN (whose keys are returned)."""
    model = build_joint_model(run.model, seed=run.seed)
    local_keys = norm_state_keys(model) if local_norm else set()
    if stage == 2:
        load_half(model, "unet", frozen_unet(msg, unet_digest, store), store, local_keys)
    load_half(model, HALF_OF_STAGE[stage], record_to_state(msg.content[ARRAYS]), store, local_keys)
    return model, local_keys


def _output_columns(model_cfg: ModelConfig) -> list[int]:
    return [LABELS.index(name) for name in model_cfg.output_names]


def site_label_counts(ds: SliceDataset, model_cfg: ModelConfig) -> tuple[list[int], list[int]]:
    """Per-output (positives, negatives) of the training slices, annotated labels only."""
    cols = _output_columns(model_cfg)
    pos, neg = label_counts(ds.labels()[:, cols]) if len(ds) else (np.zeros(len(cols), int), np.zeros(len(cols), int))
    return [int(v) for v in pos], [int(v) for v in neg]


def usable_examples(ds: SliceDataset, stage: int, model_cfg: ModelConfig) -> int:
    """Training slices a stage can learn from: with a reference mask (1), with an annotated label (2)."""
    if not len(ds):
        return 0
    if stage == 1:
        return int(ds.cache.mask_known()[ds.indices].sum())
    cols = _output_columns(model_cfg)
    return int((~np.isnan(ds.labels()[:, cols])).any(axis=1).sum())


def _site_record(site: SiteConfig) -> ConfigRecord:
    return ConfigRecord({SITE_ID: site.site_id})


def site_errors(phase: str) -> Callable:
    """Log a failure in full at the site; send the server only its type."""

    def decorate(fn: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
        @functools.wraps(fn)
        def handler(msg: Message, context: Context) -> Message:
            try:
                return fn(msg, context)
            except SiteError:
                raise
            except Exception as exc:  # noqa: BLE001 - reported by type, logged in full here
                log(ERROR, "%s failed at this site:\n%s", phase, traceback.format_exc())
                raise SiteError(f"{phase} failed ({type(exc).__name__}); details in the site's log") from None

        return handler

    return decorate


# --- handlers ------------------------------------------------------------------------------


@app.train()
@site_errors("train")
def train(msg: Message, context: Context) -> Message:
    """Train the half named by the round's stage; reply with that half, counts and the loss."""
    site = SiteConfig.from_context(context)
    run = SiteRunConfig.from_run_config(context.run_config)
    order = TrainInstruction.from_record(msg.content[CONFIG])
    data = open_site(site, run)
    store = SiteStore.for_run(site, order.run_name)
    model, local_keys = receive_model(msg, run, store, order.stage, order.local_norm, order.unet_digest)
    cfg = run.train_config(order)
    privacy = SitePrivacy.open(
        context.run_config, store.root, data.train, order, cfg, run.model
    )  # None: privacy.dp off
    loader = make_loader(
        data.train, cfg.batch_size, shuffle=True, seed=cfg.seed, balanced=cfg.balanced, stage=order.stage
    )
    pos_weight = stage2_pos_weight(run.pos_weight, order, model, data.train) if order.stage == 2 else None
    result = (
        privacy.train(model, cfg, resolve_device(site.device), pos_weight)
        if privacy is not None
        else train_stage(model, loader, order.stage, cfg, resolve_device(site.device), pos_weight)
    )

    state = half_state_dict(model.cpu(), order.half)
    if local_keys:
        store.save(f"norm-{order.half}", {k: v for k, v in state.items() if k in local_keys})
    if site.fault:  # simulation manifests only: a site that corrupts what it sends (client.simulation.faults)
        state = corrupt_update(
            record_to_state(msg.content[ARRAYS]),
            state,
            site.fault,
            fault_seed(run.seed, order.server_round, site.site_id),
        )
    metrics = MetricRecord(
        {
            NUM_EXAMPLES: usable_examples(data.train, order.stage, run.model) if result.num_examples else 0,
            TRAIN_LOSS: float(result.loss),
            STEPS: int(result.steps),
            TRAIN_SECONDS: float(result.seconds),
        }
    )
    if not run.secure_counts:  # with secure counts, this site's counts leave it only masked
        metrics[LABEL_POS], metrics[LABEL_NEG] = site_label_counts(data.train, run.model)
    if privacy is not None:
        metrics.update(privacy.metrics())
    content = RecordDict(
        {ARRAYS: state_to_record(state, exclude=local_keys), METRICS: metrics, SITE: _site_record(site)}
    )
    return Message(content, reply_to=msg)


@app.evaluate()
@site_errors("evaluate")
def evaluate_global(msg: Message, context: Context) -> Message:
    """Score the global model on the site's own held-out patients; reply with scalars only.

    The message holds the half of the current stage; the other half is the site's own copy: the
    frozen global U-Net (stage 2) or the untrained classifier built from the run's seed (stage 1).
    """
    site = SiteConfig.from_context(context)
    run = SiteRunConfig.from_run_config(context.run_config)
    order = EvaluateInstruction.from_record(msg.content[CONFIG])
    data = open_site(site, run)
    model, _ = receive_model(
        msg, run, SiteStore.for_run(site, order.run_name), order.stage, order.local_norm, order.unet_digest
    )
    scores = evaluate(model, data.test, resolve_device(site.device), run.eval_batch_size)
    metrics = MetricRecord(
        {
            k: (v if isinstance(v, int) else float(v))
            for k, v in scores.items()
            if k != "arrays" and isinstance(v, (int, float, np.floating, np.integer))
        }
    )
    metrics[NUM_EXAMPLES] = len(data.test)
    return Message(RecordDict({METRICS: metrics, SITE: _site_record(site)}), reply_to=msg)


@app.query()
@site_errors("count labels")
def count_labels(msg: Message, context: Context) -> Message:
    """The counts round: per-label positives and negatives of the training split, nothing else.

    With ``privacy.secure-counts`` the round is the two steps of ``common.secure_sum``: "keys"
    (reply with a fresh public key) and "mask" (reply with the masked counts only).
    """
    site = SiteConfig.from_context(context)
    run = SiteRunConfig.from_run_config(context.run_config)
    phase = str(msg.content[CONFIG].get(SECURE_PHASE, "")) if CONFIG in msg.content else ""
    if run.secure_counts != bool(phase):
        raise SiteError(
            "privacy.secure-counts is on: this site sends its label counts only masked"
            if run.secure_counts
            else f"secure counts step {phase!r} asked, but privacy.secure-counts is off for this run"
        )
    if phase == SECURE_KEYS:
        return secure_counts_keys(msg, context, site)
    data = open_site(site, run)
    pos, neg = site_label_counts(data.train, run.model)
    if phase == SECURE_MASK:
        return secure_counts_masked(msg, context, site, pack_counts(pos, neg, len(data.train)))
    if phase:
        raise SiteError(f"unknown secure counts step {phase!r}")
    metrics = MetricRecord({NUM_EXAMPLES: len(data.train), LABEL_POS: pos, LABEL_NEG: neg})
    return Message(RecordDict({METRICS: metrics, SITE: _site_record(site)}), reply_to=msg)


#: ``context.state`` record holding this site's private X25519 key of the current secure-sum session.
#: Flower keeps ``context.state`` for the run in the SuperNode's memory and hands it to every
#: ClientApp process (as its SecAgg+ mod does); it is never written to disk nor sent to the server.
SECURE_STATE = "secure-sum-key"
PRIVATE_KEY = "private-key"


def secure_counts_keys(msg: Message, context: Context, site: SiteConfig) -> Message:
    """Step 1: a fresh key pair for this session; the private half stays in ``context.state``."""
    session = str(msg.content[CONFIG][SECURE_SESSION])
    private, public = generate_key_pair()
    context.state[SECURE_STATE] = ConfigRecord({SECURE_SESSION: session, PRIVATE_KEY: private})
    return Message(
        RecordDict({METRICS: MetricRecord(), SECURE: ConfigRecord({PUBLIC_KEY: public}), SITE: _site_record(site)}),
        reply_to=msg,
    )


def secure_counts_masked(msg: Message, context: Context, site: SiteConfig, counts: list[int]) -> Message:
    """Step 2: this site's counts masked with every peer's pairwise mask; the key is used once."""
    session = str(msg.content[CONFIG][SECURE_SESSION])
    held = context.state.get(SECURE_STATE)
    if held is None or str(held.get(SECURE_SESSION)) != session:
        raise SiteError("no key for this secure counts session at this site (restarted, or asked twice)")
    del context.state[SECURE_STATE]  # one session, one use: a second request for it is refused
    peers = msg.content[SECURE]
    try:
        masked = mask_vector(
            counts,
            msg.metadata.dst_node_id,
            bytes(held[PRIVATE_KEY]),
            dict(zip((int(n) for n in peers[PEER_NODES]), (bytes(k) for k in peers[PEER_KEYS]))),
            session,
        )
    except SecureSumError as exc:
        raise SiteError(f"secure counts refused: {exc}") from None
    return Message(
        RecordDict({METRICS: MetricRecord({MASKED_COUNTS: [int(v) for v in masked]}), SITE: _site_record(site)}),
        reply_to=msg,
    )
