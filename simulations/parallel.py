"""Per-site jobs in worker processes: the dataset generator and the cache builder both spend minutes
on independent sites, and a 2-core machine halves that by running two at once."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

from common.runtime import THREADS_ENV, usable_cores

J = TypeVar("J")
R = TypeVar("R")


def run_jobs(
    fn: Callable[[J], R],
    jobs: Sequence[J],
    workers: int,
    sizes: Sequence[float] | None = None,
    on_done: Callable[[int, R], Any] | None = None,
) -> list[R]:
    """``fn`` over ``jobs``, largest ``sizes`` first (so a big site does not start last), in
    ``workers`` spawned processes (``fork`` would copy torch's thread pools); results in job order.
    ``on_done(i, result)`` runs in this process as each job's result is collected, for progress."""
    order = sorted(range(len(jobs)), key=lambda i: -sizes[i]) if sizes is not None else list(range(len(jobs)))
    results: list[Any] = [None] * len(jobs)
    if workers <= 1:
        for i in order:
            results[i] = fn(jobs[i])
            if on_done is not None:
                on_done(i, results[i])
        return results
    share = str(max(1, usable_cores() // workers))
    with ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"), initializer=_size_threads, initargs=(share,)
    ) as pool:
        futures = {i: pool.submit(fn, jobs[i]) for i in order}
        for i in order:
            results[i] = futures[i].result()
            if on_done is not None:
                on_done(i, results[i])
    return results


def _size_threads(threads: str) -> None:
    """A worker's share of the cores, set before its job imports torch (whose OpenMP pool reads
    ``OMP_NUM_THREADS`` once) and for ``common.runtime.use_torch_threads``."""
    os.environ["OMP_NUM_THREADS"] = os.environ[THREADS_ENV] = threads
