"""A site with ``gan.augment-ratio`` > 0: stage 2 trains on generated slices too, and nothing of the
GAN (generator, generated slices) is in the reply; the generator stays in the site's store."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, MessageType, RecordDict

from client.client_app import app
from client.data.cache import build_site_cache
from client.data.dataset import SliceDataset
from client.federation.site_gan import GENERATOR, gan_round, gan_round_metrics
from client.federation.site_run import SiteRunConfig
from common.gan import build_gan, gan_state_dict, get_gan_preset
from common.model import build_joint_model, half_state_dict
from common.records import ARRAYS, METRICS, SITE, GanInstruction, state_to_record
from common.run_config import model_from_run_config
from server.validation import array_specs, check_reply, gan_schema
from tests.client.test_client_app import train_message
from tests.helpers.cache import hypodensity_cache
from tests.helpers.data import write_site
from tests.helpers.flower import make_context, make_message, run_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BASE = {"model.image-size": 32, "train.local-steps": 2, "train.batch-size": 4, "data.val-fraction": 0.0}
RUN = run_config(**BASE, **{"gan.augment-ratio": 1.0, "gan.steps": 2})
PLAIN = run_config(**BASE)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("site_gan")
    data = write_site(root / "data" / "site-03", n_studies=6, shape=(4, 40, 40), seed=5)  # hypodensity: i % 2
    build_site_cache(data, root / "cache", model_from_run_config(RUN)[1])
    return {"data-path": str(data), "cache-dir": str(root / "cache")}


def test_stage2_with_generated_slices_replies_with_the_classifier_only(site):
    model = build_joint_model(model_from_run_config(RUN)[0], seed=0)
    node = site
    reply = app(make_message(train_message(model, 2), MessageType.TRAIN), make_context(node, RUN))
    assert not reply.has_error()
    assert set(reply.content.keys()) == {ARRAYS, METRICS, SITE}
    classifier = half_state_dict(model, "classifier")
    sent = reply.content[ARRAYS]
    assert set(sent) == set(classifier)  # no generator, no generated image: the half and nothing else
    assert all(sent[k].numpy().size == classifier[k].numel() for k in sent)  # scalars travel as (1,)
    assert all(isinstance(v, (int, float, list)) for v in reply.content[METRICS].values())
    stored = site["cache-dir"] + "/federation/site-03/t/" + GENERATOR + ".pt"
    generator = torch.load(stored, weights_only=True)
    assert generator and not set(generator) & set(sent)
    plain = app(make_message(train_message(model, 2), MessageType.TRAIN), make_context(node, PLAIN))
    # the generated slices changed what stage 2 learnt
    assert any(not np.allclose(sent[k].numpy(), plain.content[ARRAYS][k].numpy()) for k in sent)


def test_a_site_without_both_classes_trains_on_its_real_slices(tmp_path):
    from client.federation.site_gan import stage2_training_set
    from client.federation.store import SiteStore

    real = SliceDataset(hypodensity_cache([0, 0, 0]), np.arange(6))  # no hypodensity-positive crop
    store = SiteStore(tmp_path / "store")
    assert stage2_training_set(real, SiteRunConfig.from_run_config(RUN), store, 1, "cpu") is real
    assert store.load(GENERATOR) is None  # no generator was made
    both = SliceDataset(hypodensity_cache([0, 1, 0, 1]), np.arange(8))
    augmented = stage2_training_set(both, SiteRunConfig.from_run_config(RUN), store, 1, "cpu")
    assert len(augmented) == 16 and store.load(GENERATOR) is not None  # ratio 1.0


def test_a_gan_round_at_a_site_without_both_classes_sits_out_with_zero_examples():
    """No hypodensity-positive crop: the site replies with the state it received and 0 examples,
    which the server's reply check accepts (NaN losses only with 0 examples) and FedAvg leaves out."""
    run = SiteRunConfig.from_run_config(run_config(**BASE, **{"gan.augment-ratio": 1.0, "rounds.gan": 1}))
    received = gan_state_dict(*build_gan(get_gan_preset("tiny"), seed=3))
    order = GanInstruction(server_round=2, local_steps=2)
    state, crops, result = gan_round(
        SliceDataset(hypodensity_cache([0, 0, 0]), np.arange(6)), run, order, received, "cpu"
    )
    assert crops == 0 and result is None and all(torch.equal(state[k], received[k]) for k in received)
    metrics = gan_round_metrics(crops, result)
    assert metrics["num-examples"] == 0 and metrics["steps"] == 0 and math.isnan(metrics["gan-d-loss"])
    record = state_to_record(state)
    schema = gan_schema(array_specs(record), 0)
    reply = RecordDict({ARRAYS: record, METRICS: metrics, SITE: ConfigRecord({"site-id": "site-03"})})
    assert check_reply(reply, f"{MessageType.TRAIN}.gan", schema) == []
    metrics["num-examples"] = 5  # a site that claims to have trained must report finite losses
    assert {p.rule for p in check_reply(reply, f"{MessageType.TRAIN}.gan", schema)} == {"not-finite"}

    both = SliceDataset(hypodensity_cache([0, 1, 0, 1]), np.arange(8))
    state, crops, result = gan_round(both, run, order, received, "cpu")
    assert crops == 4 and result.steps == 2 and set(state) == set(received)
    assert any(not torch.equal(state[k], received[k]) for k in received)  # trained
