"""Simulated faulty sites (client.simulation.faults): validation, each update fault against tensors computed
here, label-flip on a real site cache, the simulation's ClientApp (client.simulation.app) sending what the
manifest's fault says, and the deployed ClientApp sending the honest update for the same manifest."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from flwr.app import MessageType, RecordDict

from client.client_app import app as deployed_app
from client.data.cache import build_site_cache
from client.data.dataset import SliceDataset, make_loader, split_slices, stage_positives
from client.federation.errors import SiteError
from client.simulation.app import app, open_faulty_site
from client.simulation.faults import (
    FAULT_KINDS,
    FaultError,
    LabelFlipped,
    corrupt_training_data,
    corrupt_update,
    fault_seed,
    flip_labels,
    parse_fault,
    reported_examples,
)
from client.simulation.partitions import MANIFEST_FORMAT, Partition, read_partitions, write_partitions
from common.model import build_joint_model, half_state_dict
from common.records import (
    ARRAYS,
    CONFIG,
    LABEL_NEG,
    LABEL_POS,
    METRICS,
    NUM_EXAMPLES,
    TrainInstruction,
    record_to_state,
    state_to_record,
)
from common.run_config import model_from_run_config
from tests.helpers.data import write_site
from tests.helpers.flower import make_context, make_message, run_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FLIP = {"kind": "label-flip"}
RUN = run_config(**{"model.image-size": 32, "train.local-steps": 2, "train.batch-size": 4})
MODEL_CFG, PREPROCESS = model_from_run_config(RUN)


def states(seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A global half and the half after (pretend) training: floats, an int buffer, a local-only key."""
    g = torch.Generator().manual_seed(seed)
    glob = {
        "unet.a.weight": torch.randn(3, 4, generator=g),
        "unet.bn.running_var": torch.rand(4, generator=g) + 0.5,
        "unet.bn.num_batches_tracked": torch.tensor(7),
    }
    local = {
        k: (v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v + 2) for k, v in glob.items()
    }
    local["unet.extra.weight"] = torch.randn(2, generator=g)  # not sent by the server (FedBN-style): left alone
    return glob, local


# --- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fault, expected",
    [
        ({"kind": "label-flip"}, {"markers": True, "mask": True}),
        ({"kind": "label-flip", "mask": False}, {"markers": True, "mask": False}),
        ({"kind": "scale", "factor": 10.0}, {"factor": 10.0}),
        ({"kind": "scale", "factor": -3}, {"factor": -3}),
        ({"kind": "sign-flip"}, {"factor": 1.0}),
        ({"kind": "sign-flip", "factor": 4}, {"factor": 4}),
        ({"kind": "noise", "std": 0.5}, {"std": 0.5}),
        ({"kind": "nan"}, {"value": "nan"}),
        ({"kind": "nan", "value": "-inf"}, {"value": "-inf"}),
        ({"kind": "inflate", "factor": 1000}, {"factor": 1000}),
    ],
)
def test_valid_faults_fill_their_defaults(fault, expected):
    parsed = parse_fault(fault)
    assert parsed.kind == fault["kind"] and dict(parsed.params) == expected
    assert parsed.corrupts_data == (fault["kind"] == "label-flip")


@pytest.mark.parametrize("fault", [None, {}])
def test_no_fault_is_an_honest_site(fault):
    assert parse_fault(fault) is None
    glob, local = states()
    out = corrupt_update(glob, local, fault)
    assert out.keys() == local.keys() and all(out[k] is local[k] for k in local)


@pytest.mark.parametrize(
    "fault, message",
    [
        ("scale", "must be a dict"),
        (
            {"factor": 2.0},
            "has no 'kind'; valid kinds: \\['inflate', 'label-flip', 'nan', 'noise', 'scale', 'sign-flip'\\]",
        ),
        ({"kind": "flip"}, "unknown fault kind 'flip'; valid kinds: \\['inflate', 'label-flip'"),
        ({"kind": "scale"}, "fault 'scale' needs parameter 'factor'"),
        ({"kind": "noise"}, "fault 'noise' needs parameter 'std'"),
        (
            {"kind": "scale", "factor": 2.0, "std": 1.0},
            "fault 'scale' has unknown parameter\\(s\\) \\['std'\\]; it takes \\['factor'\\]",
        ),
        ({"kind": "scale", "factor": "10"}, "fault 'scale': factor must be a finite number, got '10'"),
        ({"kind": "scale", "factor": True}, "factor must be a finite number, got True"),
        ({"kind": "scale", "factor": math.inf}, "factor must be a finite number, got inf"),
        ({"kind": "sign-flip", "factor": 0}, "fault 'sign-flip': factor must be > 0, got 0"),
        ({"kind": "noise", "std": -1.0}, "fault 'noise': std must be > 0, got -1.0"),
        ({"kind": "nan", "value": "zero"}, "fault 'nan': value must be one of \\['-inf', 'inf', 'nan'\\], got 'zero'"),
        ({"kind": "label-flip", "markers": "yes"}, "markers must be true or false"),
        ({"kind": "inflate"}, "fault 'inflate' needs parameter 'factor'"),
        ({"kind": "inflate", "factor": -5}, "fault 'inflate': factor must be > 0, got -5"),
        ({"kind": "label-flip", "markers": False, "mask": False}, "changes nothing"),
    ],
)
def test_invalid_fault_is_a_fault_error_naming_the_problem(fault, message):
    with pytest.raises(FaultError, match=message):
        parse_fault(fault)
    assert issubclass(FaultError, ValueError)


def test_every_kind_is_documented_in_the_module():
    import client.simulation.faults as faults

    for kind, params in FAULT_KINDS.items():
        assert f"``{kind}``" in faults.__doc__
        assert all(f"``{p}``" in faults.__doc__ for p in params)


def test_manifest_with_a_bad_fault_fails_when_written_or_read(tmp_path):
    with pytest.raises(FaultError, match="unknown fault kind"):
        Partition("site-01", "/x", {"kind": "explode"})
    ok = write_partitions(
        tmp_path / "ok.json", [Partition("site-01", "/x", {"kind": "scale", "factor": 5.0}), Partition("site-02", "/y")]
    )
    assert [p.fault for p in read_partitions(ok)] == [{"kind": "scale", "factor": 5.0}, {}]
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps(
            {"format": MANIFEST_FORMAT, "partitions": [{"site_id": "s", "cache": "/x", "fault": {"kind": "noise"}}]}
        )
    )
    with pytest.raises(FaultError, match="needs parameter 'std'"):
        read_partitions(bad)


# --- update faults, against tensors computed independently --------------------------------


def check_passthrough(out, local):
    """Integer buffers and keys the server did not send are the site's own values."""
    assert torch.equal(out["unet.bn.num_batches_tracked"], local["unet.bn.num_batches_tracked"])
    assert torch.equal(out["unet.extra.weight"], local["unet.extra.weight"])
    assert all(out[k].dtype == local[k].dtype and out[k].shape == local[k].shape for k in local)


@pytest.mark.parametrize(
    "fault, expected",
    [(None, 37), ({"kind": "scale", "factor": 5.0}, 37), ({"kind": "inflate", "factor": 1000}, 37_000)],
)
def test_inflate_multiplies_the_reported_examples_and_leaves_the_update_alone(fault, expected):
    assert reported_examples(37, fault) == expected
    glob, local = states()
    out = corrupt_update(glob, local, {"kind": "inflate", "factor": 1000})
    assert all(out[k] is local[k] for k in local)


@pytest.mark.parametrize("factor", [10.0, 0.0, -2.0])
def test_scale_sends_the_scaled_update(factor):
    glob, local = states()
    out = corrupt_update(glob, local, {"kind": "scale", "factor": factor})
    for k in ("unet.a.weight", "unet.bn.running_var"):
        g, w = glob[k].numpy().astype(np.float64), local[k].numpy().astype(np.float64)
        np.testing.assert_allclose(out[k].numpy(), g + factor * (w - g), rtol=1e-5, atol=1e-6)
    check_passthrough(out, local)


@pytest.mark.parametrize("factor", [1.0, 3.0])
def test_sign_flip_sends_the_reversed_update(factor):
    glob, local = states()
    fault = {"kind": "sign-flip"} if factor == 1.0 else {"kind": "sign-flip", "factor": factor}
    out = corrupt_update(glob, local, fault)
    for k in ("unet.a.weight", "unet.bn.running_var"):
        g, w = glob[k].numpy().astype(np.float64), local[k].numpy().astype(np.float64)
        np.testing.assert_allclose(out[k].numpy(), g - factor * (w - g), rtol=1e-5, atol=1e-6)
        if factor == 1.0:
            np.testing.assert_allclose(out[k].numpy(), 2 * g - w, rtol=1e-5, atol=1e-6)
    check_passthrough(out, local)


def test_noise_replaces_the_update_with_seeded_gaussian_noise():
    glob, local = states()
    big = {"unet.big.weight": torch.zeros(200, 100)}
    out = corrupt_update(
        {**glob, **big}, {**local, **{k: v + 5.0 for k, v in big.items()}}, {"kind": "noise", "std": 2.0}, seed=3
    )
    delta = out["unet.big.weight"].numpy()  # the global value is 0: what is sent is the noise itself
    assert abs(delta.mean()) < 0.05 and delta.std() == pytest.approx(2.0, rel=0.03)  # the real +5 update is gone
    # The same draws as torch's generator seeded alike, in sorted key order.
    g = torch.Generator().manual_seed(3)
    expected = {}
    for k in sorted({**local, **big}):
        if k in glob or k in big:
            ref = {**glob, **big}[k]
            if ref.is_floating_point():
                expected[k] = ref + 2.0 * torch.randn(ref.shape, generator=g)
    for k, v in expected.items():
        torch.testing.assert_close(out[k], v)
    again = corrupt_update({**glob, **big}, {**local, **big}, {"kind": "noise", "std": 2.0}, seed=3)
    torch.testing.assert_close(again["unet.a.weight"], out["unet.a.weight"])  # independent of the local values
    other = corrupt_update(glob, local, {"kind": "noise", "std": 2.0}, seed=4)
    assert not torch.allclose(other["unet.a.weight"], out["unet.a.weight"])
    check_passthrough(out, local)


@pytest.mark.parametrize("value, check", [("nan", np.isnan), ("inf", np.isposinf), ("-inf", np.isneginf)])
def test_nan_fault_sends_non_finite_values(value, check):
    glob, local = states()
    out = corrupt_update(glob, local, {"kind": "nan", "value": value})
    for k in ("unet.a.weight", "unet.bn.running_var"):
        assert check(out[k].numpy()).all()
    check_passthrough(out, local)


def test_label_flip_leaves_the_update_alone_and_inputs_are_not_modified():
    glob, local = states()
    copies = {k: v.clone() for k, v in {**glob, **{f"l.{k}": v for k, v in local.items()}}.items()}
    assert all(corrupt_update(glob, local, {"kind": "label-flip"})[k] is local[k] for k in local)
    corrupt_update(glob, local, {"kind": "scale", "factor": 7.0})
    corrupt_update(glob, local, {"kind": "nan"})
    assert all(torch.equal(glob[k], copies[k]) for k in glob)
    assert all(torch.equal(local[k], copies[f"l.{k}"]) for k in local)


def test_fault_seed_differs_by_site_and_round():
    seeds = {fault_seed(0, r, s) for r in (1, 2) for s in ("site-01", "site-02")}
    assert len(seeds) == 4 and all(0 <= s < 2**63 for s in seeds)
    assert fault_seed(0, 1, "site-01") == fault_seed(0, 1, "site-01")


# --- label-flip on a real site cache --------------------------------------------------------


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> dict:
    """A five-study site whose study P001 has no reference mask."""
    root = tmp_path_factory.mktemp("faults")
    data = write_site(root / "data" / "site-04", n_studies=5, shape=(4, 40, 40), seed=5)
    (data / "masks" / "P001" / "S001.nii.gz").unlink()
    cache, _ = build_site_cache(data, root / "cache", PREPROCESS)
    return {"data": data, "cache": cache}


def test_flip_labels_keeps_unannotated():
    out = flip_labels(np.array([[0.0, 1.0, np.nan]], np.float32))
    np.testing.assert_array_equal(out, np.array([[1.0, 0.0, np.nan]], np.float32))
    assert out.dtype == np.float32


def test_label_flip_dataset_flips_markers_and_inverts_known_masks(site):
    cache = site["cache"]
    honest = SliceDataset(cache, np.arange(cache.n_slices))
    known = cache.mask_known()
    assert known.any() and not known.all()
    flipped = corrupt_training_data(honest, {"kind": "label-flip"})
    assert isinstance(flipped, LabelFlipped) and len(flipped) == len(honest)
    labels = honest.labels()
    assert np.isnan(labels).any() and (labels == 0).any() and (labels == 1).any()
    np.testing.assert_array_equal(flipped.labels(), np.where(np.isnan(labels), np.nan, 1 - labels))
    size = cache.masks.shape[1] * cache.masks.shape[2]
    for i in range(len(honest)):
        a, b = honest[i], flipped[i]
        np.testing.assert_array_equal(b["labels"].numpy(), flip_labels(a["labels"].numpy()))
        if known[i]:
            np.testing.assert_array_equal(b["mask"].numpy(), 1 - a["mask"].numpy())
        else:
            assert torch.equal(a["mask"], b["mask"])
        assert torch.equal(a["image"], b["image"]) and bool(a["mask_known"]) == bool(b["mask_known"])
        assert int(b["mask"].sum()) == flipped.hematoma_pixels()[i]  # what balanced sampling sees
    assert flipped.hematoma_pixels()[known].min() > size // 2  # nearly every pixel is "hematoma" now
    make_loader(flipped, 4, shuffle=True, seed=0, balanced=True, stage=1)
    assert stage_positives(flipped, 2).sum() > stage_positives(honest, 2).sum()


def test_label_flip_markers_only_or_mask_only(site):
    cache = site["cache"]
    honest = SliceDataset(cache, np.arange(cache.n_slices))
    markers_only = corrupt_training_data(honest, {"kind": "label-flip", "mask": False})
    mask_only = corrupt_training_data(honest, {"kind": "label-flip", "markers": False})
    i = int(np.flatnonzero(cache.mask_known())[0])
    assert torch.equal(markers_only[i]["mask"], honest[i]["mask"])
    np.testing.assert_array_equal(markers_only.labels(), flip_labels(honest.labels()))
    np.testing.assert_array_equal(mask_only.labels(), honest.labels())
    assert torch.equal(mask_only[i]["mask"], 1 - honest[i]["mask"])
    np.testing.assert_array_equal(markers_only.hematoma_pixels(), honest.hematoma_pixels())
    for fault in ({"kind": "scale", "factor": 2.0}, {}, None):
        assert corrupt_training_data(honest, fault) is honest


# --- the simulation's ClientApp with a manifest fault ----------------------------------------


def _train_message(model) -> RecordDict:
    order = TrainInstruction(server_round=1, stage=1, lr=1e-3, local_steps=2, run_name="faults")
    return RecordDict({ARRAYS: state_to_record(half_state_dict(model, "unet")), CONFIG: order.to_record()})


def test_client_app_sends_what_the_manifest_fault_says(site, tmp_path):
    """Same cache and seed: the scaled site sends g + 10 (w - g) where the honest one sends w;
    the label-flip site's counts are the honest site's swapped."""
    path = str(site["cache"].path)
    manifest = write_partitions(
        tmp_path / "parts.json",
        [
            Partition("site-04", path),
            Partition("site-04", path, {"kind": "scale", "factor": 10.0}),
            Partition("site-04", path, {"kind": "label-flip"}),
            Partition("site-04", path, {"kind": "nan"}),
            Partition("site-04", path, {"kind": "inflate", "factor": 1000}),
        ],
    )
    run = {**RUN, "data.partitions": str(manifest)}
    model = build_joint_model(MODEL_CFG, seed=0)
    replies = [
        app(make_message(_train_message(model), MessageType.TRAIN), make_context({"partition-id": i}, run))
        for i in range(5)
    ]
    assert not any(r.has_error() for r in replies)
    glob = half_state_dict(model, "unet")
    honest, scaled = (record_to_state(r.content[ARRAYS]) for r in replies[:2])
    floats = [k for k in glob if glob[k].is_floating_point()]
    assert any(not torch.equal(honest[k], glob[k]) for k in floats)
    for k in floats:
        g, w = glob[k].double(), honest[k].double()
        torch.testing.assert_close(scaled[k].double(), g + 10.0 * (w - g), rtol=1e-4, atol=1e-5)
    m_honest, m_flip = replies[0].content[METRICS], replies[2].content[METRICS]
    assert m_flip[LABEL_POS] == m_honest[LABEL_NEG] and m_flip[LABEL_NEG] == m_honest[LABEL_POS]
    nan = record_to_state(replies[3].content[ARRAYS])
    assert all(torch.isnan(nan[k]).all() for k in floats)
    inflated = replies[4]  # trains and sends as the honest site, claims 1000x its slices
    assert inflated.content[METRICS][NUM_EXAMPLES] == 1000 * m_honest[NUM_EXAMPLES] > 0
    assert all(torch.equal(record_to_state(inflated.content[ARRAYS])[k], honest[k]) for k in floats)


def test_client_app_reports_an_invalid_manifest_fault(site, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps(
            {
                "format": MANIFEST_FORMAT,
                "partitions": [
                    {
                        "site_id": "site-04",
                        "cache": str(site["cache"].path),
                        "fault": {"kind": "scale", "factor": "big"},
                    }
                ],
            }
        )
    )
    model = build_joint_model(MODEL_CFG, seed=0)
    with pytest.raises(
        SiteError, match="data.partitions has an invalid fault: fault 'scale': factor must be a finite number"
    ):
        app(
            make_message(_train_message(model), MessageType.TRAIN),
            make_context({"partition-id": 0}, {**RUN, "data.partitions": str(bad)}),
        )


def test_split_of_a_label_flip_site_keeps_a_true_test_split(site, tmp_path):
    """Only the training split is corrupted: the site scores the global model on true labels."""
    from client.federation.node import SiteNode
    from client.federation.site_run import SiteRunConfig

    manifest = write_partitions(tmp_path / "parts.json", [Partition("site-04", str(site["cache"].path), FLIP)])
    run = SiteRunConfig.from_run_config({**RUN, "data.partitions": str(manifest)})
    data = open_faulty_site(SiteNode.from_context(make_context({"partition-id": 0}, RUN), run.config.data), run)
    assert isinstance(data.train, LabelFlipped) and type(data.test) is SliceDataset and type(data.val) is SliceDataset
    idx = split_slices(site["cache"], run.split, seed=int(RUN["seed"]))
    np.testing.assert_array_equal(data.train.indices, idx["train"])


def test_the_deployed_app_has_no_fault_path(site, tmp_path):
    """``client.client_app:app`` reads a manifest entry's site and cache only: a scaled, label-flipped or
    inflating entry trains and replies exactly as the honest one (faults live in ``client.simulation.app``)."""
    path = str(site["cache"].path)
    faults = [{}, {"kind": "scale", "factor": 10.0}, FLIP, {"kind": "inflate", "factor": 1000}]
    manifest = write_partitions(tmp_path / "parts.json", [Partition("site-04", path, f) for f in faults])
    run = {**RUN, "data.partitions": str(manifest)}
    model = build_joint_model(MODEL_CFG, seed=0)
    replies = [
        deployed_app(make_message(_train_message(model), MessageType.TRAIN), make_context({"partition-id": i}, run))
        for i in range(len(faults))
    ]
    honest = record_to_state(replies[0].content[ARRAYS])
    for reply in replies[1:]:
        assert not reply.has_error()
        sent = record_to_state(reply.content[ARRAYS])
        assert all(torch.equal(sent[k], honest[k]) for k in honest)
        for key in (NUM_EXAMPLES, LABEL_POS, LABEL_NEG):
            assert reply.content[METRICS][key] == replies[0].content[METRICS][key]


def test_an_update_fault_with_secure_updates_is_refused(site, tmp_path):
    """The handler masks the update before any mod sees it: the simulation refuses rather than send it honest."""
    manifest = write_partitions(
        tmp_path / "parts.json", [Partition("site-04", str(site["cache"].path), {"kind": "scale", "factor": 10.0})]
    )
    model = build_joint_model(MODEL_CFG, seed=0)
    with pytest.raises(SiteError, match="fault 'scale' changes the update .* privacy.secure-updates"):
        app(
            make_message(_train_message(model), MessageType.TRAIN),
            make_context(
                {"partition-id": 0}, {**RUN, "data.partitions": str(manifest), "privacy.secure-updates": True}
            ),
        )
