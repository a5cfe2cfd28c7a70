"""Real Flower processes on loopback for the deployment tests (docs/deploy.md): a ``flower-superlink``,
SuperNodes through ``flwr-client start`` and ``flwr run``, each in its own session with its output in
``<cwd>/<name>.log``, stopped with its children (``stop_process_group``) when the ``ExitStack`` closes.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from simulations.engine import BIN, free_port, stop_process_group, wait_for_port


def wait_for(predicate: Callable[[], bool], seconds: float, what: str) -> None:
    """Poll ``predicate`` every half second; ``TimeoutError(what)`` when it stays false for ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise TimeoutError(what)


def write_connection(home: Path, port: int, security: str) -> None:
    """``$FLWR_HOME/config.toml`` naming the test SuperLink ``test``; ``security`` is its TLS line
    (``root-certificates = "..."``) or ``insecure = true``."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{port}"\n{security}\n'
    )


def site_node_command(port: int, data: Path, cache: Path, *options: str) -> list[str]:
    """``flwr-client start`` for the site folder ``data`` against the loopback SuperLink on ``port``
    (CPU, a Runtime API port of its own); ``options``: security, ``--run-config``, ``--no-prepare``..."""
    return [
        str(BIN / "flwr-client"),
        "start",
        "--superlink",
        f"127.0.0.1:{port}",
        "--data",
        str(data),
        "--cache-dir",
        str(cache),
        *options,
        "--device",
        "cpu",
        "--clientappio-port",
        str(free_port()),
    ]


@dataclass
class Processes:
    """Starts processes in ``cwd`` with ``env``; each is stopped with its session when ``stack`` closes."""

    stack: ExitStack
    env: dict[str, str]
    cwd: Path

    def launch(self, cmd: list[str], name: str) -> tuple[subprocess.Popen, Path]:
        """Start ``cmd`` in a session of its own, its stdout and stderr in ``<cwd>/<name>.log``."""
        log = self.cwd / f"{name}.log"
        fh = self.stack.enter_context(log.open("w"))
        proc = subprocess.Popen(
            cmd, env=self.env, cwd=self.cwd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.stack.callback(stop_process_group, proc)
        return proc, log

    def superlink(self, port: int, *security: str) -> tuple[subprocess.Popen, Path]:
        """A ``flower-superlink`` on ``127.0.0.1:port`` (ServerApp in a subprocess), once it listens."""
        proc, log = self.launch(
            [
                str(BIN / "flower-superlink"),
                *security,
                "--disable-runtime-dependency-installation",
                "--isolation",
                "subprocess",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--database",
                str(self.cwd / "state.db"),
            ],
            "superlink",
        )
        wait_for_port(port, proc, log)
        return proc, log
