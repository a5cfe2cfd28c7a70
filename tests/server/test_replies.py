"""``server.replies`` on a FakeGrid that hands messages to the real ClientApp: failures told right
(matched to the message they answer, one entry per site and round, named from the first ``hello``)
and site policies refusing a run (the run goes on with the others; the history names rule and site).

The SuperLink's "node unavailable" reply (``src_node_id`` = the SuperLink's id) is produced by
``FakeGrid.unavailable`` as Flower's linkstate builds it; a loopback test with a real SuperNode killed
mid-round is not part of this file (too slow on the shared test machine).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import ArrayRecord, MetricRecord

from client.client_app import app as client_app
from client.federation.app_identity import app_identities
from common.records import CONFIG, REFUSAL, SERVER_ROUND, SITE, SITE_ID
from server.federation import run_federation
from tests.helpers.flower import (
    FakeGrid,
    make_context,
    set_task_identity,
    tiny_run_config,
    write_prepared_sites,
)

N_SITES = 3
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _task_identity():
    set_task_identity()


def config(data_root: Path, out: Path, **overrides) -> dict:
    return tiny_run_config(data_root, out, **{"rounds.timeout": 5.0, **overrides})


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("replies") / "data"
    return write_prepared_sites(root, N_SITES, config(root, root.parent / "runs"), seed_offset=3)


def make_grid(rc: dict) -> FakeGrid:
    return FakeGrid(
        {100 + i: (client_app, make_context({"partition-id": i}, rc, node_id=100 + i)) for i in range(N_SITES)}
    )


def set_policy(site_dir: Path, text: str) -> None:
    (site_dir / "site.toml").write_text(f'site_id = "{site_dir.name}"\n' + (f"[policy]\n{text}" if text else ""))


def test_node_unavailable_is_one_named_entry(data_root, tmp_path):
    """site-03 dies after saying hello: the SuperLink answers its train and evaluate messages with
    "node unavailable" from node 1. The history holds one entry, for site-03's node, with that reason."""
    rc = config(data_root, tmp_path, **{"rounds.stage2": 0})
    grid = make_grid(rc)

    def die(msg):
        if msg.metadata.dst_node_id == 102 and msg.metadata.message_type == "train":
            grid.unavailable.add(102)

    grid.before_delivery = die
    history = run_federation(grid, rc)
    (failure,) = history.rounds[0]["failures"]
    assert (failure["site"], failure["node"], failure["phase"]) == ("site-03", 102, "train")
    assert "Node Unavailable" in failure["reason"] and failure["phases"] == ["train", "evaluate"]
    assert 0 <= failure["seconds"] < 5.0  # seen at once, not after the timeout
    assert sorted(history.rounds[0]["train"]["sites"]) == ["site-01", "site-02"]


def test_silent_node_from_the_start_is_named_by_its_timeout(data_root, tmp_path):
    """A node that never answers, not even hello (asked once), stays "unknown site" but is listed once
    per round, with the timeout."""
    rc = config(data_root, tmp_path, **{"rounds.stage2": 0, "rounds.timeout": 0.3})
    grid = make_grid(rc)
    grid.silent.add(101)
    history = run_federation(grid, rc)
    (failure,) = history.rounds[0]["failures"]
    assert failure["node"] == 101 and failure["phases"] == ["hello", "train", "evaluate"]
    assert failure["reason"].startswith("no reply within 0.3 s") and failure["seconds"] >= 0.3


def test_sites_refusing_by_policy_leave_the_run_to_the_others(data_root, tmp_path):
    """site-02's policy wants DP, site-03 runs only an app digest that is not this one: both refuse
    every message with the rule named; the run completes with site-01; neither sends anything else."""
    set_policy(data_root / "site-02", "require-dp = true\n")
    set_policy(data_root / "site-03", f'allowed-apps = ["code:{"0" * 64}"]\n')
    try:
        rc = config(data_root, tmp_path, **{"strategy.min-train-nodes": 1, "strategy.min-evaluate-nodes": 1})
        grid = make_grid(rc)
        history = run_federation(grid, rc)
    finally:
        for site in ("site-02", "site-03"):
            set_policy(data_root / site, "")
    assert [r["round"] for r in history.rounds] == [1, 2]
    for r in history.rounds:
        by_site = {f["site"]: f for f in r["failures"]}
        assert sorted(by_site) == ["site-02", "site-03"]
        assert by_site["site-02"]["reason"].startswith("refused by site policy: require-dp: ")
        assert by_site["site-03"]["reason"].startswith("refused by site policy: allowed-apps: ")
        assert sorted(r["train"]["sites"]) == ["site-01"] and sorted(r["evaluate"]["sites"]) == ["site-01"]
    assert history.rounds[0]["failures"][0]["phases"][0] == "hello"
    for sent in grid.log:
        if sent.message.metadata.dst_node_id in (101, 102):
            assert set(sent.reply.content.keys()) == {SITE, REFUSAL}
            assert not any(isinstance(r, (ArrayRecord, MetricRecord)) for r in sent.reply.content.values())
        elif sent.reply is not None:
            assert sent.reply.content[SITE][SITE_ID] == "site-01"
    rounds = {s.message.content[CONFIG][SERVER_ROUND] for s in grid.log}
    assert rounds == {1, 2}


def test_listed_app_takes_part(data_root, tmp_path):
    code = next(i for i in app_identities() if i.startswith("code:"))
    set_policy(data_root / "site-02", f'allowed-apps = ["{code}"]\nmax-rounds = 1\n')
    try:
        rc = config(data_root, tmp_path, **{"rounds.stage2": 0})
        history = run_federation(make_grid(rc), rc)
    finally:
        set_policy(data_root / "site-02", "")
    assert history.rounds[0]["failures"] == []
    assert sorted(history.rounds[0]["train"]["sites"]) == ["site-01", "site-02", "site-03"]
