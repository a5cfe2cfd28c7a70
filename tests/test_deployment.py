"""Deployment (docs/design.md §5, docs/deploy.md): ``flwr-client start`` rules, and one real TLS federation.

The unit tests cover the pure validation and command building of ``client.site_tools.supernode``. The
integration test runs the coordinator's and sites' steps of docs/deploy.md on loopback: certificates
from ``server.certs``, a real ``flower-superlink`` with TLS and SuperNode authentication, two site
keys registered with ``flwr supernode register``, two SuperNodes started through ``flwr-client start``,
a third with an unregistered key refused, a fourth with a registered key but another CA's root
certificate refused by TLS itself (it cannot verify the SuperLink), and ``flwr run .`` finishing
one round per stage with a checkpoint and no site cache built but the one ``start`` prepared for the
run's preprocessing (``--run-config``), its counts round a secure sum (``privacy.secure-counts``:
each site's key must outlive the ClientApp process that made it). Every process is started in its
own session and stopped (with its children) in ``finally``.
"""

from __future__ import annotations

import subprocess
from contextlib import ExitStack
from pathlib import Path

import pytest

from client.site_tools.cli import flwr_client_main
from client.site_tools.supernode import (
    StartError,
    StartOptions,
    build_command,
    check_reachable,
    is_loopback,
    node_config,
    parse_address,
    validate,
)
from common.records import NODE_CACHE_DIR, NODE_DATA_PATH, NODE_SITE_ID
from server.certs import make_ca, make_server_cert, make_site_keys
from simulations.engine import BIN, flwr_env, free_port
from tests.helpers.data import write_site
from tests.helpers.deployment import Processes, site_node_command, wait_for, write_connection
from tests.helpers.flower import REPO


def site_folder(tmp_path: Path) -> Path:
    site = tmp_path / "site-x"
    (site / "dicom").mkdir(parents=True)
    return site


# --- unit: validation and the command line -----------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "127.3.2.1", "localhost", "LOCALHOST", "::1"])
def test_loopback_hosts(host):
    assert is_loopback(host)


@pytest.mark.parametrize(
    "host", ["10.0.0.5", "192.168.1.2", "superlink.example.org", "0.0.0.0", "::", "localhost.evil.org"]
)
def test_non_loopback_hosts(host):
    assert not is_loopback(host)


def test_parse_address():
    assert parse_address("127.0.0.1:9092") == ("127.0.0.1", 9092)
    assert parse_address("[::1]:9092") == ("::1", 9092)
    assert parse_address("superlink.example.org:443") == ("superlink.example.org", 443)
    for bad in ("127.0.0.1", "https://host:1", "host:x", "host:0", "::1:9092", ":9092"):
        with pytest.raises(StartError):
            parse_address(bad)


def test_insecure_refused_off_loopback(tmp_path):
    opts = StartOptions(superlink="10.1.2.3:9092", data=site_folder(tmp_path), cache_dir=tmp_path / "c", insecure=True)
    with pytest.raises(
        StartError, match=r"--insecure refused: the SuperLink 10\.1\.2\.3:9092 is not on this machine's loopback"
    ):
        validate(opts)


def test_insecure_refused_off_loopback_cli(tmp_path, capsys):
    rc = flwr_client_main(
        [
            "start",
            "--superlink",
            "superlink.example.org:9092",
            "--data",
            str(site_folder(tmp_path)),
            "--insecure",
            "--no-prepare",
        ]
    )
    assert rc == 2
    assert "--insecure refused" in capsys.readouterr().err


def test_tls_needs_root_certificates(tmp_path):
    site = site_folder(tmp_path)
    with pytest.raises(StartError, match="--root-certificates CA.crt is required"):
        validate(StartOptions(superlink="10.1.2.3:9092", data=site, cache_dir=tmp_path / "c"))
    with pytest.raises(StartError, match="no such file"):
        validate(
            StartOptions(
                superlink="10.1.2.3:9092",
                data=site,
                cache_dir=tmp_path / "c",
                root_certificates=tmp_path / "missing.crt",
            )
        )


def test_site_folder_checked(tmp_path):
    with pytest.raises(StartError, match="no such folder"):
        validate(StartOptions(superlink="127.0.0.1:9092", data=tmp_path / "nope", cache_dir=tmp_path, insecure=True))
    (tmp_path / "empty").mkdir()
    with pytest.raises(StartError, match="not a site folder"):
        validate(StartOptions(superlink="127.0.0.1:9092", data=tmp_path / "empty", cache_dir=tmp_path, insecure=True))


def test_auth_key_needs_tls(tmp_path):
    key = tmp_path / "k"
    key.write_text("x")
    with pytest.raises(StartError, match="--auth-key needs TLS"):
        validate(
            StartOptions(
                superlink="127.0.0.1:9092", data=site_folder(tmp_path), cache_dir=tmp_path, insecure=True, auth_key=key
            )
        )


def test_command_line_tls(tmp_path):
    from flwr.common.config import parse_config_args

    ca, key = tmp_path / "ca.crt", tmp_path / "site key"
    ca.write_text("x")
    key.write_text("x")
    site = site_folder(tmp_path / "with space")
    opts = StartOptions(
        superlink="superlink.example.org:9092",
        data=site,
        cache_dir=tmp_path / "cache",
        root_certificates=ca,
        auth_key=key,
    )
    assert validate(opts) == ("superlink.example.org", 9092)
    cmd = build_command(opts, "site-x")
    assert cmd[:3] == ["flower-supernode", "--superlink", "superlink.example.org:9092"]
    assert "--insecure" not in cmd
    assert cmd[cmd.index("--root-certificates") + 1] == str(ca.resolve())
    assert cmd[cmd.index("--auth-supernode-private-key") + 1] == str(key.resolve())
    # what flower-supernode will hand the ClientApp, parsed by Flower's own parser
    parsed = parse_config_args([cmd[cmd.index("--node-config") + 1]])
    assert parsed == {
        NODE_DATA_PATH: str(site.resolve()),
        NODE_SITE_ID: "site-x",
        NODE_CACHE_DIR: str((tmp_path / "cache").resolve()),
    }


def test_command_line_insecure_loopback(tmp_path):
    opts = StartOptions(
        superlink="127.0.0.1:9092",
        data=site_folder(tmp_path),
        cache_dir=tmp_path,
        insecure=True,
        device="cpu",
        clientappio_port=9999,
    )
    validate(opts)
    cmd = build_command(opts, "s")
    assert "--insecure" in cmd and "--root-certificates" not in cmd
    assert cmd[cmd.index("--port") + 1] == "9999"
    assert "device='cpu'" in node_config(opts, "s")


def test_node_config_refuses_quotes(tmp_path):
    opts = StartOptions(superlink="127.0.0.1:1", data=tmp_path / "it's", cache_dir=tmp_path, insecure=True)
    with pytest.raises(StartError, match="quotes"):
        node_config(opts, "s")


def test_unreachable_superlink_message(tmp_path, capsys):
    port = free_port()  # nothing listens there
    with pytest.raises(StartError, match=rf"cannot reach the SuperLink at 127\.0\.0\.1:{port}"):
        check_reachable("127.0.0.1", port, timeout=2)
    rc = flwr_client_main(
        [
            "start",
            "--superlink",
            f"127.0.0.1:{port}",
            "--data",
            str(site_folder(tmp_path)),
            "--insecure",
            "--no-prepare",
            "--any-app",
        ]
    )
    assert rc == 3
    assert f"cannot reach the SuperLink at 127.0.0.1:{port}" in capsys.readouterr().err


def test_certificates(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    make_ca(tmp_path)
    crt, _ = make_server_cert(tmp_path, ["superlink.example.org"])
    cert = x509.load_pem_x509_certificate(crt.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"superlink.example.org", "localhost"} <= set(san.get_values_for_type(x509.DNSName))
    assert "127.0.0.1" in {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    private, public = make_site_keys(tmp_path, "site-01")
    serialization.load_ssh_private_key(private.read_bytes(), password=None)
    assert public.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert oct(private.stat().st_mode & 0o777) == "0o600"


# --- integration: a TLS federation with SuperNode authentication on loopback --------------------


@pytest.mark.slow
@pytest.mark.timeout(330)
def test_tls_federation_on_loopback(tmp_path):
    certs, home, data = tmp_path / "certs", tmp_path / "flwr-home", tmp_path / "data"
    make_ca(certs)
    make_server_cert(certs)
    sites = ["site-a", "site-b", "rogue"]
    for i, name in enumerate(sites):
        make_site_keys(certs, name)
        write_site(data / name, n_studies=4, shape=(3, 40, 40), seed=10 * i)
    # the outsider: a key the coordinator registers, but not the federation's CA (another one's root)
    make_site_keys(certs, "outsider")
    write_site(data / "outsider", n_studies=1, shape=(3, 40, 40), seed=99)
    make_ca(tmp_path / "other-ca", name="some other CA")
    port = free_port()
    write_connection(home, port, f'root-certificates = "{certs / "ca.crt"}"')
    env = flwr_env(home, PYTHONPATH=str(REPO))  # flwr-client of this checkout, not of the installed one

    with ExitStack() as stack:
        procs = Processes(stack, env, tmp_path)
        procs.superlink(
            port,
            "--ssl-ca-certfile",
            str(certs / "ca.crt"),
            "--ssl-certfile",
            str(certs / "server.crt"),
            "--ssl-keyfile",
            str(certs / "server.key"),
            "--enable-supernode-auth",
        )

        for name in [*sites[:2], "outsider"]:  # the rogue's key is never registered
            reg = subprocess.run(
                [str(BIN / "flwr"), "supernode", "register", str(certs / name / f"{name}.pub"), "test"],
                env=env,
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert reg.returncode == 0 and "registered successfully" in reg.stdout, reg.stdout + reg.stderr

        cache = tmp_path / "cache"
        nodes = {}
        for name in sites:
            nodes[name] = procs.launch(
                site_node_command(
                    port,
                    data / name,
                    cache,
                    "--root-certificates",
                    str(certs / "ca.crt"),
                    "--auth-key",
                    str(certs / name / name),
                    "--run-config",
                    "model.image-size=32",
                ),
                name,
            )

        nodes["outsider"] = procs.launch(
            site_node_command(
                port,
                data / "outsider",
                cache,
                "--root-certificates",
                str(tmp_path / "other-ca" / "ca.crt"),
                "--auth-key",
                str(certs / "outsider" / "outsider"),
                "--no-prepare",
            ),
            "outsider",
        )

        # the unregistered SuperNode is refused by the SuperLink and gives up
        rogue, rogue_log = nodes["rogue"]
        wait_for(lambda: "Failed to activate SuperNode" in rogue_log.read_text(), 60, "rogue node not refused")
        # without the federation's CA a SuperNode cannot verify the SuperLink: the TLS handshake fails and
        # it stops before sending anything (its registered key does not help)
        outsider, outsider_log = nodes["outsider"]
        wait_for(lambda: outsider.poll() is not None, 60, "outsider node did not stop")
        text = outsider_log.read_text()
        assert outsider.returncode != 0, text[-3000:]
        assert "SSL/TLS handshake error" in text and "CERTIFICATE_VERIFY_FAILED" in text, text[-3000:]
        assert "SuperNode ID:" not in text, text[-3000:]
        for name in sites[:2]:
            wait_for(lambda log=nodes[name][1]: "SuperNode ID:" in log.read_text(), 60, f"{name} did not connect")
            assert "cache built" in nodes[name][1].read_text()  # prepared before joining

        # `start` prepared the run's cache (its preset at image-size 32): no round may build another
        prepared = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("site-*/index.json")}
        assert len(prepared) == 2, sorted(prepared)

        # stage 2 with secure counts: the site's key must outlive the ClientApp process that made it
        overrides = (
            f"rounds.stage1=1 rounds.stage2=1 train.local-steps=1 train.batch-size=4 model.image-size=32 "
            f"strategy.fraction-evaluate=0.0 rounds.timeout=120.0 privacy.secure-counts=true "
            f"output.dir='{tmp_path / 'runs'}' output.name='deploy'"
        )
        done = subprocess.run(
            [str(BIN / "flwr"), "run", str(REPO), "test", "--stream", "-c", overrides],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=240,
        )
        output = done.stdout + done.stderr
        assert done.returncode == 0, output[-4000:]
        assert "run finished" in output, output[-4000:]
        assert "Received 2 results and 0 failures" in output, output[-4000:]
        assert "secure counts: 2 site(s) summed in session counts-2-1" in output, output[-4000:]
        for name in sites[:2]:
            assert nodes[name][0].poll() is None, nodes[name][1].read_text()[-3000:]
        after = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("site-*/index.json")}
        assert after == prepared, "round 1 rebuilt a site cache"

    out = tmp_path / "runs" / "deploy"
    assert (out / "global.pt").is_file()
    assert (out / "checkpoints" / "round-001.pt").is_file()
