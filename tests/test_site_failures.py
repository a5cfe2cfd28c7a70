"""Site failures in one real federation on loopback (docs/site-policy.md, server/replies.py).

Four SuperNodes started with ``flwr-client start`` (``--insecure``: loopback only) join one
``flower-superlink``; one ``flwr run`` of two rounds (one per stage) must finish with the one site
that trains while

- ``refuser``'s ``site.toml`` ``[policy]`` refuses the run's config (``max-rounds``),
- ``pinned``'s ``allowed-apps`` does not hold this app's digest,
- ``victim``'s SuperNode is killed (SIGKILL, its whole process group) once it has received its
  round-1 train message: nothing of it says goodbye, and the SuperLink declares it unavailable when
  its heartbeats stop (its death overlaps the others' training, which keeps the test short).

The server's log and ``history.json`` name each site by its site id (learned before round 1), the
refusals by rule, and the victim's death once, in the round it died in, with Flower's reason (node
unavailable), not the round timeout; the sites' own logs say why they refused.
"""

from __future__ import annotations

import json
import os
import re
import signal
from contextlib import ExitStack
from pathlib import Path

import pytest
from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL, HEARTBEAT_PATIENCE, SUPERLINK_NODE_ID
from flwr.server.superlink.linkstate.utils import NODE_UNAVAILABLE_ERROR_REASON

from server.history import JSON_FILE
from simulations.engine import BIN, flwr_env, free_port, toml_overrides
from tests.helpers.data import write_site
from tests.helpers.deployment import Processes, site_node_command, wait_for, write_connection
from tests.helpers.flower import REPO

#: The SuperLink declares a SuperNode unavailable ``HEARTBEAT_PATIENCE`` heartbeat intervals after its
#: last heartbeat; the round timeout leaves room for that, so a dead site's reason is Flower's, not ours.
TIMEOUT = HEARTBEAT_PATIENCE * HEARTBEAT_DEFAULT_INTERVAL + 40.0
ROUNDS = (1, 1)  # stage 1, stage 2
#: Site folder (= site id) -> its ``site.toml`` ``[policy]``.
POLICIES = {
    "steady": "",
    "victim": "",
    "refuser": "[policy]\nmax-rounds = 1\n",
    "pinned": f'[policy]\nallowed-apps = ["code:{"0" * 64}"]\n',
}
#: What each refusing site's refusal starts with, at the site and on the server.
REFUSALS = {
    "refuser": f"max-rounds: the run has {sum(ROUNDS)} rounds; this site takes part in at most 1",
    "pinned": "allowed-apps: this app (code:",
}


def write_sites(data: Path) -> None:
    for i, (name, policy) in enumerate(POLICIES.items()):
        write_site(data / name, n_studies=4, shape=(3, 40, 40), seed=10 * i)
        (data / name / "site.toml").write_text(f'site_id = "{name}"\n{policy}')


def node_id(log: Path) -> int:
    """The SuperNode id Flower logs once the node has joined."""
    match = re.search(r"SuperNode ID: (\d+)", log.read_text())
    assert match, log.read_text()[-3000:]
    return int(match.group(1))


def run_overrides(out: Path) -> str:
    return toml_overrides(
        {
            "rounds.stage1": ROUNDS[0],
            "rounds.stage2": ROUNDS[1],
            "rounds.timeout": TIMEOUT,
            "train.local-steps": 1,
            "train.batch-size": 4,
            "model.image-size": 32,
            "strategy.fraction-evaluate": 0.0,
            "strategy.min-train-nodes": 1,
            "output.dir": str(out),
            "output.name": "failures",
        }
    )


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_refusals_and_a_dead_site_in_a_real_federation(tmp_path):
    home, data, cache, out = tmp_path / "flwr-home", tmp_path / "data", tmp_path / "cache", tmp_path / "runs"
    write_sites(data)
    port = free_port()
    write_connection(home, port, "insecure = true")
    env = flwr_env(home, PYTHONPATH=str(REPO))  # flwr-client of this checkout, not of the installed one
    run_dir = out / "failures"

    with ExitStack() as stack:
        procs = Processes(stack, env, tmp_path)
        procs.superlink(port, "--insecure")
        nodes = {}
        for name in POLICIES:  # the refusing sites never open their data: no cache for them
            prepare = ["--no-prepare"] if name in REFUSALS else ["--run-config", "model.image-size=32"]
            nodes[name] = procs.launch(site_node_command(port, data / name, cache, "--insecure", *prepare), name)
        for name, (_, log) in nodes.items():
            wait_for(lambda log=log: "SuperNode ID:" in log.read_text(), 120, f"{name} did not connect")
        ids = {name: node_id(log) for name, (_, log) in nodes.items()}

        run, run_log = procs.launch(
            [str(BIN / "flwr"), "run", str(REPO), "test", "--stream", "-c", run_overrides(out)], "flwr-run"
        )
        victim, victim_log = nodes["victim"]
        training = "Receiving: train message"  # the SuperNode has its round-1 instruction, its ClientApp starts
        wait_for(lambda: training in victim_log.read_text() or run.poll() is not None, 240, "victim got no train")
        assert run.poll() is None, run_log.read_text()[-4000:]
        os.killpg(victim.pid, signal.SIGKILL)  # the SuperNode and its ClientApp: a crash, not a goodbye
        victim.wait(timeout=30)
        died_in = victim_log.read_text().count("Sending: train message") + 1  # the round it was working on

        assert run.wait(timeout=300) == 0, run_log.read_text()[-4000:]
        server = run_log.read_text()
        site_logs = {name: log.read_text() for name, (_, log) in nodes.items()}

    assert "run finished" in server, server[-4000:]
    assert (run_dir / "global.pt").is_file() and (run_dir / "checkpoints" / f"round-{sum(ROUNDS):03d}.pt").is_file()
    check_refusals_logged(server, site_logs, ids)
    assert re.search(
        rf"train: victim \(node {ids['victim']}\) failed after [\d.]+ s: {re.escape(NODE_UNAVAILABLE_ERROR_REASON)}",
        server,
    ), server[-4000:]
    check_history(json.loads((run_dir / JSON_FILE).read_text()), ids, died_in)


def check_refusals_logged(server: str, site_logs: dict[str, str], ids: dict[str, int]) -> None:
    """Both sides name the refusing site and the rule: the site's SuperNode log and the server's."""
    for name, rule in REFUSALS.items():
        assert f"site {name} refuses query.hello (site policy): {rule}" in site_logs[name], site_logs[name][-3000:]
        line = rf"hello: {name} \(node {ids[name]}\) failed after [\d.]+ s: refused by site policy: {re.escape(rule)}"
        assert re.search(line, server), server[-4000:]
    for name in POLICIES.keys() - REFUSALS.keys():
        assert "refuses" not in site_logs[name], site_logs[name][-3000:]


def check_history(history: dict, ids: dict[str, int], died_in: int) -> None:
    """One failure entry per site and round, each named by its site id; the refusals every round;
    the victim once in the round it died in, with Flower's reason, well before the timeout."""
    rounds = {r["round"]: r for r in history["rounds"]}
    assert sorted(rounds) == list(range(1, sum(ROUNDS) + 1))
    for entry in rounds.values():
        failures = entry["failures"]
        named = [f["site"] for f in failures]
        assert len(named) == len(set(named)) and "unknown site" not in named, failures
        assert all(f["node"] == ids[f["site"]] != SUPERLINK_NODE_ID for f in failures), failures
        by_site = {f["site"]: f for f in failures}
        for name, rule in REFUSALS.items():
            assert by_site[name]["reason"].startswith(f"refused by site policy: {rule}"), failures
        assert "steady" not in by_site and "steady" in entry["train"]["sites"] and not entry.get("skipped"), entry
    dead = rounds[died_in]["failures"]
    (victim,) = [f for f in dead if f["site"] == "victim"]
    assert victim["reason"] == NODE_UNAVAILABLE_ERROR_REASON and victim["phase"] == "train", victim
    assert victim["seconds"] < TIMEOUT, victim
    for rnd in range(1, died_in):
        assert "victim" not in {f["site"] for f in rounds[rnd]["failures"]}, rounds[rnd]["failures"]
