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


def site_node_command(port: int, data: Path, cache: Path, *options: str, any_app: bool = True) -> list[str]:
    """``flwr-client start`` for the site folder ``data`` against the loopback SuperLink on ``port``
    (CPU, a Runtime API port of its own); ``options``: security, ``--run-config``, ``--no-prepare``...
    ``any_app``: run whatever app ``flwr run`` sends (the app these tests run is the working tree,
    which no site approved); False: only the apps the site approved (``flwr-client trust``)."""
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
        *(["--any-app"] if any_app else []),
    ]


def write_tiny_app(app_dir: Path, out: Path, label: str) -> Path:
    """A Flower app of a few lines in ``app_dir`` (its name must be a valid app name): its ServerApp
    sends one ``query`` to every node and writes what came back to ``out/<label>-server.txt``; its
    ClientApp writes ``out/<label>-clientapp-ran`` when its module is imported, i.e. as soon as any
    of the app's code runs at the site. Two labels give two FABs of different digests."""
    pkg = app_dir / "tinyapp"
    pkg.mkdir(parents=True, exist_ok=True)
    (app_dir / "pyproject.toml").write_text(
        '[project]\nname = "tinyapp"\nversion = "1.0.0"\ndependencies = []\n\n'
        '[tool.flwr.app]\npublisher = "sitetest"\n\n'
        '[tool.flwr.app.components]\nserverapp = "tinyapp.server:app"\nclientapp = "tinyapp.client:app"\n'
    )
    (pkg / "__init__.py").write_text("")
    (pkg / "client.py").write_text(
        "from pathlib import Path\n\n"
        f"Path({str(out)!r}, {label + '-clientapp-ran'!r}).write_text('the app ran at the site')\n\n"
        "from flwr.app import ConfigRecord, Context, Message, RecordDict  # noqa: E402\n"
        "from flwr.clientapp import ClientApp  # noqa: E402\n\n"
        "app = ClientApp()\n\n\n"
        "@app.query()\n"
        "def query(msg: Message, context: Context) -> Message:\n"
        f"    return Message(RecordDict({{'a': ConfigRecord({{'y': {label!r}}})}}), reply_to=msg)\n"
    )
    (pkg / "server.py").write_text(
        "import time\nfrom pathlib import Path\n\n"
        "from flwr.app import ConfigRecord, Context, Message, RecordDict\n"
        "from flwr.serverapp import Grid, ServerApp\n\n"
        "app = ServerApp()\n\n\n"
        "@app.main()\n"
        "def main(grid: Grid, context: Context) -> None:\n"
        "    nodes = []\n"
        "    for _ in range(120):\n"
        "        nodes = list(grid.get_node_ids())\n"
        "        if nodes:\n"
        "            break\n"
        "        time.sleep(0.5)\n"
        "    msgs = [Message(RecordDict({'q': ConfigRecord({'x': 1})}), dst_node_id=n, message_type='query') "
        "for n in nodes]\n"
        "    lines = [\n"
        "        f'error {r.error.code}: {r.error.reason}' if r.has_error() else f\"ok {r.content['a']['y']}\"\n"
        "        for r in grid.send_and_receive(msgs, timeout=120)\n"
        "    ]\n"
        f"    Path({str(out)!r}, {label + '-server.txt'!r}).write_text(chr(10).join(lines) or 'no reply')\n"
    )
    return app_dir


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
