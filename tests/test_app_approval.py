"""Approved apps only, on real Flower processes (issue 27, item 1; docs/site-policy.md).

A loopback ``flower-superlink``, one site started with ``flwr-client start`` (no ``--any-app``) whose
folder approves one FAB (``flwr-client trust approve --app-dir``), and two ``flwr run``s: first of the
same app changed after the review, then of the reviewed one. The changed app is refused by the
SuperNode before any of its code runs at the site (its ClientApp module, which writes a file when
imported, never is), and the server gets Flower's error reply naming the digest; the reviewed app
runs and answers. Every process is stopped with its session when the test ends.
"""

from __future__ import annotations

import subprocess
from contextlib import ExitStack

import pytest

from client.site_tools.app_trust import build_fab, fab_sha256
from client.site_tools.cli import flwr_client_main
from simulations.engine import BIN, flwr_env, free_port
from tests.helpers.deployment import Processes, site_node_command, wait_for, write_connection, write_tiny_app
from tests.helpers.flower import REPO


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_the_supernode_runs_only_the_approved_app(tmp_path):
    home, out, site = tmp_path / "flwr-home", tmp_path / "out", tmp_path / "data" / "site-t"
    out.mkdir()
    (site / "dicom").mkdir(parents=True)
    reviewed = write_tiny_app(tmp_path / "reviewed" / "tinyapp", out, "reviewed")
    changed = write_tiny_app(tmp_path / "changed" / "tinyapp", out, "changed")
    assert flwr_client_main(["trust", "approve", str(site), "--app-dir", str(reviewed)]) == 0
    port = free_port()
    write_connection(home, port, "insecure = true")
    env = flwr_env(home, PYTHONPATH=str(REPO))  # flwr-client of this checkout, not of the installed one

    with ExitStack() as stack:
        procs = Processes(stack, env, tmp_path)
        procs.superlink(port, "--insecure")
        node, node_log = procs.launch(
            site_node_command(port, site, tmp_path / "cache", "--insecure", "--no-prepare", any_app=False), "site-t"
        )
        wait_for(lambda: "SuperNode ID:" in node_log.read_text(), 120, "the site did not connect")
        for app_dir in (changed, reviewed):
            done = subprocess.run(
                [str(BIN / "flwr"), "run", str(app_dir), "test", "--stream"],
                env=env,
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=180,
            )
            assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        assert node.poll() is None, node_log.read_text()[-3000:]  # a refusal does not stop the SuperNode
        site_log = node_log.read_text()

    changed_digest, reviewed_digest = fab_sha256(build_fab(changed)), fab_sha256(build_fab(reviewed))
    assert "approved apps only" in site_log
    assert f"app refused before it runs: this site has not approved this app (FAB sha256 {changed_digest}" in site_log
    assert not (out / "changed-clientapp-ran").exists(), "the refused app's code ran at the site"
    assert (
        (out / "changed-server.txt")
        .read_text()
        .startswith(f"error 7: this site has not approved this app (FAB sha256 {changed_digest}")
    )
    assert f"app approved by this site: FAB sha256 {reviewed_digest}" in site_log
    assert (out / "reviewed-clientapp-ran").is_file()
    assert (out / "reviewed-server.txt").read_text() == "ok reviewed"
