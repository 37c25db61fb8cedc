"""Fault injection for tests: `SLM_ASSIST_FAULT=point:N` sends SIGKILL to this process at a named point, so the
resume and atomicity tests get a real `kill -9` at a known place.

Points: `kill_after_checkpoint:STEP`, `kill_before_commit:STEP` (training/checkpoint.py) and
`kill_after_shard:SHARD` (data_tools/score.py)."""

from __future__ import annotations

import os
import signal

FAULT_ENV = "SLM_ASSIST_FAULT"


def fault(point: str, n: int) -> None:
    """SIGKILL this process if the environment asks for a fault at `point:n`."""
    if os.environ.get(FAULT_ENV) == f"{point}:{n}":
        os.kill(os.getpid(), signal.SIGKILL)
