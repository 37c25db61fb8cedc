"""The soft-label records (core/soft_labels.py): their dtypes and sizes, their trip through a batch, and the KD
loss that takes them by type."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_tools.softlabels import CacheConfig, bytes_per_position
from slm_assist.core.soft_labels import RECORDS, SampledLabels, SoftLabelCache, TopKLabels, write_cache
from slm_assist.kd.losses import kd_loss, sampled_kl
from slm_assist.training.batches import Batch


def _top_k(b=2, p=3, k=4) -> TopKLabels:
    g = torch.Generator().manual_seed(0)
    return TopKLabels(torch.randint(0, 9, (b, p, k), generator=g), torch.randn(b, p, k, generator=g),
                      torch.rand(b, p, generator=g)).stored()


def test_sizes_and_dtypes():
    assert bytes_per_position(CacheConfig(mode="top_k", k=8)) == TopKLabels.bytes_per_position(8) == 8 * (4 + 2) + 4
    assert bytes_per_position(CacheConfig(mode="sampled", samples=6)) == SampledLabels.bytes_per_position(6) == 36
    assert bytes_per_position(CacheConfig()) == 0
    assert RECORDS == {"top_k": TopKLabels, "sampled": SampledLabels}
    rec = _top_k()
    assert (rec.ids.dtype, rec.logprobs.dtype, rec.tail.dtype) == (torch.int32, torch.float16, torch.float32)
    wide = rec.widen()
    assert type(wide) is TopKLabels and (wide.ids.dtype, wide.logprobs.dtype) == (torch.int64, torch.float32)
    assert wide.tail is rec.tail  # already fp32: not copied
    assert (rec.positions, rec.width) == (3, 4)
    s = SampledLabels(rec.ids, rec.logprobs)
    assert s.weights.shape == (2, 3, 4) and torch.all(s.weights == 0.25)


def test_a_record_travels_with_its_batch():
    rec = _top_k()
    batch = Batch(torch.zeros(2, 4, dtype=torch.long), extras={"soft_labels": [rec]}).to(torch.device("cpu"))
    moved = batch.extras["soft_labels"][0]
    assert type(moved) is TopKLabels and torch.equal(moved.ids, rec.ids) and moved.tail.dtype == torch.float32
    assert type(rec.to("cpu", non_blocking=True)) is TopKLabels


def test_the_loss_takes_the_record_by_type():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 3, 9, generator=g), torch.randn(2, 3, 9, generator=g)
    ids = torch.randint(0, 9, (2, 3, 4), generator=g)
    lp = torch.log_softmax(t, -1).gather(-1, ids)
    want = sampled_kl(s.reshape(6, 9), ids.reshape(6, 4), lp.reshape(6, 4), torch.full((6, 4), 0.25)).mean()
    assert kd_loss(s, kind="sampled", cache=SampledLabels(ids, lp)) == want
    with pytest.raises(TypeError, match="TopKLabels or SampledLabels"):
        kd_loss(s, kind="top_k", cache={"ids": ids, "logprobs": lp, "tail": torch.zeros(2, 3)})


def test_cache_round_trip(tmp_path):
    rec = _top_k()
    write_cache([rec], [7, 3], tmp_path / "c")
    cache = SoftLabelCache(tmp_path / "c")
    assert (cache.mode, cache.record, cache.shape, len(cache)) == ("top_k", TopKLabels, (3, 4), 2)
    got = cache.read([3, 7])
    for f in ("ids", "logprobs", "tail"):
        assert torch.equal(getattr(got, f), getattr(rec, f)[[1, 0]]), f
    samp = SampledLabels(rec.ids[0], rec.logprobs[0])  # one sequence, [P, n]
    write_cache([samp], [5], tmp_path / "s")
    back = SoftLabelCache(tmp_path / "s").get(np.array([5]))
    assert type(back) is SampledLabels and torch.equal(back.ids[0], samp.ids.long())
    with pytest.raises(TypeError, match="more than one kind"):
        write_cache([rec, samp], [1, 2, 3], tmp_path / "mixed")


def test_top_k_labels_of_a_batch_equal_those_of_each_sequence(tmp_path):
    """The GPU cache path takes the top-k of all kept rows at once and keeps them as one record: it must match the
    per-sequence CPU path, on disk too."""
    import torch

    from data_tools.softlabels import top_k_labels
    from slm_assist.core.soft_labels import write_cache

    logits = torch.randn(3, 7, 50, generator=torch.Generator().manual_seed(0)) * 4
    batch = top_k_labels(logits, 5)
    rows = [top_k_labels(logits[r], 5) for r in range(3)]
    for r, one in enumerate(rows):
        for key in ("ids", "logprobs", "tail"):
            assert (getattr(batch, key)[r] == getattr(one, key)).all(), key
    assert batch.ids.shape == (3, 7, 5) and batch.tail.shape == (3, 7)
    assert (batch.ids.dtype, batch.logprobs.dtype, batch.tail.dtype) == (torch.int32, torch.float16, torch.float32)
    write_cache([batch.map(lambda t: t[:2]), batch.map(lambda t: t[2:])], [4, 8, 9], tmp_path / "batched")
    write_cache(rows, [4, 8, 9], tmp_path / "rows")
    for f in sorted((tmp_path / "rows").iterdir()):
        assert f.read_bytes() == (tmp_path / "batched" / f.name).read_bytes(), f.name
