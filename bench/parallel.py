"""Benchmark runs a few at a time: on a small CPU machine, small models train faster side by side, one thread each,
than one after the other with every thread (the 2-core VM: two 1-thread runs of the SALT bench's 3.4M LLM took
1.23x one 2-thread run's time, so 1.6x the throughput; bench/RESULTS.md)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

LOCK = threading.Lock()  # for the shared read-modify-write of result files, and for in-process evaluation


def threads_per_job(jobs: int) -> int:
    return max(1, (os.cpu_count() or 1) // jobs)


def run_module(cwd: Path, *cmd: str, log: Path | None = None) -> None:
    """`python -m cmd...`; with `log`, its output goes there (side-by-side runs would interleave their progress
    bars) and a failure prints the log's tail."""
    print("+ " + " ".join(cmd), flush=True)
    if log is None:
        subprocess.run([sys.executable, "-m", *cmd], cwd=cwd, check=True)
        return
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as f:
        res = subprocess.run([sys.executable, "-m", *cmd], cwd=cwd, stdout=f, stderr=subprocess.STDOUT)
    if res.returncode:
        tail = log.read_bytes()[-3000:].decode("utf-8", "replace")
        raise RuntimeError(f"{cmd[0]} failed (exit {res.returncode}); the end of {log}:\n{tail}")


class Jobs:
    """Up to `n` jobs at once, started in submission order. A job's `then` (e.g. a check that exits) runs right
    after it, in its thread; after a failure the jobs not yet started are skipped, and `drain` raises the first
    failure in submission order (a real one: every job submitted before it had started)."""

    def __init__(self, n: int) -> None:
        self.pool = ThreadPoolExecutor(max(1, n), thread_name_prefix="job")
        self.pending: list[Future] = []
        self.failed = False

    def submit(self, fn: Callable[[], None], then: Callable[[], None] | None = None) -> None:
        def job() -> None:
            if self.failed:
                raise RuntimeError("skipped: an earlier job failed")
            try:
                fn()
                if then is not None:
                    then()
            except BaseException:
                self.failed = True
                raise

        self.pending.append(self.pool.submit(job))

    def drain(self) -> None:
        pending, self.pending = self.pending, []
        for fut in pending:
            fut.result()
