"""Run-time choices made once at the edge: the device, and how many threads torch may use.

Threads: torch's OpenMP threads spin when there are more of them than free cores (a small CNN with
2 threads beside another busy process ran 13x slower than with 1), so every process that runs torch
sizes its threads here, from the cores it may really use (``use_torch_threads``), never from
``os.cpu_count()`` (the machine's, which ignores CPU affinity and container quotas). A process
started by another that divides the cores between several workers (the simulation's Ray workers,
one per virtual site) gets its share through ``THREADS_ENV``. torch is imported only where used,
so that a worker can size its threads before anything loads torch (``simulations.parallel``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

#: Environment variable with a process's torch threads, set by whoever starts several torch
#: processes side by side (``simulations.engine``: one per virtual site) or by a site's IT.
THREADS_ENV = "HEMEXP_THREADS"
#: cgroup v2 CPU quota of this container ("max 100000" = none; "200000 100000" = 2 cores).
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: the GPU when there is one, else the CPU; anything else as torch spells it."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} asked for, but no CUDA device is available")
    return device


def quota_cores(cpu_max: str) -> int | None:
    """Whole cores of a cgroup v2 ``cpu.max`` line ("QUOTA PERIOD"), at least 1; None when unlimited."""
    parts = cpu_max.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    return max(1, int(int(parts[0]) // int(parts[1])))


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity, capped by the container's CPU quota."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota = quota_cores(CGROUP_CPU_MAX.read_text())
    except (OSError, ValueError):
        quota = None
    return min(cores, quota) if quota else cores


def torch_threads(requested: int = 0) -> int:
    """The threads to use: ``requested`` when > 0, else ``$HEMEXP_THREADS``, else ``$OMP_NUM_THREADS``
    (what a user sets for any OpenMP program), else ``usable_cores()``."""
    if requested > 0:
        return requested
    for name in (THREADS_ENV, "OMP_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if not value:
            continue
        try:
            n = int(value)
        except ValueError:
            raise ValueError(f"{name}={value!r}: expected a whole number of threads") from None
        if n < 1:
            raise ValueError(f"{name}={value!r}: expected at least 1 thread")
        return n
    return usable_cores()


def use_torch_threads(requested: int = 0) -> int:
    """Set torch's intra-op threads to ``torch_threads(requested)``; returns the number set."""
    import torch

    n = torch_threads(requested)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def machine_cpu_seconds() -> float:
    """Busy CPU seconds of the whole machine since boot (Linux ``/proc/stat``; NaN elsewhere): the
    difference over a run counts every process it started (Ray workers, Flower's), not only this one."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return float("nan")
    ticks = [int(v) for v in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    busy = sum(ticks[:8]) - idle  # user nice system idle iowait irq softirq steal (guest is inside user)
    return busy / os.sysconf("SC_CLK_TCK")
