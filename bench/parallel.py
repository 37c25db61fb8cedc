"""Benchmark runs a few at a time: on a small CPU machine, small models train faster side by side, one thread each,
than one after the other with every thread (the 2-core VM: two 1-thread runs of the SALT bench's 3.4M LLM took
1.23x one 2-thread run's time, so 1.6x the throughput; bench/RESULTS.md)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path

LOCK = threading.Lock()  # for the shared read-modify-write of result files, and for in-process evaluation
_RUNNING: set[subprocess.Popen] = set()  # stopped when a job fails (their runs resume from their checkpoints)
_RUNNING_LOCK = threading.Lock()


def threads_per_job(jobs: int) -> int:
    return max(1, len(os.sched_getaffinity(0)) // jobs)  # the cores this process may use, not the host's


def beside(run_dir: Path, ext: str) -> Path:
    """A file next to a run dir, named after all of it (Path.with_suffix would cut "h0.1_s0" to "h0")."""
    return run_dir.parent / f"{run_dir.name}{ext}"


def run_module(cwd: Path, *cmd: str, log: Path | None = None) -> None:
    """`python -m cmd...`; with `log`, its output goes there (side-by-side runs would interleave their progress
    bars) and a failure prints the log's tail."""
    print("+ " + " ".join(cmd), flush=True)
    if log is None:
        subprocess.run([sys.executable, "-m", *cmd], cwd=cwd, check=True)
        return
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as f:
        proc = subprocess.Popen([sys.executable, "-m", *cmd], cwd=cwd, stdout=f, stderr=subprocess.STDOUT)
        with _RUNNING_LOCK:
            _RUNNING.add(proc)
        try:
            code = proc.wait()
        finally:
            with _RUNNING_LOCK:
                _RUNNING.discard(proc)
    if code:
        tail = log.read_bytes()[-3000:].decode("utf-8", "replace")
        raise RuntimeError(f"{cmd[0]} failed (exit {code}); the end of {log}:\n{tail}")


class Jobs:
    """Up to `n` jobs at once, started in submission order. A job's `then` (e.g. a check that exits) runs right
    after it, in its thread. The first failure ends the batch: queued jobs are cancelled and running logged
    subprocesses terminated (a failed check stops the sweep at once), and `drain` raises that first failure."""

    def __init__(self, n: int) -> None:
        self.pool = ThreadPoolExecutor(max(1, n), thread_name_prefix="job")
        self.pending: list[Future] = []
        self.first_error: BaseException | None = None
        self._lock = threading.Lock()

    def submit(self, fn: Callable[[], None], then: Callable[[], None] | None = None) -> None:
        def job() -> None:
            if self.first_error is not None:
                raise RuntimeError("skipped: an earlier job failed")
            try:
                fn()
                if then is not None:
                    then()
            except BaseException as e:
                self._stop(e)
                raise

        self.pending.append(self.pool.submit(job))

    def _stop(self, error: BaseException) -> None:
        with self._lock:
            if self.first_error is not None:
                return  # a job stopped by the first failure
            self.first_error = error
        for fut in list(self.pending):
            fut.cancel()
        with _RUNNING_LOCK:
            for proc in _RUNNING:
                proc.terminate()

    def drain(self) -> None:
        """Wait for every job; raise the first failure (the jobs it stopped fail too, and are not reported)."""
        pending, self.pending = self.pending, []
        try:
            wait(pending)
        except BaseException as e:  # interrupted while waiting: stop the rest too
            self.pending = pending
            self._stop(e)
            raise
        if self.first_error is not None:
            raise self.first_error


class Plan:
    """Runs in plan order, `n` at a time (parallel.Jobs); a run waits for those it needs, started earlier."""

    def __init__(self, n: int) -> None:
        self.jobs, self.done = Jobs(n), {}

    def add(self, name: str, fn: Callable[[], None], deps: tuple[str, ...]) -> None:
        if missing := [d for d in deps if d not in self.done]:
            raise ValueError(f"{name}: {missing} must start earlier in the plan")
        self.done[name] = done = threading.Event()

        def job() -> None:
            for d in deps:
                while not self.done[d].wait(1.0):
                    if self.jobs.first_error is not None:
                        raise RuntimeError(f"skipped: {d} failed")
            fn()
            done.set()

        self.jobs.submit(job)
