"""What crosses the wire between a site and the server, and under which keys (docs/design.md §5).

Only three kinds of thing travel: model arrays (one half of the joint model per round), per-label
positive/negative counts, and scalar metrics. Every key lives here so that the ClientApp, the
ServerApp and the strategies spell them the same way.

Train and evaluate messages hold ``{ARRAYS: ArrayRecord, CONFIG: ConfigRecord}``, ARRAYS being the
half of the current stage only (plus ``FROZEN_UNET`` the first time a site meets stage 2); a train
reply holds ``{ARRAYS, METRICS, SITE}``, an evaluate or counts reply ``{METRICS, SITE}``. ``SITE``
carries the site's id (``site-01``), never a patient identifier. With ``privacy.secure-counts`` the
counts travel masked (``MASKED_COUNTS``, docs/secure-aggregation.md), with X25519 public keys in a
``SECURE`` record, and train replies carry no label counts. The validation sums of an evaluate
reply always travel masked (``MASKED_VALIDATION``, ``common.secure_validation``): the reply of a round
that can be chosen adds a ``SECURE`` record with the site's public key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord

# --- record names inside a message's RecordDict ---------------------------------------------
#: The half of the current stage (Flower strategies' default ``arrayrecord_key``).
ARRAYS = "arrays"
#: Stage 2: the global U-Net the classifier is trained on, sent once per site and kept on its disk.
FROZEN_UNET = "frozen-unet"
#: The per-round instruction (Flower strategies' default ``configrecord_key``).
CONFIG = "config"
#: Scalar metrics and label counts of a reply.
METRICS = "metrics"
#: Who replied: the site id only.
SITE = "site"
#: Secure counts: public keys (a ConfigRecord of bytes; ``common.secure_sum``).
SECURE = "secure-sum"
#: A site's refusal of a message its policy does not allow (``client.federation.policy``): the reply
#: then holds ``{SITE, REFUSAL}`` only, REFUSAL naming the rules broken (``REFUSAL_RULES``) and why.
REFUSAL = "refusal"
REFUSAL_RULES = "rules"
REFUSAL_REASONS = "reasons"

# --- MetricRecord keys (site -> server) -----------------------------------------------------
#: Samples, never batches: a train reply's training slices the stage can learn from (with a mask in
#: stage 1, with an annotated label in stage 2; 0 if none), an evaluate reply's test slices.
#: Every strategy weights by it.
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
STEPS = "steps"
TRAIN_SECONDS = "train-seconds"
#: Per-label positive / negative slice counts of the site's training split, annotated labels only,
#: in the model's output order. Lists of ints.
LABEL_POS = "label-pos"
LABEL_NEG = "label-neg"
#: DP-SGD at the site (``privacy.dp``, client/training/privacy.py): the site's epsilon spent so far in this
#: run (both stages) and its delta, numbers only; ``PRIVACY_EXHAUSTED`` 1 when the site did not
#: train because the round would have exceeded ``privacy.target-epsilon`` (then num-examples 0).
PRIVACY_EPSILON = "privacy-epsilon"
PRIVACY_DELTA = "privacy-delta"
PRIVACY_EXHAUSTED = "privacy-exhausted"
#: Secure counts (``privacy.secure-counts``): the site's label counts and training slices, masked
#: (``common.secure_sum``; layout ``pack_counts``). Ints in [0, 2^32).
MASKED_COUNTS = "masked-counts"
#: Keys that are summed across sites, not averaged.
SUMMED_METRICS: tuple[str, ...] = (NUM_EXAMPLES, STEPS, LABEL_POS, LABEL_NEG, "n_slices", "n_studies")

# --- ConfigRecord keys (server -> site) -----------------------------------------------------
SERVER_ROUND = "server-round"  # set by Flower's strategies
STAGE = "stage"
LR = "lr"
LOCAL_EPOCHS = "local-epochs"
LOCAL_STEPS = "local-steps"
POS_WEIGHT = "pos-weight"
PROXIMAL_MU = "proximal-mu"  # set by Flower's FedProx
LOCAL_NORM = "local-norm"  # set by FedBN: normalisation layers stay at the site
UNET_DIGEST = "unet-digest"
RUN_NAME = "run-name"  # scopes what a site keeps on disk between rounds of one run
SITE_ID = "site-id"  # in the SITE record of a reply
#: Secure counts: which step of the protocol a counts query is ("keys" | "mask"), and its session.
SECURE_PHASE = "secure-phase"
SECURE_SESSION = "secure-session"
SECURE_KEYS, SECURE_MASK = "keys", "mask"
#: The server's first message to a node (``query.hello``): who are you, and do you take this run?
#: Its reply holds the SITE record and an empty METRICS (or a REFUSAL): the server names every site before round 1.
HELLO_ACTION = "hello"
#: In the SECURE record: a site's X25519 public key (reply to "keys"); every site's node id and
#: public key of the session (sent with "mask").
PUBLIC_KEY = "public-key"
PEER_NODES = "peer-nodes"
PEER_KEYS = "peer-keys"
#: Secure model updates (``privacy.secure-updates``, ``common.secure_updates``): the query steps
#: around a train round, in the same SECURE_PHASE key; the session is named in SECURE_SESSION.
UPDATE_KEYS, UPDATE_SHARES, UPDATE_UNMASK = "update-keys", "update-shares", "update-unmask"
UPDATE_PHASES = (UPDATE_KEYS, UPDATE_SHARES, UPDATE_UNMASK)
#: In the SECURE record: encrypted Shamir shares, to their receivers (reply to "update-shares") or
#: from their senders (with the train message); the unmask step's survivors and dropped sites; and
#: a survivor's answer (seed shares of survivors, key shares of the dropped).
SHARE_NODES = "share-nodes"
SHARE_DATA = "share-data"
SURVIVORS = "survivors"
DROPPED = "dropped"
SEED_NODES, SEED_SHARES = "seed-nodes", "seed-shares"
KEY_NODES, KEY_SHARES = "key-nodes", "key-shares"
#: The one array of a train reply under secure updates: the masked fixed-point update (uint32).
MASKED_UPDATE = "masked-update"
#: Secure validation sums (always on, ``common.secure_validation``): the evaluate message of a round
#: that can be chosen names the session in SECURE_SESSION and the site replies with its public key;
#: the later steps are evaluate messages too, with SECURE_PHASE "validation-mask" (the peers; the
#: reply's one array is MASKED_VALIDATION, uint32) or, after a site was lost, "validation-keys".
VALIDATION_KEYS, VALIDATION_MASK = "validation-keys", "validation-mask"
VALIDATION_PHASES = (VALIDATION_KEYS, VALIDATION_MASK)
MASKED_VALIDATION = "masked-validation"

# --- node_config keys (deployment: ``flower-supernode --node-config``) ------------------------
NODE_DATA_PATH = "data-path"
NODE_SITE_ID = "site-id"
NODE_CACHE_DIR = "cache-dir"
NODE_DEVICE = "device"
#: Simulation: the virtual node's index; the i-th site folder of ``data.root``.
NODE_PARTITION_ID = "partition-id"

#: Which half of the joint model each stage trains and exchanges.
HALF_OF_STAGE: dict[int, str] = {1: "unet", 2: "classifier"}

# --- the federated GAN stage (``rounds.gan``, docs/gan.md design (i)) -------------------------
#: A GAN round's train messages are ``train.gan`` (their own ClientApp handler); its CONFIG's STAGE
#: and the history's stage name of the round are ``GAN_STAGE``.
GAN_ACTION = "gan"
GAN_STAGE = "gan"
#: The GAN round's ARRAYS: the generator's and the discriminator's state dicts under these prefixes
#: (``common.gan.gan_state_dict``).
GAN_G_PREFIX, GAN_D_PREFIX = "gan.g.", "gan.d."
#: Stage 2 after a GAN stage: the final global generator (``GAN_G_PREFIX`` keys), sent once per site with
#: a stage-2 train message, and its content digest in every stage-2 train CONFIG (as the frozen U-Net's).
GAN_GENERATOR = "gan-generator"
GAN_DIGEST = "gan-digest"
#: A GAN reply's mean losses per generator step (NaN when the site took no step).
GAN_D_LOSS, GAN_G_LOSS = "gan-d-loss", "gan-g-loss"


@dataclass(frozen=True)
class TrainInstruction:
    """What the server asks of a site for one train round (the ConfigRecord, typed)."""

    server_round: int
    stage: int
    lr: float
    local_epochs: int = 1
    local_steps: int = 0
    pos_weight: tuple[float, ...] | None = None
    proximal_mu: float = 0.0
    local_norm: bool = False
    unet_digest: str = ""
    run_name: str = ""
    gan_digest: str = ""  # stage 2 after a GAN stage: the global generator to sample from

    def __post_init__(self) -> None:
        if self.stage not in HALF_OF_STAGE:
            raise ValueError(f"stage must be one of {sorted(HALF_OF_STAGE)}, got {self.stage}")

    @property
    def half(self) -> str:
        return HALF_OF_STAGE[self.stage]

    def to_record(self) -> ConfigRecord:
        rec = ConfigRecord(
            {
                SERVER_ROUND: self.server_round,
                STAGE: self.stage,
                LR: float(self.lr),
                LOCAL_EPOCHS: self.local_epochs,
                LOCAL_STEPS: self.local_steps,
                PROXIMAL_MU: float(self.proximal_mu),
                LOCAL_NORM: self.local_norm,
                RUN_NAME: self.run_name,
            }
        )
        if self.pos_weight is not None:
            rec[POS_WEIGHT] = [float(w) for w in self.pos_weight]
        if self.unet_digest:
            rec[UNET_DIGEST] = self.unet_digest
        if self.gan_digest:
            rec[GAN_DIGEST] = self.gan_digest
        return rec

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> TrainInstruction:
        pos_weight = rec.get(POS_WEIGHT)
        return cls(
            server_round=int(rec.get(SERVER_ROUND, 0)),
            stage=int(rec[STAGE]),
            lr=float(rec[LR]),
            local_epochs=int(rec.get(LOCAL_EPOCHS, 1)),
            local_steps=int(rec.get(LOCAL_STEPS, 0)),
            pos_weight=tuple(float(w) for w in pos_weight) if pos_weight is not None else None,
            proximal_mu=float(rec.get(PROXIMAL_MU, 0.0)),
            local_norm=bool(rec.get(LOCAL_NORM, False)),
            unet_digest=str(rec.get(UNET_DIGEST, "")),
            run_name=str(rec.get(RUN_NAME, "")),
            gan_digest=str(rec.get(GAN_DIGEST, "")),
        )


@dataclass(frozen=True)
class GanInstruction:
    """What the server asks of a site for one GAN round: ``local_steps`` generator updates from the
    global G and D of the message (the ConfigRecord, typed; STAGE is ``GAN_STAGE``)."""

    server_round: int
    local_steps: int
    run_name: str = ""

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(
            {SERVER_ROUND: self.server_round, STAGE: GAN_STAGE, LOCAL_STEPS: self.local_steps, RUN_NAME: self.run_name}
        )

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> GanInstruction:
        if rec.get(STAGE) != GAN_STAGE:
            raise ValueError(f"a GAN round's config has stage {GAN_STAGE!r}, got {rec.get(STAGE)!r}")
        return cls(
            server_round=int(rec.get(SERVER_ROUND, 0)),
            local_steps=int(rec[LOCAL_STEPS]),
            run_name=str(rec.get(RUN_NAME, "")),
        )


@dataclass(frozen=True)
class EvaluateInstruction:
    """What the server asks of a site for one evaluation (the ConfigRecord, typed).

    The message carries only the half trained in ``stage``; the other half the site already has:
    in stage 1 the untrained classifier (built from the run's seed, as on the server), in stage 2
    the frozen global U-Net named by ``unet_digest``.
    """

    server_round: int
    stage: int = 2
    local_norm: bool = False
    unet_digest: str = ""
    run_name: str = ""
    #: A round that can be chosen: the secure validation sum's session (``common.secure_validation``).
    secure_session: str = ""

    def to_record(self) -> ConfigRecord:
        rec = ConfigRecord(
            {SERVER_ROUND: self.server_round, STAGE: self.stage, LOCAL_NORM: self.local_norm, RUN_NAME: self.run_name}
        )
        if self.unet_digest:
            rec[UNET_DIGEST] = self.unet_digest
        if self.secure_session:
            rec[SECURE_SESSION] = self.secure_session
        return rec

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> EvaluateInstruction:
        return cls(
            server_round=int(rec.get(SERVER_ROUND, 0)),
            stage=int(rec[STAGE]),
            local_norm=bool(rec.get(LOCAL_NORM, False)),
            unet_digest=str(rec.get(UNET_DIGEST, "")),
            run_name=str(rec.get(RUN_NAME, "")),
            secure_session=str(rec.get(SECURE_SESSION, "")),
        )


# --- the radiomics baseline's federation (``radiomics.rounds`` > 0, docs/simulations.md) -------
#: ``query.radiomics_stats`` (per-feature sums and study label counts of the training studies),
#: ``train.radiomics`` (local gradient steps from the global logistic weights) and
#: ``evaluate.radiomics`` (``RADIOMICS_PHASE`` "select": validation sums of every L2 candidate;
#: "score": the deep evaluate reply's metrics for the chosen weights). Never a study's features or score.
RADIOMICS_ACTION = "radiomics"
RADIOMICS_STATS_ACTION = "radiomics_stats"  # an action name must be a Python identifier (Flower)
RADIOMICS_STAGE = "radiomics"
#: The one array of a radiomics train or evaluate message and of a train reply: float64 [K, M, F + 1],
#: per L2 candidate and marker the weights of the standardised features, the bias last.
RADIOMICS_WEIGHTS = "radiomics.weights"
RADIOMICS_PHASE = "radiomics-phase"
SELECT_PHASE, SCORE_PHASE = "select", "score"
#: CONFIG lists: the L2 strength of each candidate, the features' global mean and sd.
L2 = "l2"
FEATURE_MEAN, FEATURE_SD = "feature-mean", "feature-sd"
#: Stats reply metrics (lists over features): non-NaN count, sum, sum of squares. Its LABEL_POS /
#: LABEL_NEG count training studies (not slices) per marker, and NUM_EXAMPLES the training studies.
FEATURE_N, FEATURE_SUM, FEATURE_SUMSQ = "feature-n", "feature-sum", "feature-sumsq"
#: Prefix of a "select" reply's validation sums (``ValidationStats.to_metrics``), K x M columns.
CANDIDATES_PREFIX = "candidates/"


@dataclass(frozen=True)
class RadiomicsInstruction:
    """What the server asks of a site in the radiomics federation (the ConfigRecord, typed): the
    local steps and their rate, the L2 candidates, the global pos-weight and feature statistics
    (empty in the stats query, which computes them), the evaluate phase and the U-Net's digest."""

    server_round: int
    run_name: str = ""
    lr: float = 0.0
    local_steps: int = 0
    l2: tuple[float, ...] = ()
    pos_weight: tuple[float, ...] = ()
    mean: tuple[float, ...] = ()
    sd: tuple[float, ...] = ()
    phase: str = ""
    unet_digest: str = ""

    def to_record(self) -> ConfigRecord:
        rec = ConfigRecord(
            {
                SERVER_ROUND: self.server_round,
                STAGE: RADIOMICS_STAGE,
                RUN_NAME: self.run_name,
                LR: float(self.lr),
                LOCAL_STEPS: int(self.local_steps),
            }
        )
        for key, values in (
            (L2, self.l2),
            (POS_WEIGHT, self.pos_weight),
            (FEATURE_MEAN, self.mean),
            (FEATURE_SD, self.sd),
        ):
            if values:
                rec[key] = [float(v) for v in values]
        if self.phase:
            rec[RADIOMICS_PHASE] = self.phase
        if self.unet_digest:
            rec[UNET_DIGEST] = self.unet_digest
        return rec

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> RadiomicsInstruction:
        if rec.get(STAGE) != RADIOMICS_STAGE:
            raise ValueError(f"a radiomics message's config has stage {RADIOMICS_STAGE!r}, got {rec.get(STAGE)!r}")

        def floats(key: str) -> tuple[float, ...]:
            return tuple(float(v) for v in rec.get(key, []))

        return cls(
            server_round=int(rec.get(SERVER_ROUND, 0)),
            run_name=str(rec.get(RUN_NAME, "")),
            lr=float(rec.get(LR, 0.0)),
            local_steps=int(rec.get(LOCAL_STEPS, 0)),
            l2=floats(L2),
            pos_weight=floats(POS_WEIGHT),
            mean=floats(FEATURE_MEAN),
            sd=floats(FEATURE_SD),
            phase=str(rec.get(RADIOMICS_PHASE, "")),
            unet_digest=str(rec.get(UNET_DIGEST, "")),
        )


def pack_counts(pos: Iterable[int], neg: Iterable[int], num_examples: int) -> list[int]:
    """One site's counts as the vector secure summation adds up: positives, negatives, slices."""
    return [int(v) for v in pos] + [int(v) for v in neg] + [int(num_examples)]


def unpack_counts(vector: Iterable[int], n_labels: int) -> tuple[np.ndarray, np.ndarray, int]:
    """``pack_counts`` reversed (on the sum): (positives, negatives, slices)."""
    v = np.asarray(list(vector), dtype=np.int64)
    if v.shape != (2 * n_labels + 1,):
        raise ValueError(f"a counts vector for {n_labels} labels has {2 * n_labels + 1} entries, got {v.size}")
    return v[:n_labels], v[n_labels : 2 * n_labels], int(v[-1])


def pack_peers(peers: Mapping[int, bytes]) -> dict[str, list]:
    """A session's (node id -> public key) list as the SECURE record entries PEER_NODES, PEER_KEYS."""
    return {PEER_NODES: list(peers), PEER_KEYS: list(peers.values())}


def unpack_peers(record: Mapping[str, Any]) -> dict[int, bytes]:
    """``pack_peers`` reversed: node id -> public key, in the order sent."""
    return dict(zip((int(n) for n in record[PEER_NODES]), (bytes(k) for k in record[PEER_KEYS])))


# --- arrays ---------------------------------------------------------------------------------


def state_to_record(state: Mapping[str, torch.Tensor], exclude: Iterable[str] = ()) -> ArrayRecord:
    """A (half) state dict as an ArrayRecord, leaving out ``exclude`` (FedBN's local keys)."""
    skip = set(exclude)
    return ArrayRecord(
        {k: Array(np.ascontiguousarray(v.detach().cpu().numpy())) for k, v in state.items() if k not in skip}
    )


def record_to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v.numpy())) for k, v in record.items()}


def record_bytes(record: ArrayRecord) -> int:
    """Payload size of an ArrayRecord: the serialised array bytes (what dominates a message)."""
    return sum(len(a.data) for a in record.values())


def arrays_digest(record: ArrayRecord) -> str:
    """Content hash of an ArrayRecord (keys, shapes, dtypes and values), for the site's U-Net cache."""
    h = hashlib.sha256()
    for key in sorted(record.keys()):
        a = record[key]
        h.update(f"{key}\0{a.dtype}\0{a.shape}\0".encode())
        h.update(a.data)
    return h.hexdigest()[:32]
