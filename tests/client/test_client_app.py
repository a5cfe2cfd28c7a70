"""The ClientApp's handlers called directly with a Message and a Context (no Flower process)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, MessageType, RecordDict

from client.client_app import app
from client.data.cache import build_site_cache
from client.data.dataset import SliceDataset, split_slices
from client.federation.errors import SiteError
from client.federation.node import partition_site
from client.federation.site_run import SiteRunConfig
from client.simulation.partitions import Partition, write_partitions
from common.config import LABELS
from common.losses import label_counts
from common.model import build_joint_model, half_state_dict, norm_state_keys
from common.records import (
    ARRAYS,
    CONFIG,
    FROZEN_UNET,
    LABEL_NEG,
    LABEL_POS,
    MASKED_VALIDATION,
    METRICS,
    NUM_EXAMPLES,
    PUBLIC_KEY,
    SECURE,
    SECURE_PHASE,
    SECURE_SESSION,
    SERVER_ROUND,
    SITE,
    SITE_ID,
    VALIDATION_MASK,
    EvaluateInstruction,
    TrainInstruction,
    arrays_digest,
    pack_peers,
    state_to_record,
)
from common.run_config import model_from_run_config
from common.secure_sum import generate_key_pair
from common.secure_validation import vector_length
from simulations.sites import discover_sites
from tests.helpers.data import write_site
from tests.helpers.flower import make_context, make_message, run_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


RUN = run_config(**{"model.image-size": 32, "train.local-steps": 2, "train.batch-size": 4})
MODEL_CFG, PREPROCESS = model_from_run_config(RUN)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("client_app")
    data = write_site(root / "data" / "site-07", n_studies=5, shape=(4, 40, 40), seed=3)
    cache = root / "cache"
    build_site_cache(data, cache, PREPROCESS)  # what `flwr-client prepare` does once
    return {"data-path": str(data), "cache-dir": str(cache)}


@pytest.fixture(scope="module")
def model():
    return build_joint_model(MODEL_CFG, seed=0)


def call(handler_type: str, content: RecordDict, node: dict, run: dict = RUN):
    return app(make_message(content, handler_type), make_context(node, run))


def train_message(model, stage: int, **kw) -> RecordDict:
    half = "unet" if stage == 1 else "classifier"
    unet = state_to_record(half_state_dict(model, "unet"))
    order = TrainInstruction(
        server_round=1,
        stage=stage,
        lr=1e-3,
        local_steps=2,
        run_name="t",
        unet_digest=arrays_digest(unet) if stage == 2 else "",
        pos_weight=(2.0, 1.0, 1.0, 3.0) if stage == 2 else None,
        **kw,
    )
    content = RecordDict({ARRAYS: state_to_record(half_state_dict(model, half)), CONFIG: order.to_record()})
    if stage == 2:
        content[FROZEN_UNET] = unet
    return content


def train_split_counts(node: dict) -> tuple[list[int], list[int]]:
    cache, _ = build_site_cache(Path(node["data-path"]), Path(node["cache-dir"]), PREPROCESS)
    run = SiteRunConfig.from_run_config(RUN)
    idx = split_slices(cache, run.split, seed=run.seed)["train"]
    cols = [LABELS.index(n) for n in MODEL_CFG.output_names]
    pos, neg = label_counts(SliceDataset(cache, idx).labels()[:, cols])
    return pos.tolist(), neg.tolist()


@pytest.mark.parametrize("stage, half", [(1, "unet"), (2, "classifier")])
def test_train_replies_with_the_trained_half_counts_and_metrics(site, model, stage, half):
    reply = call(MessageType.TRAIN, train_message(model, stage), site)
    assert not reply.has_error()
    assert set(reply.content.keys()) == {ARRAYS, METRICS, SITE}
    sent_back = reply.content[ARRAYS]
    assert set(sent_back) == set(half_state_dict(model, half))  # only the half being trained
    before = half_state_dict(model, half)
    assert any(not np.allclose(sent_back[k].numpy(), before[k].numpy()) for k in sent_back), "nothing trained"
    metrics = reply.content[METRICS]
    pos, neg = train_split_counts(site)
    assert metrics[LABEL_POS] == pos and metrics[LABEL_NEG] == neg
    assert isinstance(metrics[NUM_EXAMPLES], int) and metrics[NUM_EXAMPLES] > 0
    assert reply.content[SITE][SITE_ID] == "site-07"


def test_stage2_reuses_the_stored_unet(site, model):
    first = train_message(model, 2)
    assert not call(MessageType.TRAIN, first, site).has_error()
    later = RecordDict({k: first[k] for k in (ARRAYS, CONFIG)})  # no FROZEN_UNET this time
    assert not call(MessageType.TRAIN, later, site).has_error()
    unknown = RecordDict(
        {
            ARRAYS: first[ARRAYS],
            CONFIG: TrainInstruction(server_round=2, stage=2, lr=1e-3, unet_digest="f" * 32, run_name="t").to_record(),
        }
    )
    with pytest.raises(SiteError, match="not stored at this site"):
        call(MessageType.TRAIN, unknown, site)


def test_fedbn_keeps_norm_layers_at_the_site(site, model, tmp_path):
    node = {**site, "cache-dir": str(tmp_path / "cache")}
    local = norm_state_keys(model)
    msg = train_message(model, 1, local_norm=True)
    msg[ARRAYS] = state_to_record(half_state_dict(model, "unet"), exclude=local)
    reply = call(MessageType.TRAIN, msg, node)
    assert not set(reply.content[ARRAYS]) & local
    stored = torch.load(tmp_path / "cache" / "federation" / "site-07" / "t" / "norm-unet.pt", weights_only=True)
    assert set(stored) == {k for k in local if k.startswith("unet.")}
    assert int(stored["unet.encoder._bn0.num_batches_tracked"]) > 0  # the site's own statistics


def test_evaluate_replies_with_scalars_only(site, model):
    """Test metrics as scalars; a round that can be chosen adds a public key, and its validation sums
    leave only masked, in the later step (``client.federation.secure_validation``); never a ``val/`` list."""
    for stage in (1, 2):
        unet = state_to_record(half_state_dict(model, "unet"))
        half = "unet" if stage == 1 else "classifier"
        order = EvaluateInstruction(
            server_round=1,
            stage=stage,
            run_name="t",
            unet_digest=arrays_digest(unet) if stage == 2 else "",
            secure_session="validation-1-1" if stage == 2 else "",
        )
        content = RecordDict({ARRAYS: state_to_record(half_state_dict(model, half)), CONFIG: order.to_record()})
        if stage == 2:
            content[FROZEN_UNET] = unet
        context = make_context(site, RUN)
        reply = app(make_message(content, MessageType.EVALUATE), context)
        metrics = reply.content[METRICS]
        assert {"dice", "iou", "fscore", "macro_auc_study", "volume_mae_ml", NUM_EXAMPLES} <= set(metrics)
        assert all(isinstance(v, (int, float)) for v in metrics.values())  # no list: no sums, no study's value
        if stage == 1:  # the run has stage-2 rounds: a stage-1 round is never chosen, so no validation pass
            assert set(reply.content.keys()) == {METRICS, SITE}
            continue
        assert set(reply.content.keys()) == {METRICS, SITE, SECURE} and set(reply.content[SECURE]) == {PUBLIC_KEY}
        _, peer = generate_key_pair()
        step = RecordDict(
            {
                CONFIG: ConfigRecord(
                    {SERVER_ROUND: 1, SECURE_PHASE: VALIDATION_MASK, SECURE_SESSION: "validation-1-1"}
                ),
                SECURE: ConfigRecord(pack_peers({7: reply.content[SECURE][PUBLIC_KEY], 8: peer})),
            }
        )
        masked = app(make_message(step, MessageType.EVALUATE), context)
        assert set(masked.content.keys()) == {ARRAYS, METRICS, SITE} and not dict(masked.content[METRICS])
        words = masked.content[ARRAYS][MASKED_VALIDATION].numpy()
        assert words.dtype == np.uint32 and words.shape == (vector_length(len(model.output_names)),)
        with pytest.raises(SiteError, match="no key for this secure validation session"):  # one session, one use
            app(make_message(step, MessageType.EVALUATE), context)
        without = RecordDict({**dict(content.items()), CONFIG: replace(order, secure_session="").to_record()})
        with pytest.raises(SiteError, match="only masked"):  # never a plain validation sum
            call(MessageType.EVALUATE, without, site)


def test_counts_query(site):
    reply = call(MessageType.QUERY, RecordDict({CONFIG: ConfigRecord({"server-round": 3})}), site)
    pos, neg = train_split_counts(site)
    assert reply.content[METRICS][LABEL_POS] == pos and reply.content[METRICS][LABEL_NEG] == neg


def test_failures_reach_the_server_without_paths(model, tmp_path):
    secret = tmp_path / "P000-DOE^PATIENT"
    with pytest.raises(SiteError) as info:
        call(MessageType.TRAIN, train_message(model, 1), {"data-path": str(secret), "cache-dir": str(tmp_path)})
    assert "P000" not in str(info.value) and str(tmp_path) not in str(info.value)
    assert "train failed" in str(info.value)


def test_simulation_partition_is_the_ith_site(tmp_path):
    for name in ("site-02", "site-01", ".hidden"):
        (tmp_path / name / "dicom").mkdir(parents=True)
    (tmp_path / "notes").mkdir()
    assert [partition_site(tmp_path, i) for i in range(2)] == discover_sites(tmp_path)
    with pytest.raises(SiteError, match="partition 2 has no site"):
        partition_site(tmp_path, 2)


def test_simulation_partition_from_a_manifest_trains_on_that_cache(site, model, tmp_path):
    """``data.partitions``: node partition i trains on the i-th manifest entry's prebuilt cache."""
    cache, _ = build_site_cache(Path(site["data-path"]), Path(site["cache-dir"]), PREPROCESS)
    manifest = write_partitions(
        tmp_path / "parts.json", [Partition("virtual-a", "/nowhere"), Partition("virtual-b", str(cache.path))]
    )
    run = {**RUN, "data.partitions": str(manifest)}
    reply = app(make_message(train_message(model, 1), MessageType.TRAIN), make_context({"partition-id": 1}, run))
    assert not reply.has_error()
    assert reply.content[SITE][SITE_ID] == "virtual-b"
    assert reply.content[METRICS][LABEL_POS] == train_split_counts(site)[0]
    with pytest.raises(SiteError, match="partition 2 has no entry: the manifest lists 2"):
        app(make_message(train_message(model, 1), MessageType.TRAIN), make_context({"partition-id": 2}, run))
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(SiteError, match="not a readable partition manifest"):
        app(
            make_message(train_message(model, 1), MessageType.TRAIN),
            make_context({"partition-id": 0}, {**RUN, "data.partitions": str(tmp_path / "bad.json")}),
        )
