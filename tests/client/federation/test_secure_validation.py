"""Issue 27 item 4: one site's reply must not give back its validation studies' scores and labels.

The attack: the server turns every bin count of one site's validation histograms back into (logit bin
centre, label) pairs. On the plain ``val/`` histograms the evaluate reply used to carry
(``ValidationStats.to_metrics``) it recovers all 30 studies of a site, each logit to within 1/128 (the
half bin, < 0.008) and every label right. On what the site sends now (the real evaluate handler, then its
masked step with two peers) the same reading gets nothing: the words are uniform on [0, 2^32) whatever
the studies, so neither a study's bin nor its label shows. Run with ``-s`` to see both outcomes.

The bound: against a server without the other sites' private keys, one site's masked vector is uniform
on [0, 2^32)^L and independent of its studies (up to X25519, HKDF-SHA256 and SHAKE-256); what the server
can learn is the sum over the session's sites (>= 2), i.e. all their studies' binned logits and labels
pooled, never which site a study belongs to (docs/secure-aggregation.md §7).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import ConfigRecord, MessageType, MetricRecord, RecordDict
from scipy import stats as scipy_stats

import client.client_app as client_app
from common.model import build_joint_model, half_state_dict
from common.records import (
    ARRAYS,
    CONFIG,
    FROZEN_UNET,
    MASKED_VALIDATION,
    METRICS,
    PUBLIC_KEY,
    SECURE,
    SECURE_PHASE,
    SECURE_SESSION,
    SERVER_ROUND,
    VALIDATION_MASK,
    EvaluateInstruction,
    arrays_digest,
    pack_peers,
    state_to_record,
)
from common.run_config import model_from_run_config
from common.secure_sum import MODULUS, expand_mask, generate_key_pair, pair_seed
from common.secure_validation import pack_validation
from common.validation import LOGIT_EDGES, N_BINS, ValidationStats
from tests.helpers.flower import make_context, make_message, run_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RUN = run_config(**{"model.image-size": 32, "rounds.stage1": 0, "rounds.stage2": 2})
MODEL_CFG, _ = model_from_run_config(RUN)
N_STUDIES = 30
SITE_NODE, PEERS = 7, (3, 11)
SESSION = "validation-1-1"
HALF_BIN = (LOGIT_EDGES[1] - LOGIT_EDGES[0]) / 2  # 1/128


def studies(seed: int) -> SimpleNamespace:
    """30 validation studies of one site: study logits inside the histogram's range, labels 0/1."""
    rng = np.random.default_rng(seed)
    c = len(MODEL_CFG.output_names)
    logits = np.clip(rng.normal(0.0, 2.0, (N_STUDIES, c)), -7.9, 7.9)
    labels = (rng.random((N_STUDIES, c)) < 0.3).astype(np.float64)
    return SimpleNamespace(logits=logits, labels=labels)


# --- the attack: only what the server receives from the one site -------------------------------


def read_histograms(sent: list[RecordDict], n_cols: int) -> tuple[np.ndarray, np.ndarray]:
    """The positive and negative bin counts [B, C] as the server reads them from one site's messages:
    the plain ``val/`` lists, or the first 2 B C words of a masked validation vector (its layout is public)."""
    for content in sent:
        metrics = content[METRICS] if METRICS in content else {}
        if "val/pos_hist" in metrics:
            pos, neg = np.asarray(metrics["val/pos_hist"]), np.asarray(metrics["val/neg_hist"])
            return pos.reshape(N_BINS, n_cols), neg.reshape(N_BINS, n_cols)
        if ARRAYS in content and MASKED_VALIDATION in content[ARRAYS]:
            words = content[ARRAYS][MASKED_VALIDATION].numpy().astype(np.int64)
            b = N_BINS * n_cols
            return words[:b].reshape(N_BINS, n_cols), words[b : 2 * b].reshape(N_BINS, n_cols)
    raise AssertionError("the site sent no validation histograms at all")


def recover(pos: np.ndarray, neg: np.ndarray, n_pos: np.ndarray, n_neg: np.ndarray) -> list[list[tuple[float, int]]]:
    """Per column, the (logit, label) pairs read back: each bin's count as that many studies at the bin
    centre. The attacker is also given each column's number of positive and negative studies, and keeps
    the bins with the largest counts up to them (on a true histogram: exactly its studies)."""
    centres = (LOGIT_EDGES[:-1] + LOGIT_EDGES[1:]) / 2
    out = []
    for c in range(pos.shape[1]):
        pairs = []
        for counts, label, n in ((pos[:, c], 1, n_pos[c]), (neg[:, c], 0, n_neg[c])):
            order = np.argsort(-counts, kind="stable")
            take = np.repeat(order, np.minimum(counts[order], n).astype(np.int64))[: int(n)]
            pairs += [(float(centres[b]), label) for b in take]
        out.append(pairs)
    return out


def score_attack(recovered: list[list[tuple[float, int]]], truth: SimpleNamespace) -> dict[str, float]:
    """How many true (logit, label) pairs the recovery got: a recovered pair matches a study with the same
    label whose logit lies within half a bin (one to one), and the largest error over the matches."""
    hits, worst = 0, 0.0
    for c, pairs in enumerate(recovered):
        left = [(float(z), int(y)) for z, y in zip(truth.logits[:, c], truth.labels[:, c])]
        for z, y in pairs:
            close = [i for i, (tz, ty) in enumerate(left) if ty == y and abs(tz - z) <= HALF_BIN + 1e-12]
            if close:
                i = min(close, key=lambda i: abs(left[i][0] - z))
                worst = max(worst, abs(left[i][0] - z))
                hits += 1
                left.pop(i)
    total = truth.logits.size
    return {"pairs": total, "recovered": hits, "max_error": worst}


def attack(sent: list[RecordDict], truth: SimpleNamespace) -> dict[str, float]:
    pos, neg = read_histograms(sent, truth.logits.shape[1])
    n_pos, n_neg = truth.labels.sum(axis=0), (1 - truth.labels).sum(axis=0)
    return score_attack(recover(pos, neg, n_pos, n_neg), truth)


# --- one site's messages, old path and new ---------------------------------------------------


def plain_reply(truth: SimpleNamespace) -> RecordDict:
    """The validation part of an evaluate reply before issue 27: ``stats.to_metrics()`` in its metrics."""
    stats = ValidationStats.from_outputs(truth, [(50, 5, 7)])
    return RecordDict({METRICS: MetricRecord(stats.to_metrics())})


def secure_replies(truth: SimpleNamespace, tmp_path, monkeypatch) -> tuple[list[RecordDict], dict[int, bytes]]:
    """Everything the site sends for a round that can be chosen, from the real ClientApp: its evaluate
    reply (test metrics and a public key) and its masked step (two peers). Returns also the peers' keys.
    The model's scoring is replaced by ``truth`` so that the studies are known; the handler is the real one."""
    model = build_joint_model(MODEL_CFG, seed=0)
    split = SimpleNamespace(test=[0] * 8, val=["validation"])

    def scored(_model, ds, _device, _batch) -> dict:
        if ds is split.val:
            return {"arrays": {"studies": truth, "dice_counts": {"s": (50, 5, 7)}}}
        return {"dice": 0.5, "n_studies": 2, "arrays": {}}

    monkeypatch.setattr(client_app, "evaluate", scored)
    app = client_app.make_app(open_data=lambda site, run: split)
    node = {"data-path": str(tmp_path / "site-07"), "cache-dir": str(tmp_path / "cache")}
    context = make_context(node, RUN, node_id=SITE_NODE)
    unet = state_to_record(half_state_dict(model, "unet"))
    order = EvaluateInstruction(
        server_round=1, stage=2, run_name="t", unet_digest=arrays_digest(unet), secure_session=SESSION
    )
    content = RecordDict(
        {ARRAYS: state_to_record(half_state_dict(model, "classifier")), CONFIG: order.to_record(), FROZEN_UNET: unet}
    )
    first = app(make_message(content, MessageType.EVALUATE, SITE_NODE), context)
    assert not first.has_error(), first.error
    peers = {n: generate_key_pair() for n in PEERS}
    keys = {SITE_NODE: first.content[SECURE][PUBLIC_KEY], **{n: pub for n, (_, pub) in peers.items()}}
    step = RecordDict(
        {
            CONFIG: ConfigRecord({SERVER_ROUND: 1, SECURE_PHASE: VALIDATION_MASK, SECURE_SESSION: SESSION}),
            SECURE: ConfigRecord(pack_peers(keys)),
        }
    )
    second = app(make_message(step, MessageType.EVALUATE, SITE_NODE), context)
    assert not second.has_error(), second.error
    return [first.content, second.content], {n: private for n, (private, _) in peers.items()}


def test_the_attack_recovers_every_study_from_the_plain_histograms():
    truth = studies(0)
    result = attack([plain_reply(truth)], truth)
    print(f"\nold reply (plain val/ histograms): {result}")
    assert result["recovered"] == result["pairs"] == N_STUDIES * len(MODEL_CFG.output_names)
    assert result["max_error"] <= HALF_BIN < 0.008


def test_the_attack_gets_nothing_from_what_a_site_sends_now(tmp_path, monkeypatch):
    truth = studies(0)
    sent, peer_keys = secure_replies(truth, tmp_path, monkeypatch)
    assert not any(k.startswith("val/") for c in sent if METRICS in c for k in c[METRICS])  # no plain sum leaves
    result = attack(sent, truth)
    print(f"\nnew replies (evaluate + masked step): {result}")
    # chance: picking n bins of 1,024 at random hits about n^2 / 1024 studies a label and column (~2.5 in all)
    assert result["recovered"] <= 20 < result["pairs"]

    pos, neg = read_histograms(sent, truth.logits.shape[1])
    true = ValidationStats.from_outputs(truth)
    true_pos, true_neg = true.pos_hist, true.neg_hist
    words = np.concatenate([pos.ravel(), neg.ravel()])
    # not a histogram of 30 studies: uniform words, as many high as low (chi-square on 64 equal buckets)
    assert words.sum() > 10**12 and scipy_stats.chisquare(np.bincount(words >> 26, minlength=64)).pvalue > 1e-6
    # which bins hold a study does not show: the words of occupied and of empty bins have one distribution
    occupied = np.concatenate([true_pos.ravel(), true_neg.ravel()]) > 0
    assert scipy_stats.ks_2samp(words[occupied], words[~occupied]).pvalue > 1e-6
    assert abs(np.corrcoef(words, np.concatenate([true_pos.ravel(), true_neg.ravel()]))[0, 1]) < 0.06

    # with the peers' masks (what the server never has) the words are exactly the site's packed sums:
    # the masking hides them, it does not change them
    masked = sent[1][ARRAYS][MASKED_VALIDATION].numpy().astype(np.uint64)
    site_key = sent[0][SECURE][PUBLIC_KEY]
    unmasked = masked.copy()
    for node, private in peer_keys.items():
        mask = expand_mask(pair_seed(private, site_key, SESSION, node, SITE_NODE), masked.size)
        unmasked = (unmasked + (mask if node < SITE_NODE else MODULUS - mask)) % MODULUS
    plain = pack_validation(ValidationStats.from_outputs(truth, [(50, 5, 7)]))
    np.testing.assert_array_equal(unmasked, plain)


def test_two_sites_studies_cannot_be_told_apart_from_their_masked_vectors(tmp_path, monkeypatch):
    """The masked vector's distribution does not depend on the studies: a site with other studies
    (other logits, every label flipped) sends words the server cannot tell from the first site's."""
    a, _ = secure_replies(studies(0), tmp_path / "a", monkeypatch)
    flipped = studies(1)
    flipped.labels = 1 - flipped.labels
    b, _ = secure_replies(flipped, tmp_path / "b", monkeypatch)
    wa, wb = (s[1][ARRAYS][MASKED_VALIDATION].numpy().astype(np.int64) for s in (a, b))
    assert scipy_stats.ks_2samp(wa, wb).pvalue > 1e-6
