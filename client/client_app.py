"""The site's Flower ClientApp: train one stage on local data, evaluate the global model, count labels.

Deployment starts a fresh process for every message (docs/design.md §6), so nothing is kept in memory
between rounds: the preprocessed site cache is reused from disk (``client.data.cache``), and what must
persist at the site between rounds lives in its ``client.federation.store.SiteStore``.

Only the half being trained, label counts and scalar metrics leave the site (``common.records``).
Errors are reported to the server by type only (``client.federation.errors``). Everything but the
handlers is in ``client.federation``; simulation-only code (``client.simulation``) is imported only
where a simulation's manifest asks for it, never when a hospital's SuperNode loads this app. The
deployed ``app`` has no fault injection: a simulation runs ``client.simulation.app``, the same
handlers built by ``make_app`` with its fault mod and data hook, so no branch here serves experiments.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import numpy as np
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from client.data.dataset import hematoma_slices
from client.federation.census import census_counts, census_key, census_record, guard_census, site_acquisitions
from client.federation.errors import SiteError, site_errors
from client.federation.exchange import receive_model, site_record
from client.federation.guard import policy_mod
from client.federation.node import SiteNode
from client.federation.policy import read_policy
from client.federation.secure_counts import secure_counts_keys, secure_counts_masked
from client.federation.secure_updates import masked_update_record, update_step
from client.federation.secure_validation import hold_validation, validation_step
from client.federation.site_clipping import site_clipping_mod
from client.federation.site_data import SiteData, open_site, site_label_counts, stage2_pos_weight, usable_examples
from client.federation.site_gan import gan_round, gan_round_metrics, global_generator, stage2_training_set
from client.federation.site_ledger import SiteBudget
from client.federation.site_radiomics import (
    held_out_features,
    local_update,
    received_weights,
    score_metrics,
    select_metrics,
    stats_metrics,
    training_features,
)
from client.federation.site_run import SiteRunConfig
from client.federation.store import SiteStore
from client.training.evaluate import evaluate
from client.training.privacy import SitePrivacy
from client.training.stage2_features import with_unet_vectors
from client.training.train import train_stage
from common.census import CENSUS, CENSUS_ACTION, STUDIES
from common.model import half_state_dict
from common.records import (
    ARRAYS,
    CONFIG,
    GAN_ACTION,
    HELLO_ACTION,
    LABEL_NEG,
    LABEL_POS,
    METRICS,
    NUM_EXAMPLES,
    RADIOMICS_ACTION,
    RADIOMICS_STATS_ACTION,
    SCORE_PHASE,
    SECURE,
    SECURE_KEYS,
    SECURE_MASK,
    SECURE_PHASE,
    SELECT_PHASE,
    SITE,
    STEPS,
    TRAIN_LOSS,
    TRAIN_SECONDS,
    UPDATE_PHASES,
    VALIDATION_PHASES,
    EvaluateInstruction,
    GanInstruction,
    RadiomicsInstruction,
    TrainInstruction,
    pack_counts,
    record_to_state,
    state_to_record,
)
from common.runtime import resolve_device, use_torch_threads
from common.validation import ValidationStats, selectable

#: How the handlers open the site's data: ``open_site`` in the deployed app; the simulation's app passes
#: one that also applies a virtual site's data fault (``client.simulation.app.open_faulty_site``).
OpenData = Callable[[SiteNode, SiteRunConfig], SiteData]


def _site_and_run(context: Context) -> tuple[SiteNode, SiteRunConfig]:
    """The node's facts and the run config, parsed once at the top of each handler."""
    use_torch_threads()  # this process's share of the cores (common.runtime), set where several sites share a machine
    run = SiteRunConfig.from_run_config(context.run_config)
    return SiteNode.from_context(context, run.config.data), run


def train(msg: Message, context: Context, open_data: OpenData = open_site) -> Message:
    """Train the half named by the round's stage; reply with that half, counts and the loss."""
    site, run = _site_and_run(context)
    order = TrainInstruction.from_record(msg.content[CONFIG])
    data = open_data(site, run)
    store = SiteStore.for_run(site, order.run_name)
    model, local_keys = receive_model(msg, run, store, order.stage, order.local_norm, order.unet_digest)
    cfg = run.train_config(order, site.site_id)  # this site's seed (site_run.site_seed), the same in every run
    budget = SiteBudget.for_site(site, read_policy(site.data_path))  # the site's delta bound and lifetime ledger
    privacy = SitePrivacy.open(run.config, store.root, data.train, order, cfg, run.model, budget)  # None: no DP
    train_ds = data.train
    if order.stage == 2:  # with gan.augment-ratio > 0: plus generated slices, in this process only
        generator = global_generator(msg, order, run, store)  # rounds.gan > 0: the GAN stage's; else the site's own
        train_ds = stage2_training_set(
            hematoma_slices(data.train),
            run,
            store,
            order.server_round,
            resolve_device(site.device),
            generator,
            site.site_id,
        )
        train_ds = with_unet_vectors(model, train_ds, resolve_device(site.device), store.root)
    loader = cfg.loader(train_ds, order.stage)
    pos_weight = stage2_pos_weight(run.pos_weight, order, model, data.train) if order.stage == 2 else None
    result = (
        privacy.train(model, cfg, resolve_device(site.device), pos_weight)
        if privacy is not None
        else train_stage(model, loader, order.stage, cfg, resolve_device(site.device), pos_weight)
    )

    state = half_state_dict(model.cpu(), order.half)
    if local_keys:
        store.save(f"norm-{order.half}", {k: v for k, v in state.items() if k in local_keys})
    examples = usable_examples(data.train, order.stage, run.model) if result.num_examples else 0
    arrays = state_to_record(state, exclude=local_keys)
    if run.config.privacy.secure_updates:  # the update and its weight leave only masked; 1/0: trained or not
        received = record_to_state(msg.content[ARRAYS])
        arrays = masked_update_record(msg, context, {k: state[k] for k in received}, received, examples)
        examples = int(examples > 0)
    metrics = MetricRecord(
        {
            NUM_EXAMPLES: examples,
            TRAIN_LOSS: float(result.loss),
            STEPS: int(result.steps),
            TRAIN_SECONDS: float(result.seconds),
        }
    )
    if not run.secure_counts:  # with secure counts, this site's counts leave it only masked
        metrics[LABEL_POS], metrics[LABEL_NEG] = site_label_counts(data.train, run.model)
    if privacy is not None:
        metrics.update(privacy.metrics())
    content = RecordDict({ARRAYS: arrays, METRICS: metrics, SITE: site_record(site)})
    return Message(content, reply_to=msg)


def train_gan_round(msg: Message, context: Context, open_data: OpenData = open_site) -> Message:
    """A round of the federated GAN stage (``rounds.gan``, docs/gan.md design (i)): train the global
    G and D on the training split's hematoma crops; reply with their state and scalars only."""
    site, run = _site_and_run(context)
    order = GanInstruction.from_record(msg.content[CONFIG])
    data = open_data(site, run)
    received = record_to_state(msg.content[ARRAYS])
    state, crops, result = gan_round(data.train, run, order, received, resolve_device(site.device), site.site_id)
    content = RecordDict(
        {ARRAYS: state_to_record(state), METRICS: gan_round_metrics(crops, result), SITE: site_record(site)}
    )
    return Message(content, reply_to=msg)


def evaluate_global(msg: Message, context: Context, open_data: OpenData = open_site) -> Message:
    """Score the global model on the site's own held-out patients; reply with scalars only.

    Test split: scalar metrics (the per-round record). Validation split: the sums of
    ``common.validation.ValidationStats`` (summed NLL per temperature, per-bin study counts, pixel
    counts) from which the server picks the best round, the thresholds and the temperatures; they never
    leave the site in the clear (one site's bins give back each study's logit and label): the reply
    carries a public key, and the later steps of the secure sum, evaluate messages too, send them only
    masked (``client.federation.secure_validation``). Only for rounds that can be chosen
    (``common.validation.selectable``: stage-1 rounds of a run with stage 2 cannot). The message holds the half of the current stage; the other half is the site's own copy: the
    frozen global U-Net (stage 2) or the untrained classifier built from the run's seed (stage 1).
    """
    site, run = _site_and_run(context)
    if str(msg.content[CONFIG].get(SECURE_PHASE, "")) in VALIDATION_PHASES:
        return validation_step(msg, context, site)
    order = EvaluateInstruction.from_record(msg.content[CONFIG])
    data = open_data(site, run)
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
    content = RecordDict({METRICS: metrics, SITE: site_record(site)})
    if selectable(order.stage, run.config.rounds.stage2):
        if not order.secure_session:
            raise SiteError("validation sums leave this site only masked; the evaluate message names no session")
        val = evaluate(model, data.val, resolve_device(site.device), run.eval_batch_size)
        stats = ValidationStats.from_outputs(val["arrays"]["studies"], val["arrays"]["dice_counts"].values())
        content[SECURE] = hold_validation(context, stats, order.server_round, order.secure_session)
    return Message(content, reply_to=msg)


def count_labels(msg: Message, context: Context, open_data: OpenData = open_site) -> Message:
    """The counts round: per-label positives and negatives of the training split, nothing else.

    With ``privacy.secure-counts`` the round is the two steps of ``common.secure_sum``: "keys"
    (reply with a fresh public key) and "mask" (reply with the masked counts only). The query steps
    of ``privacy.secure-updates`` come here too (``client.federation.secure_updates``).
    """
    site, run = _site_and_run(context)
    phase = str(msg.content[CONFIG].get(SECURE_PHASE, "")) if CONFIG in msg.content else ""
    if phase in UPDATE_PHASES:
        if not run.config.privacy.secure_updates:
            raise SiteError(f"secure updates step {phase!r} asked, but privacy.secure-updates is off for this run")
        return update_step(phase, msg, context, site)
    if run.secure_counts != bool(phase):
        raise SiteError(
            "privacy.secure-counts is on: this site sends its label counts only masked"
            if run.secure_counts
            else f"secure counts step {phase!r} asked, but privacy.secure-counts is off for this run"
        )
    if phase == SECURE_KEYS:
        return secure_counts_keys(msg, context, site)
    data = open_data(site, run)
    pos, neg = site_label_counts(data.train, run.model)
    if phase == SECURE_MASK:
        return secure_counts_masked(msg, context, site, pack_counts(pos, neg, len(data.train)))
    if phase:
        raise SiteError(f"unknown secure counts step {phase!r}")
    metrics = MetricRecord({NUM_EXAMPLES: len(data.train), LABEL_POS: pos, LABEL_NEG: neg})
    return Message(RecordDict({METRICS: metrics, SITE: site_record(site)}), reply_to=msg)


def hello(msg: Message, context: Context) -> Message:
    """The server's first message: the site id, and (through the policy mod) whether it takes this run."""
    site, _ = _site_and_run(context)
    return Message(RecordDict({METRICS: MetricRecord(), SITE: site_record(site)}), reply_to=msg)


def census(msg: Message, context: Context, open_data: OpenData = open_site) -> Message:
    """The data census (``common.census``): this site's summary statistics, guarded by its policy."""
    site, run = _site_and_run(context)
    cache = open_data(site, run).train.cache
    counts = guard_census(
        census_counts(cache, site_acquisitions(site)), read_policy(site.data_path), secret=census_key(site)
    )
    metrics = MetricRecord({NUM_EXAMPLES: int(counts[STUDIES][0])})
    return Message(RecordDict({METRICS: metrics, CENSUS: census_record(counts), SITE: site_record(site)}), reply_to=msg)


def radiomics_stats(msg: Message, context: Context, open_data: OpenData = open_site) -> Message:
    """The radiomics federation's first step (``client.federation.site_radiomics``): per-feature counts,
    sums and sums of squares of the training studies, and their label counts; no study's features."""
    site, run = _site_and_run(context)
    order = RadiomicsInstruction.from_record(msg.content[CONFIG])
    train = training_features(open_data(site, run), SiteStore.for_run(site, order.run_name))
    metrics = MetricRecord(stats_metrics(train))
    return Message(RecordDict({METRICS: metrics, SITE: site_record(site)}), reply_to=msg)


def radiomics_train(msg: Message, context: Context, open_data: OpenData = open_site) -> Message:
    """Local gradient steps of the global logistic weights on the site's training studies; reply with
    the weights and scalars only."""
    site, run = _site_and_run(context)
    order = RadiomicsInstruction.from_record(msg.content[CONFIG])
    train = training_features(open_data(site, run), SiteStore.for_run(site, order.run_name))
    arrays, metrics = local_update(train, order, received_weights(msg, order))
    content = RecordDict({ARRAYS: arrays, METRICS: MetricRecord(metrics), SITE: site_record(site)})
    return Message(content, reply_to=msg)


def radiomics_evaluate(msg: Message, context: Context, open_data: OpenData = open_site) -> Message:
    """Phase "select": every L2 candidate's validation sums; "score": the chosen weights' scalar test metrics
    and validation sums, as the deep evaluate reply. Validation and test studies are described on
    the masks of the global U-Net the message names."""
    site, run = _site_and_run(context)
    order = RadiomicsInstruction.from_record(msg.content[CONFIG])
    data = open_data(site, run)
    store = SiteStore.for_run(site, order.run_name)
    val, test = held_out_features(msg, order, run, data, store, str(resolve_device(site.device)))
    weights = received_weights(msg, order)
    if order.phase not in (SELECT_PHASE, SCORE_PHASE):
        raise SiteError(f"unknown radiomics evaluate phase {order.phase!r}")
    scores = (
        score_metrics(val, test, order, weights) if order.phase == SCORE_PHASE else select_metrics(val, order, weights)
    )
    return Message(RecordDict({METRICS: MetricRecord(scores), SITE: site_record(site)}), reply_to=msg)


def make_app(mods: Sequence[Mod] = (), open_data: OpenData = open_site) -> ClientApp:
    """The site's ClientApp: every handler above, opening the site's data with ``open_data``.

    Every message passes the site's policy first (``client.federation.guard``, docs/site-policy.md); with
    ``privacy.site-dp = "client-fixed"`` a train reply's update is then clipped by Flower's mod
    (``client.federation.site_clipping``; other runs pass it untouched); ``mods`` sit innermost, next to
    the handlers, so the clipping and the policy see what they return. One factory for both apps, so the
    simulation (``client.simulation.app``) runs exactly the deployed handlers, plus its fault injection.
    """
    app = ClientApp(mods=[policy_mod, site_clipping_mod, *mods])
    with_data = [
        (app.train(), "train", train),
        (app.train(GAN_ACTION), "GAN round", train_gan_round),
        (app.evaluate(), "evaluate", evaluate_global),
        (app.query(), "count labels", count_labels),
        (app.query(CENSUS_ACTION), "census", census),
        (app.query(RADIOMICS_STATS_ACTION), "radiomics stats", radiomics_stats),
        (app.train(RADIOMICS_ACTION), "radiomics train", radiomics_train),
        (app.evaluate(RADIOMICS_ACTION), "radiomics evaluate", radiomics_evaluate),
    ]
    for register, phase, handler in with_data:
        register(site_errors(phase)(functools.partial(handler, open_data=open_data)))
    app.query(HELLO_ACTION)(site_errors("hello")(hello))
    return app


#: The deployed ClientApp (pyproject ``[tool.flwr.app.components] clientapp``): no simulation code.
app = make_app()
