"""The site's Flower ClientApp: train one stage on local data, evaluate the global model, count labels.

Deployment starts a fresh process for every message (docs/design.md §6), so nothing is kept in memory
between rounds: the preprocessed site cache is reused from disk (``client.data.cache``), and what must
persist at the site between rounds lives in its ``client.federation.store.SiteStore``.

Only the half being trained, label counts and scalar metrics leave the site (``common.records``).
Errors are reported to the server by type only (``client.federation.errors``). Everything but the
handlers is in ``client.federation``; simulation-only code (``client.simulation``) is imported only
where a simulation's manifest asks for it, never when a hospital's SuperNode loads this app.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.data.dataset import make_loader
from client.federation.errors import SiteError, site_errors
from client.federation.exchange import receive_model, site_record
from client.federation.node import SiteNode
from client.federation.secure_counts import secure_counts_keys, secure_counts_masked
from client.federation.site_data import open_site, site_label_counts, stage2_pos_weight, usable_examples
from client.federation.site_run import SiteRunConfig
from client.federation.store import SiteStore
from client.training.evaluate import evaluate
from client.training.privacy import SitePrivacy
from client.training.train import train_stage
from common.model import half_state_dict
from common.records import (
    ARRAYS,
    CONFIG,
    LABEL_NEG,
    LABEL_POS,
    METRICS,
    NUM_EXAMPLES,
    SECURE_KEYS,
    SECURE_MASK,
    SECURE_PHASE,
    SITE,
    STEPS,
    TRAIN_LOSS,
    TRAIN_SECONDS,
    EvaluateInstruction,
    TrainInstruction,
    pack_counts,
    record_to_state,
    state_to_record,
)
from common.runtime import resolve_device
from common.validation import ValidationStats

app = ClientApp()


def _site_and_run(context: Context) -> tuple[SiteNode, SiteRunConfig]:
    """The node's facts and the run config, parsed once at the top of each handler."""
    run = SiteRunConfig.from_run_config(context.run_config)
    return SiteNode.from_context(context, run.config.data), run


@app.train()
@site_errors("train")
def train(msg: Message, context: Context) -> Message:
    """Train the half named by the round's stage; reply with that half, counts and the loss."""
    site, run = _site_and_run(context)
    order = TrainInstruction.from_record(msg.content[CONFIG])
    data = open_site(site, run)
    store = SiteStore.for_run(site, order.run_name)
    model, local_keys = receive_model(msg, run, store, order.stage, order.local_norm, order.unet_digest)
    cfg = run.train_config(order)
    privacy = SitePrivacy.open(run.config, store.root, data.train, order, cfg, run.model)  # None: privacy.dp off
    loader = make_loader(
        data.train, cfg.batch_size, shuffle=True, seed=cfg.seed, balanced=cfg.oversample(order.stage), stage=order.stage
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
    if site.fault:  # simulation manifests only: a site that corrupts what it sends
        from client.simulation.faults import corrupt_update, fault_seed

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
        {ARRAYS: state_to_record(state, exclude=local_keys), METRICS: metrics, SITE: site_record(site)}
    )
    return Message(content, reply_to=msg)


@app.evaluate()
@site_errors("evaluate")
def evaluate_global(msg: Message, context: Context) -> Message:
    """Score the global model on the site's own held-out patients; reply with scalars only.

    Test split: scalar metrics (the per-round record). Validation split: the sums of
    ``common.validation.ValidationStats`` (``val/`` keys: summed NLL per temperature, per-bin
    study counts, pixel counts) from which the server picks the best round, the thresholds and the
    temperatures; never a study's own logit. The message holds the half of the current stage; the other half is the site's own copy: the
    frozen global U-Net (stage 2) or the untrained classifier built from the run's seed (stage 1).
    """
    site, run = _site_and_run(context)
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
    val = evaluate(model, data.val, resolve_device(site.device), run.eval_batch_size)
    stats = ValidationStats.from_outputs(val["arrays"]["studies"], val["arrays"]["dice_counts"].values())
    metrics.update(stats.to_metrics())
    return Message(RecordDict({METRICS: metrics, SITE: site_record(site)}), reply_to=msg)


@app.query()
@site_errors("count labels")
def count_labels(msg: Message, context: Context) -> Message:
    """The counts round: per-label positives and negatives of the training split, nothing else.

    With ``privacy.secure-counts`` the round is the two steps of ``common.secure_sum``: "keys"
    (reply with a fresh public key) and "mask" (reply with the masked counts only).
    """
    site, run = _site_and_run(context)
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
    return Message(RecordDict({METRICS: metrics, SITE: site_record(site)}), reply_to=msg)
