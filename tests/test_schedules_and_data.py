"""LR schedules against their closed forms; the batch order's sharding and resume."""

from __future__ import annotations

import math

import numpy as np
import pytest

from slm_assist.training.batches import ShardedBatches
from slm_assist.training.optim import ScheduleConfig, lr_factor


def test_cosine_closed_form():
    cfg = ScheduleConfig(kind="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, 110, cfg) == pytest.approx(0.1)
    assert lr_factor(9, 110, cfg) == pytest.approx(1.0)
    assert lr_factor(10, 110, cfg) == pytest.approx(1.0)
    assert lr_factor(60, 110, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(110, 110, cfg) == pytest.approx(0.1)
    assert lr_factor(500, 110, cfg) == pytest.approx(0.1)  # clamps past the end


def test_wsd_closed_form():
    cfg = ScheduleConfig(kind="wsd", warmup_steps=5, min_lr_ratio=0.0, decay_fraction=0.2)
    total = 100  # decay over the last 20 steps: 80 -> 100
    assert lr_factor(4, total, cfg) == pytest.approx(1.0)
    assert lr_factor(50, total, cfg) == 1.0
    assert lr_factor(79, total, cfg) == 1.0
    assert lr_factor(80, total, cfg) == pytest.approx(1.0)
    assert lr_factor(90, total, cfg) == pytest.approx(0.5)
    assert lr_factor(100, total, cfg) == pytest.approx(0.0)


def test_constant_and_no_warmup():
    cfg = ScheduleConfig(kind="constant", warmup_steps=0)
    assert [lr_factor(s, 10, cfg) for s in (0, 5, 9)] == [1.0, 1.0, 1.0]


class Rows:
    """A stand-in for an Arrow split: row i holds [i, i]."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, idx):
        idx = np.asarray(idx)
        return {"input_ids": np.stack([idx, idx], axis=1)}


def _take(b: ShardedBatches, n: int) -> list[list[int]]:
    return [b.next().input_ids[:, 0].tolist() for _ in range(n)]


def test_ranks_get_disjoint_shards_covering_the_single_rank_order():
    single = _take(ShardedBatches(Rows(50), 4, 0, 1, seed=3), 6)
    r0 = _take(ShardedBatches(Rows(50), 2, 0, 2, seed=3), 6)
    r1 = _take(ShardedBatches(Rows(50), 2, 1, 2, seed=3), 6)
    for s, a, b in zip(single, r0, r1):
        assert not set(a) & set(b)
        assert sorted(a + b) == sorted(s)  # the same global batch, split between ranks


def test_epochs_cover_every_row_once_and_reshuffle():
    b = ShardedBatches(Rows(12), 4, 0, 1, seed=0)
    epoch0 = sum(_take(b, 3), [])
    epoch1 = sum(_take(b, 3), [])
    assert sorted(epoch0) == sorted(epoch1) == list(range(12))
    assert epoch0 != epoch1 and b.epoch == 1


def test_state_resumes_the_same_order():
    a = ShardedBatches(Rows(30), 4, 0, 1, seed=7)
    _take(a, 9)  # crosses an epoch boundary (7 batches per epoch)
    state = a.state_dict()
    expected = _take(a, 5)
    b = ShardedBatches(Rows(30), 4, 0, 1, seed=0)
    b.load_state_dict(state)
    assert _take(b, 5) == expected


def test_subset_stream_draws_only_selected_rows_and_covers_them():
    rows = np.array([3, 7, 8, 20, 21, 40, 41, 49])
    b = ShardedBatches(Rows(50), 2, 0, 1, seed=0, rows=rows)
    epoch = sum(_take(b, 4), [])
    assert sorted(epoch) == rows.tolist()
    assert set(sum(_take(b, 8), [])) <= set(rows.tolist())


def _trace(b: ShardedBatches, n: int) -> list[tuple[list[int], list[int], int, int]]:
    """Each batch's rows and index, and the stream's state after it."""
    out = []
    for _ in range(n):
        batch = b.next()
        out.append((batch.input_ids[:, 0].tolist(), batch.index.tolist(), b.epoch, b.cursor))
    return out


def test_prefetching_stream_hands_out_the_same_batches_and_states():
    """The batch read ahead in a thread is the one `next` would read; the state counts handed-out batches only,
    so a checkpoint taken mid-stream resumes identically; a curriculum or a resume set after reading ahead
    drops the stale read."""
    def pair(**kw):
        return ShardedBatches(Rows(30), 4, 0, 1, seed=7, prefetch=False, **kw), \
            ShardedBatches(Rows(30), 4, 0, 1, seed=7, prefetch=True, **kw)

    plain, ahead = pair()
    assert ahead.prefetches and not plain.prefetches
    assert _trace(ahead, 9) == _trace(plain, 9)  # crosses an epoch boundary (7 batches per epoch)
    state = ahead.state_dict()
    assert state == plain.state_dict()
    resumed = ShardedBatches(Rows(30), 4, 0, 1, seed=0, prefetch=True)
    _trace(resumed, 2)  # reads ahead from the wrong position, then resumes
    resumed.load_state_dict(state)
    assert _trace(resumed, 6) == _trace(ahead, 6) == _trace(plain, 6)
    plain, ahead = pair()
    _trace(plain, 1), _trace(ahead, 1)
    key = np.arange(30.0)[::-1]
    for b in (plain, ahead):
        b.order_first(key, 12)
    assert _trace(ahead, 5) == _trace(plain, 5)


def test_attach_runs_in_the_prefetch_thread_for_the_right_rows():
    import threading
    from dataclasses import replace

    import torch

    seen = []

    def attach(batch):
        seen.append(threading.current_thread().name)
        return replace(batch, extras={"x": torch.from_numpy(batch.index * 10)})

    b = ShardedBatches(Rows(30), 4, 0, 1, seed=1, prefetch=True)
    b.attach = attach
    for _ in range(5):
        batch = b.next()
        assert batch.extras["x"].tolist() == (batch.input_ids[:, 0] * 10).tolist()
    b._ahead[1].result()  # the sixth batch, read ahead
    assert seen[0] == threading.current_thread().name  # the first batch: nothing read ahead yet
    assert len(seen) == 6 and all(name.startswith("batches") for name in seen[1:])


def test_optimizer_impl_is_the_one_asked_for():
    import torch

    from slm_assist.training.optim import OptimConfig, build_optimizer

    p = [torch.nn.Parameter(torch.zeros(3))]
    cpu = torch.device("cpu")
    assert not build_optimizer(p, OptimConfig(), cpu).defaults["fused"]  # auto on CPU: torch's default AdamW
    fused = build_optimizer(p, OptimConfig(impl="torch_fused"), cpu)
    assert isinstance(fused, torch.optim.AdamW) and fused.defaults["fused"]
