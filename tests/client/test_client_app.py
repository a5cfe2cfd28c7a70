"""The ClientApp's handlers called directly with a Message and a Context (no Flower process)."""

from __future__ import annotations

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
    METRICS,
    NUM_EXAMPLES,
    SITE,
    SITE_ID,
    EvaluateInstruction,
    TrainInstruction,
    arrays_digest,
    state_to_record,
)
from common.run_config import model_from_run_config
from common.study_metrics import TEMPERATURES
from common.validation import ValidationStats
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
    for stage in (1, 2):
        unet = state_to_record(half_state_dict(model, "unet"))
        half = "unet" if stage == 1 else "classifier"
        order = EvaluateInstruction(
            server_round=1, stage=stage, run_name="t", unet_digest=arrays_digest(unet) if stage == 2 else ""
        )
        content = RecordDict({ARRAYS: state_to_record(half_state_dict(model, half)), CONFIG: order.to_record()})
        if stage == 2:
            content[FROZEN_UNET] = unet
        reply = call(MessageType.EVALUATE, content, site)
        assert set(reply.content.keys()) == {METRICS, SITE}
        metrics = reply.content[METRICS]
        assert {"dice", "iou", "fscore", "macro_auc_study", "volume_mae_ml", NUM_EXAMPLES} <= set(metrics)
        sums = {k for k in metrics if k.startswith("val/")}  # validation sums (common.validation), no per-study value
        assert all(isinstance(v, (int, float)) for k, v in metrics.items() if k not in sums)
        if stage == 1:  # the run has stage-2 rounds: a stage-1 round is never chosen, so no validation pass
            assert not sums
            continue
        stats = ValidationStats.from_metrics(metrics, len(model.output_names))
        assert stats.pos_hist.sum() + stats.neg_hist.sum() > 0 and stats.temperature_nll.shape[0] == len(TEMPERATURES)


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
