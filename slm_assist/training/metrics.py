"""Run logging on rank 0: `metrics.jsonl` (one JSON object per logged step; core/run_dir.py reads it back) and
TensorBoard scalars; the figures benches take from it (curves, steps to reach a loss, seed statistics)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slm_assist.core.files import atomic_write_text
from slm_assist.core.run_dir import METRICS, read_metrics


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS
        self._tb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """On resume, drop records a killed run wrote past its last checkpoint, so the log has no duplicates."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                if line.strip() and _step_of(line) <= step]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _clean(v) for k, v in values.items()}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)):
                self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


class StepReporter:
    """A run's step reporting (rank 0 writes, every rank calls): metrics.jsonl and TensorBoard records, with the
    throughput over the steps since the last record and, with `flops_per_token_per_peak` (a model's FLOPs per
    token over the devices' peak FLOP/s; 0 = unknown), the MFU; and the progress bar."""

    def __init__(self, run_dir: Path, start_step: int, max_steps: int, tokens_per_step: int,
                 flops_per_token_per_peak: float, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.tokens_per_step, self.mfu_factor = tokens_per_step, flops_per_token_per_peak
        self.logger = MetricsLogger(run_dir, enabled=enabled)
        self.logger.truncate_after(start_step)
        self.bar = tqdm(total=max_steps, initial=start_step, disable=not enabled, desc=Path(run_dir).name,
                        unit="step", dynamic_ncols=True)
        self.window_t, self.window_steps = time.perf_counter(), 0

    def step_done(self) -> None:
        self.window_steps += 1
        self.bar.update(1)

    def log(self, step: int, metrics: dict[str, torch.Tensor], head: dict[str, Any], lr: float, tokens: int,
            grad_norm: float | None, last_val: float | None) -> None:
        """One record: `head` (an evaluation's val_loss, early_stop), the step's metrics, the LR, tokens seen,
        the window's tokens/s, the gradient norm (and MFU)."""
        values = _floats(metrics)
        tps = self.window_steps * self.tokens_per_step / max(time.perf_counter() - self.window_t, 1e-9)
        record = {**head, **values, "lr": lr, "tokens": tokens, "tokens_per_s": tps, "grad_norm": grad_norm}
        if self.mfu_factor:
            record["mfu"] = self.mfu_factor * tps
        self.logger.log(step, record)
        self.window_t, self.window_steps = time.perf_counter(), 0
        self.bar.set_postfix(loss=f"{values['loss']:.3f}", **({"val": f"{last_val:.3f}"} if last_val else {}))

    def close(self) -> None:
        self.bar.close()
        self.logger.close()


def _floats(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    """Metric tensors as floats, with one device-to-host copy for all of those on an accelerator."""
    out = {k: float(v) for k, v in metrics.items() if v.device.type == "cpu"}
    dev = [k for k in metrics if k not in out]
    if dev:
        out.update(zip(dev, torch.stack([metrics[k].double() for k in dev]).tolist()))
    return {k: out[k] for k in metrics}


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return 1 << 62  # a torn last line from a kill: drop it


def _clean(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def val_curve(run_dir: str | Path) -> list[tuple[int, float]]:
    """(step, validation loss) at every evaluation of a run."""
    return [(r["step"], r["val_loss"]) for r in read_metrics(run_dir) if "val_loss" in r]


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """First step at which the (linearly interpolated) validation curve is <= target; None if it never is."""
    prev: tuple[int, float] | None = None
    for step, loss in curve:
        if loss <= target:
            if prev is None or prev[1] == loss:
                return float(step)
            s0, l0 = prev
            return s0 + (l0 - target) / (l0 - loss) * (step - s0)
        prev = (step, loss)
    return None


def mean_se(xs: list[float]) -> tuple[float, float | None]:
    """Mean and standard error (sample std / sqrt(n)) of per-seed figures; the SE is None for one seed."""
    a = np.asarray(xs, dtype=float)
    return float(a.mean()), (float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else None)


def paired_z(a: dict[int, dict], b: dict[int, dict], key: str) -> float | None:
    """z of mean(b[s][key] - a[s][key]) over the seeds both have (positive: `a` is lower), from the paired
    differences' standard error; None below 2 seeds or when a value is missing. With few seeds it is a t statistic
    (3 seeds: 2 degrees of freedom)."""
    seeds = sorted(set(a) & set(b))
    diffs = [b[s][key] - a[s][key] for s in seeds if a[s][key] is not None and b[s][key] is not None]
    if len(diffs) < 2 or len(diffs) < len(seeds):
        return None
    mean, se = mean_se(diffs)
    return None if not se else mean / se
