"""Real DICOM network peers on loopback for tests and benchmarks: dcmtk's tools, free ports, bounded
waits, and stopping what was started."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

LOOPBACK = "127.0.0.1"


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise FileNotFoundError(f"{tool} not found: apt-get install -y dcmtk dicom3tools (README, 'Fresh machine')")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def wait_for(check: Callable[[], object], timeout: float, what: str) -> object:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if value := check():
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((LOOPBACK, port)) == 0


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def storescu(port: int, folder: Path, calling: str = "MODALITY") -> subprocess.CompletedProcess:
    cmd = [need("storescu"), "-v", "-aet", calling, "-aec", "HEMEXP", LOOPBACK, str(port), "+sd", str(folder)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)
