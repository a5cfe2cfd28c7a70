"""Flower's simulation engine, driven the way a researcher drives it: a simulation SuperLink on a
free loopback port (its own ``FLWR_HOME``), then ``flwr run <app> ... --stream`` per federated run.

This is the real path (FAB build and install, SuperExec, subprocess isolation, the Ray backend with
one virtual SuperNode per site); nothing here imitates Flower. The SuperLink runs one experiment's
runs one after another and is stopped, with everything it started, when the context ends.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from common.runtime import THREADS_ENV, usable_cores

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
#: What the FAB of a simulation run holds: the project file and the packages the apps import.
APP_FILES = ("pyproject.toml", "README.md", ".gitignore")
APP_PACKAGES = ("client", "server", "common", "simulations")
#: The ClientApp the repository deploys, and the one a simulation runs instead: the same handlers plus
#: the injected faults of its partition manifest (``client.simulation.app``), never part of a site's app.
DEPLOYED_CLIENTAPP = "client.client_app:app"
SIMULATION_CLIENTAPP = "client.simulation.app:app"


def stage_app(repo: Path, dest: Path) -> Path:
    """A copy of the app's own files in ``dest`` for ``flwr run`` to build its FAB from.

    ``flwr run <dir>`` walks every file under ``<dir>`` before its ignore rules apply: in a checkout
    with the virtual environment and the benchmark data (100,000 files) that walk took ~10 s per
    federated run on 2 cores; the staged copy holds ~300 files and gives the same FAB content, but for
    its ``clientapp``: the simulation's (``simulation_pyproject``)."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for name in APP_FILES:
        if (repo / name).is_file():
            shutil.copy2(repo / name, dest / name)
    for pkg in APP_PACKAGES:
        shutil.copytree(repo / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    project = dest / "pyproject.toml"
    project.write_text(simulation_pyproject(project.read_text()))
    return dest


def simulation_pyproject(text: str) -> str:
    """The project file with ``[tool.flwr.app.components] clientapp`` set to ``SIMULATION_CLIENTAPP``, so
    that a simulation's virtual sites run the app with fault injection; everything else as it is."""
    line = f'clientapp = "{DEPLOYED_CLIENTAPP}"'
    if text.count(line) != 1:
        raise ValueError(f"pyproject.toml: expected one line {line!r} in [tool.flwr.app.components]")
    return text.replace(line, f'clientapp = "{SIMULATION_CLIENTAPP}"')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, log: Path | None = None, seconds: float = 60.0) -> None:
    """Wait until something listens on ``port``; fail early (with the log's tail) if ``proc`` exits."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
            raise RuntimeError(f"{proc.args[0]} exited with code {proc.returncode}\n{tail}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"{proc.args[0]} did not open port {port} within {seconds} s")


def flwr_env(flwr_home: Path, **extra: str) -> dict[str, str]:
    """Environment for Flower's commands: own FLWR_HOME, the venv's bin first (the SuperLink starts
    flower-superexec from PATH), no runtime dependency installation, one thread per process, and a
    Ray of its own (``RAY_ADDRESS=local``: never join a cluster someone's ``ray start`` left running)
    unless ``extra`` names one (``SimulationEngine(ray_address=...)``)."""
    return {
        **os.environ,
        "FLWR_HOME": str(flwr_home),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
        "RAY_ADDRESS": "local",
        **extra,
    }


def stop_process_group(proc: subprocess.Popen) -> None:
    """Stop a process started with ``start_new_session`` and everything in its session
    (a SuperLink's executor, simulation and Ray; a SuperNode's ClientApp processes)."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            time.sleep(1)  # let its children see the signal too
        except subprocess.TimeoutExpired:
            continue
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # anything of the group still alive
    except ProcessLookupError:
        pass


def toml_overrides(values: Mapping[str, Any]) -> str:
    """Run-config overrides as ``flwr run -c`` takes them (TOML values)."""
    return " ".join(f"{k}={json.dumps(v)}" for k, v in values.items())


def gpu_share(concurrent_sites: int) -> float:
    """A GPU fraction per virtual site such that ``concurrent_sites`` fit on the visible GPUs at once
    (at most one GPU each); 0 without CUDA, so a CPU machine asks Ray for none."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return min(1.0, gpus / max(concurrent_sites, 1)) if gpus else 0.0


class SimulationEngine:
    """A simulation SuperLink for the duration of a ``with`` block; ``run`` submits one run."""

    def __init__(
        self,
        work: Path,
        cpus_per_site: int = 1,
        total_cpus: int | None = None,
        gpus_per_site: float | None = None,
        ray_address: str | None = None,
    ) -> None:
        """``cpus_per_site``: Ray CPUs (and torch threads) of one virtual SuperNode; ``total_cpus``:
        Ray's CPUs (default: the usable cores, ``common.runtime.usable_cores``), so ``total // per_site`` sites train at a time. ``gpus_per_site``:
        Ray's GPU fraction per SuperNode (Flower's ``client-resources-num-gpus``); default
        ``gpu_share``, so that the sites training at a time share the machine's GPUs. ``ray_address``:
        an existing Ray cluster (``HOST:PORT`` of its head) to run on instead of a Ray of its own;
        Flower's Ray backend calls ``ray.init()``, which joins the cluster ``RAY_ADDRESS`` names, and
        the cluster's CPUs are its own (``init-args-num-cpus`` is then not passed: Ray refuses it
        when joining a cluster)."""
        self.work = Path(work)
        self.ray_address = ray_address
        self.cpus_per_site, self.total_cpus = cpus_per_site, total_cpus or usable_cores()
        self.gpus_per_site = gpu_share(self.total_cpus // cpus_per_site) if gpus_per_site is None else gpus_per_site
        self.home = self.work / "flwr-home"
        self.app = self.work / "app"
        self.port = 0
        self._proc: subprocess.Popen | None = None

    def _env(self) -> dict[str, str]:
        threads = str(self.cpus_per_site)
        ray = {"RAY_ADDRESS": self.ray_address} if self.ray_address else {}
        # Each virtual site's process sizes its torch threads from THREADS_ENV (common.runtime): its share
        # of the cores, not the machine's count, so that the sites training side by side never oversubscribe.
        return flwr_env(self.home, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, **{THREADS_ENV: threads}, **ray)

    def __enter__(self) -> SimulationEngine:
        self.home.mkdir(parents=True, exist_ok=True)
        stage_app(REPO, self.app)
        self.port = free_port()  # Flower 1.42 serves every SuperLink API over one HTTP port
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "sim"\n\n[superlink.sim]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )
        log = self.work / "superlink.log"
        with log.open("w") as fh:
            self._proc = subprocess.Popen(
                [
                    str(BIN / "flower-superlink"),
                    "--insecure",
                    "--simulation",
                    "--isolation",
                    "subprocess",
                    "--disable-runtime-dependency-installation",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--database",
                    str(self.work / "state.db"),
                ],
                env=self._env(),
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for_port(self.port, self._proc, log)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            stop_process_group(self._proc)

    def run(
        self,
        overrides: Mapping[str, Any],
        num_sites: int,
        log_path: Path,
        on_line: Callable[[str], None] | None = None,
        timeout: float | None = None,
    ) -> None:
        """``flwr run`` this app with ``overrides`` on ``num_sites`` virtual SuperNodes; every output
        line goes to ``log_path`` and ``on_line``. Raises with the log's tail if the run fails."""
        federation = f"num-supernodes={num_sites} client-resources-num-cpus={self.cpus_per_site}"
        if not self.ray_address:
            federation += f" init-args-num-cpus={self.total_cpus}"
        if self.gpus_per_site > 0:
            federation += f" client-resources-num-gpus={self.gpus_per_site}"
        cmd = [
            str(BIN / "flwr"),
            "run",
            str(self.app),
            "sim",
            "--stream",
            "--federation-config",
            federation,
            "-c",
            toml_overrides(overrides),
        ]
        lines: list[str] = []
        with log_path.open("w") as fh:
            proc = subprocess.Popen(
                cmd,
                env=self._env(),
                cwd=self.work,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
            deadline = None if timeout is None else time.monotonic() + timeout
            assert proc.stdout is not None
            for line in proc.stdout:
                fh.write(line)
                lines.append(line)
                if on_line is not None:
                    on_line(line.rstrip("\n"))
                if deadline is not None and time.monotonic() > deadline:
                    stop_process_group(proc)
                    raise TimeoutError(f"flwr run did not finish within {timeout} s (log: {log_path})")
            proc.wait()
        text = "".join(lines)
        if proc.returncode != 0 or "run finished" not in text:
            raise RuntimeError(f"flwr run failed (exit {proc.returncode}); log: {log_path}\n{text[-3000:]}")
