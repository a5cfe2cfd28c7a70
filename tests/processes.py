"""Helpers for tests that start real Flower processes on loopback: ports, environment, clean stop."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


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
    flower-superexec from PATH), no runtime dependency installation, one thread per process."""
    return {**os.environ, "FLWR_HOME": str(flwr_home), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_DISABLE_UPDATE_CHECK": "1",
            "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra}


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
