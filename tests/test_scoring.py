"""SLM scoring: the math against a hand computation, shard-invariance, kill + resume, the soft-label cache."""

from __future__ import annotations

import math
import os
import re
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch

from data_tools.score import ScoreConfig, main, shard_rows
from data_tools.score_math import SCORE_COLUMNS, score_logits, token_stats
from data_tools.score_output import LOCK
from data_tools.softlabels import sampled_labels, sequence_generator
from slm_assist.core.config import load_config
from slm_assist.core.errors import ConfigError, UserError
from slm_assist.core.faults import FAULT_ENV
from slm_assist.core.soft_labels import SampledLabels, SoftLabelCache, TopKLabels

from .conftest import REPO, run_module


def _hand_scores(logits: torch.Tensor, ids: torch.Tensor, k: int) -> list[dict[str, float]]:
    out = []
    for b in range(logits.shape[0]):
        losses, ents, learn, top1, conf_wrong = [], [], [], [], []
        for t in range(logits.shape[1] - 1):
            z = logits[b, t].double().tolist()
            m = max(z)
            lse = m + math.log(sum(math.exp(v - m) for v in z))
            p = [math.exp(v - lse) for v in z]
            y = int(ids[b, t + 1])
            losses.append(lse - z[y])
            ents.append(-sum(pi * math.log(pi) for pi in p if pi > 0))
            rank = sum(1 for v in z if v > z[y])
            learn.append(rank < k)
            top1.append(rank == 0)
            conf_wrong.append(max(p) >= 0.5 and rank > 0)
        learn_losses = [x for x, keep in zip(losses, learn) if keep]
        out.append({
            "mean_loss": sum(losses) / len(losses), "median_loss": statistics.median(losses),
            "salt_ds": statistics.median(learn_losses) if learn_losses else float("nan"),
            "learnable_frac": sum(learn) / len(learn), "mean_entropy": sum(ents) / len(ents),
            "top1_acc": sum(top1) / len(top1), "confident_wrong": sum(conf_wrong) / len(conf_wrong),
        })
    return out


def test_scores_match_hand_computation():
    g = torch.Generator().manual_seed(0)
    B, T, V, k = 3, 7, 11, 3
    logits = torch.randn(B, T, V, generator=g) * 2
    ids = torch.randint(0, V, (B, T), generator=g)
    # sequence 2: every target is the model's least likely token -> no learnable token at all
    for t in range(T - 1):
        logits[2, t, ids[2, t + 1]] = logits[2, t].min() - 1.0
    got = score_logits(logits, ids, k, chunk_bytes=2 * (T - 1) * V * 4)  # chunks of 2 sequences
    whole = score_logits(logits, ids, k, chunk_bytes=1 << 30)
    assert set(got) == set(SCORE_COLUMNS) == set(_hand_scores(logits[:1], ids[:1], k)[0])
    for name in got:
        torch.testing.assert_close(got[name], whole[name], equal_nan=True)
    for b, want in enumerate(_hand_scores(logits, ids, k)):
        for name, value in want.items():
            if math.isnan(value):
                assert math.isnan(got[name][b].item()), (b, name)
            else:
                assert got[name][b].item() == pytest.approx(value, rel=1e-5, abs=1e-6), (b, name)
    assert got["learnable_frac"][2] == 0 and math.isnan(got["salt_ds"][2])


def _topk_token_stats(logits: torch.Tensor, targets: torch.Tensor, k: int, confident: float) -> dict:
    """The former implementation (top-k values instead of a rank count), kept as the reference."""
    top = logits.topk(min(k, logits.shape[-1]), dim=-1).values
    z_y = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    shifted = logits.float() - top[..., :1].float()
    e = shifted.exp()
    s = e.sum(-1)
    return {"loss": s.log() - (z_y.float() - top[..., 0].float()),
            "entropy": s.log() - torch.linalg.vecdot(e, shifted) / s,
            "learnable": z_y >= top[..., -1], "top1": z_y >= top[..., 0],
            "confident_wrong": (s <= 1.0 / confident) & (z_y < top[..., 0])}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 5, 300])
def test_token_stats_match_the_former_top_k_version(dtype, k):
    """Same statistics as the top-k implementation, on peaked and flat rows, with ties (bf16 rounding makes
    many) and k above the vocabulary; the caller's logits are left unchanged."""
    g = torch.Generator().manual_seed(2)
    B, P, V = 3, 40, 257
    logits = (torch.randn(B, P, V, generator=g) * torch.tensor([0.3, 3.0, 12.0]).view(B, 1, 1)).to(dtype)
    targets = torch.randint(0, V, (B, P), generator=g)
    targets[:, ::4] = logits[:, ::4].argmax(-1)
    before = logits.clone()
    got, want = token_stats(logits, targets, k, 0.5), _topk_token_stats(logits, targets, k, 0.5)
    assert torch.equal(logits, before)
    for name in want:
        if want[name].dtype == torch.bool:
            assert torch.equal(got[name], want[name]), name
        else:
            torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-6)
    assert 0 < want["learnable"].sum() < want["learnable"].numel() or k > V


def test_token_stats_trace_as_one_graph():
    """The scorer compiles token_stats with fullgraph=True on CUDA: dynamo must capture it without a graph break
    (the eager backend checks the trace on CPU without a C++ compiler), and give the same numbers."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(3)
    stats = torch.compile(token_stats, fullgraph=True, backend="eager")  # as compiled_token_stats, on CPU
    for rows in (4, 3):  # a shorter last chunk
        logits = torch.randn(rows, 9, 50, generator=g).to(torch.bfloat16)
        targets = torch.randint(0, 50, (rows, 9), generator=g)
        got, want = stats(logits, targets, 5, 0.5), token_stats(logits, targets, 5, 0.5)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)


@pytest.mark.parametrize("threshold", [0.05, 0.3, 0.5, 0.9, 1.0])
def test_confident_wrong_matches_softmax_and_argmax(threshold):
    """confident_wrong = top-1 probability >= threshold and target != argmax, against a float64 softmax."""
    g = torch.Generator().manual_seed(1)
    B, T, V = 4, 65, 50
    logits = torch.randn(B, T, V, generator=g) * torch.linspace(0.5, 6, B).view(B, 1, 1)  # flat to peaked
    ids = torch.randint(0, V, (B, T), generator=g)
    ids[:, 1::3] = logits[:, :-1:3].argmax(-1)  # a third of the targets are the top-1: never flagged
    p = torch.softmax(logits[:, :-1].double(), -1)
    p1, top = p.max(-1)
    want = (p1 >= threshold) & (top != ids[:, 1:])
    assert not ((p1 - threshold).abs() < 1e-6).any()  # no position within float32 noise of the threshold
    got = token_stats(logits[:, :-1], ids[:, 1:], k=5, confident=threshold)["confident_wrong"]
    assert torch.equal(got, want)
    if threshold == 0.5:
        assert 0 < want.sum() < want.numel()  # both kinds of position occur
    scores, plain = score_logits(logits, ids, 5, confident=threshold), score_logits(logits, ids, 5)
    torch.testing.assert_close(scores["confident_wrong"], want.double().mean(-1).float())
    for c in (c for c in SCORE_COLUMNS if c != "confident_wrong"):  # the threshold changes no other column
        torch.testing.assert_close(scores[c], plain[c], rtol=0, atol=0, equal_nan=True)


def test_confident_wrong_threshold_edges():
    """Exactly at the threshold counts as confident; a tie with the top-1 is not wrong."""
    neg = -1e4  # exp underflows to exactly 0 in fp32: the top-1 probabilities below are exact
    logits = torch.tensor([[[0.0, 0.0, neg], [0.0, 0.0, neg], [0.0, neg, neg], [0.0, neg, neg]]])
    targets = torch.tensor([[2, 1, 1, 0]])  # p1 = .5 wrong, p1 = .5 tied with the target, p1 = 1 wrong, right

    def flags(t):
        return token_stats(logits, targets, k=1, confident=t)["confident_wrong"][0].tolist()

    assert flags(0.5) == [True, False, True, False]
    assert flags(0.5000001) == [False, False, True, False]
    assert flags(1.0) == [False, False, True, False]
    assert flags(0.4999999) == [True, False, True, False]


@pytest.mark.parametrize("value", ["0", "-0.1", "1.5"])
def test_confident_threshold_is_validated(value):
    with pytest.raises(ConfigError, match=rf"confident_threshold: expected in \(0, 1\], got {value}"):
        load_config(ScoreConfig, None, [f"confident_threshold={value}"])


def test_shards_cover_rows_in_whole_batches():
    for n, bs, s in [(100, 16, 3), (7, 4, 5), (64, 8, 1)]:
        ranges = [shard_rows(n, bs, s, i) for i in range(s)]
        assert [r for rng in ranges for r in rng] == list(range(n))
        assert all(rng.start % bs == 0 for rng in ranges)


def _score_args(tiny_data, tiny_slm, out, *extra):
    return [str(REPO / "configs/demo/score.yaml"), f"model={tiny_slm}", f"data={tiny_data}", f"out_dir={out}",
            "batch_size=16", "dtype=fp32", "torch_threads=1", *extra]


def _scores(out):
    import datasets

    return datasets.load_from_disk(str(out / "scores")).to_pandas()


@pytest.fixture(scope="module")
def single(tiny_data, tiny_slm, tmp_path_factory):
    out = tmp_path_factory.mktemp("scores") / "single"
    main(_score_args(tiny_data, tiny_slm, out, "num_shards=1"))
    return out


def test_shard_count_does_not_change_scores(tiny_data, tiny_slm, single, tmp_path):
    main(_score_args(tiny_data, tiny_slm, tmp_path / "s3", "num_shards=3"))
    a, b = _scores(single), _scores(tmp_path / "s3")
    assert a["index"].tolist() == list(range(len(a)))
    assert a.equals(b)


@pytest.mark.slow
def test_two_process_torchrun_gives_the_same_scores(tiny_data, tiny_slm, single, tmp_path):
    out = tmp_path / "ddp"
    res = run_module("torch.distributed.run", ["--nproc_per_node", "2", "-m", "data_tools.score",
                                               *_score_args(tiny_data, tiny_slm, out)])
    assert res.returncode == 0, res.stderr[-3000:]
    assert _scores(out).equals(_scores(single))


@pytest.mark.slow
def test_kill_mid_run_then_relaunch_redoes_only_unfinished_shards(tiny_data, tiny_slm, single, tmp_path):
    out = tmp_path / "killed"
    args = _score_args(tiny_data, tiny_slm, out, "num_shards=3")
    res = run_module("data_tools.score", args, env={FAULT_ENV: "kill_after_shard:0"})
    assert res.returncode == -9, res.stderr[-2000:]
    shards = sorted(p.name for p in (out / "shards").iterdir() if p.name != LOCK)  # the lock a kill leaves
    assert shards == ["shard_00000-of-00003"]  # only the finished shard; no temp dirs
    done_before = (out / "shards" / shards[0] / "DONE").read_text()
    res = run_module("data_tools.score", [*args, "merge_only=true"])
    assert res.returncode == 2 and "2 of 3 shards are not done (missing: [1, 2])" in res.stderr
    res = run_module("data_tools.score", args, env={FAULT_ENV: "kill_after_shard:2"})  # dies after shard 2
    assert res.returncode == -9 and "skipping 1 finished shard(s)" in res.stdout
    assert (out / "shards" / shards[0] / "DONE").read_text() == done_before  # not redone
    res = run_module("data_tools.score", args)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "skipping 3 finished shard(s)" in res.stdout
    assert _scores(out).equals(_scores(single))


@pytest.mark.slow
def test_killed_overwrite_keeps_the_old_scores_and_resumes(tiny_data, tiny_slm, single, tmp_path):
    """overwrite=true replaces finished scores only at the merge: a kill before it leaves the old results whole,
    and the same command then redoes only the unfinished shards."""
    import shutil

    out = tmp_path / "rescored"
    shutil.copytree(single, out)  # finished scores of an earlier run (other settings: one shard, batch 16)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    args = _score_args(tiny_data, tiny_slm, out, "num_shards=3", "overwrite=true")
    res = run_module("data_tools.score", args, env={FAULT_ENV: "kill_after_shard:0"})
    assert res.returncode == -9, res.stderr[-2000:]
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and "shards" not in p.parts} == before
    res = run_module("data_tools.score", [*args[:-1]])  # without overwrite: the old merge is still complete
    assert res.returncode == 2 and "already holds merged scores; set overwrite=true" in res.stderr
    res = run_module("data_tools.score", args)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "skipping 1 finished shard(s)" in res.stdout and not (out / "shards").exists()
    assert _scores(out).equals(_scores(single))


def test_top_k_cache_matches_a_direct_forward(tiny_data, tiny_slm, tmp_path):
    from transformers import AutoModelForCausalLM

    from slm_assist.core.dataset import load_split

    out = tmp_path / "topk"
    sel = tmp_path / "sel.npy"
    np.save(sel, np.array([1, 5, 6, 17]))
    main(_score_args(tiny_data, tiny_slm, out, "num_shards=2", "cache.mode=top_k", "cache.k=5", f"cache.indices={sel}"))
    cache = SoftLabelCache(out / "cache")
    assert len(cache) == 4 and cache.mode == "top_k" and cache.record is TopKLabels
    got = cache.get([17, 5])
    stored = cache.read([17, 5])  # what a prefetching stream copies to the device: the stored dtypes
    assert isinstance(stored, TopKLabels) and isinstance(got, TopKLabels)
    assert (stored.ids.dtype, stored.logprobs.dtype, stored.tail.dtype) == (torch.int32, torch.float16, torch.float32)
    assert (got.ids.dtype, got.logprobs.dtype, got.tail.dtype) == (torch.int64, torch.float32, torch.float32)
    assert torch.equal(stored.ids.long(), got.ids) and stored.tail.shape == (2, 31)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_slm)).eval()
    ids = torch.from_numpy(np.asarray(load_split(tiny_data, "train")[[17, 5]]["input_ids"], dtype=np.int64))
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1)
    top, top_ids = logp.topk(5, -1)
    assert torch.equal(got.ids, top_ids)
    torch.testing.assert_close(got.logprobs, top, atol=2e-3, rtol=2e-3)  # stored in fp16
    torch.testing.assert_close(got.tail, 1 - top.exp().sum(-1), atol=1e-5, rtol=1e-5)
    with pytest.raises(UserError, match="sequence 2 is not in the soft-label cache"):
        cache.get([2])


def test_top_k_with_full_vocab_has_no_tail(tiny_data, tiny_slm, tmp_path):
    np.save(tmp_path / "sel.npy", np.array([0, 3]))
    main(_score_args(tiny_data, tiny_slm, tmp_path / "full", "cache.mode=top_k", "cache.k=400",
                     f"cache.indices={tmp_path / 'sel.npy'}"))
    got = SoftLabelCache(tmp_path / "full" / "cache").get([0, 3])
    assert got.width == 400
    assert got.tail.abs().max() < 1e-4
    torch.testing.assert_close(got.logprobs.exp().sum(-1), torch.ones(got.tail.shape), atol=3e-3, rtol=0)


def test_sampled_estimator_is_unbiased():
    torch.manual_seed(0)
    logits = torch.randn(2, 9) * 1.5
    p = torch.softmax(logits, -1)
    est = torch.zeros_like(p)
    draws = 4000
    for i in range(draws):
        out = sampled_labels(logits, 4, sequence_generator(0, i))
        ids = out.ids.long()
        est.scatter_add_(-1, ids, torch.full(ids.shape, 1.0 / 4))
    est /= draws
    torch.testing.assert_close(est, p, atol=0.01, rtol=0)
    assert isinstance(out, SampledLabels) and (out.ids.dtype, out.logprobs.dtype) == (torch.int32, torch.float16)
    lp = out.logprobs.float()
    torch.testing.assert_close(lp, torch.log(p).gather(-1, ids), atol=2e-3, rtol=0)


def test_sampled_cache_round_trip(tiny_data, tiny_slm, tmp_path):
    out = tmp_path / "sampled"
    np.save(tmp_path / "sel.npy", np.arange(0, 200, 2))
    sel = f"cache.indices={tmp_path / 'sel.npy'}"
    main(_score_args(tiny_data, tiny_slm, out, "cache.mode=sampled", "cache.samples=6", sel))
    got = SoftLabelCache(out / "cache").get([0, 2])
    assert isinstance(got, SampledLabels) and got.ids.shape == (2, 31, 6)
    assert torch.allclose(got.weights.sum(-1), torch.ones(2, 31))
    # the draws depend on (seed, sequence) only: a 3-shard run stores the same ones
    main(_score_args(tiny_data, tiny_slm, tmp_path / "s3", "cache.mode=sampled", "cache.samples=6", "num_shards=3", sel))
    assert torch.equal(SoftLabelCache(tmp_path / "s3" / "cache").get([0, 2]).ids, got.ids)


def test_tokenizer_mismatch_names_both_sides(tiny_data, slm_other_tokenizer, tmp_path):
    with pytest.raises(UserError, match=r"model=.*other: tokenizer fingerprint \w+ differs from the data's \w+"):
        main(_score_args(tiny_data, slm_other_tokenizer, tmp_path / "o"))


def test_refuses_to_overwrite_merged_scores(tiny_data, tiny_slm, single):
    with pytest.raises(UserError, match="already holds merged scores; set overwrite=true"):
        main(_score_args(tiny_data, tiny_slm, single, "num_shards=1"))


def test_reference_model_adds_ref_mean_loss(tiny_data, tiny_slm, single, tmp_path):
    """With the SLM as its own reference, ref_mean_loss equals mean_loss (difference selection then keeps ties)."""
    out = tmp_path / "ref"
    main(_score_args(tiny_data, tiny_slm, out, "num_shards=2", f"ref_model={tiny_slm}"))
    df = _scores(out)
    assert (df["ref_mean_loss"] == df["mean_loss"]).all()
    assert df.drop(columns="ref_mean_loss").equals(_scores(single))
    import json

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["ref_model_fingerprint"] == manifest["model_fingerprint"] and manifest["topk"] == 10
    assert manifest["confident_threshold"] == 0.5 and "confident_wrong" in manifest["columns"]


def test_bad_model_dir_and_cache_index(tiny_data, tiny_slm, tmp_path):
    with pytest.raises(UserError, match=r"model=.*nope: not a save_pretrained model directory"):
        main(_score_args(tiny_data, tmp_path / "nope", tmp_path / "a"))
    np.save(tmp_path / "bad.npy", np.array([0, 10**9]))
    with pytest.raises(UserError, match=r"cache\.indices=.*bad\.npy: expected a 1-D array of sequence indices"):
        main(_score_args(tiny_data, tiny_slm, tmp_path / "b", "cache.mode=top_k", f"cache.indices={tmp_path / 'bad.npy'}"))


def test_logit_chunks_equal_the_models_logits():
    """Scoring runs the output head a chunk of sequences at a time from one trunk pass: the same logits."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from data_tools.score import logit_chunks

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2)).eval()
    ids = torch.randint(0, 97, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        chunks = list(logit_chunks(model, ids))
        want = model(input_ids=ids).logits
    assert [c[0] for c in chunks] == [slice(0, 3)]  # a small batch: one head matmul
    torch.testing.assert_close(torch.cat([c[1] for c in chunks]), want, rtol=1e-5, atol=1e-5)
    big = LlamaForCausalLM(LlamaConfig(vocab_size=2**20, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                       num_attention_heads=1, num_key_value_heads=1)).eval()  # 256 MiB per 64 tokens
    with torch.inference_mode():
        rows = [r for r, _ in logit_chunks(big, torch.randint(0, 97, (3, 64)))]
    assert rows == [slice(0, 1), slice(1, 2), slice(2, 3)]  # then one sequence at a time
    model.config.final_logit_softcapping = 30.0  # logits are more than the head: the model runs whole
    with torch.inference_mode():
        (rows, whole), = logit_chunks(model, ids)
    assert rows == slice(None) and whole.shape == want.shape


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


@pytest.mark.parametrize("damage", ["scores arrow", "DONE marker"])
def test_a_damaged_shard_is_scored_again(tiny_data, tiny_slm, single, tmp_path, capsys, damage):
    """A finished shard whose files do not read back (cut short) is not done: merge_only names it, and a plain
    run scores it again (it is ours, made the same way from checked inputs) and says so."""
    out = tmp_path / "damaged"
    args = _score_args(tiny_data, tiny_slm, out, "num_shards=2")
    main([*args, "shard=0"])
    main([*args, "shard=1"])
    shard = out / "shards" / "shard_00001-of-00002"
    victim = next((shard / "scores").glob("data-*.arrow")) if damage == "scores arrow" else shard / "DONE"
    _truncate(victim)
    with pytest.raises(UserError, match=rf"{re.escape(str(out))}: cannot merge, 1 of 2 shards are not done "
                                        rf"\(missing: \[1\]\); shard 1 is damaged: .*{victim.name}.*; score them "
                                        r"first \(shard=i\)"):
        main([*args, "merge_only=true"])
    capsys.readouterr()
    main(args)
    printed = capsys.readouterr().out
    assert f"{shard}: damaged, " in printed and "scoring it again" in printed, printed
    assert "skipping 1 finished shard(s)" in printed
    assert _scores(out).equals(_scores(single))


def test_a_damaged_soft_label_cache_is_named(tiny_data, tiny_slm, tmp_path):
    out = tmp_path / "cached"
    np.save(tmp_path / "sel.npy", np.array([1, 5]))
    main(_score_args(tiny_data, tiny_slm, out, "cache.mode=top_k", "cache.k=4", f"cache.indices={tmp_path / 'sel.npy'}"))
    arrow = next((out / "cache").glob("data-*.arrow"))
    _truncate(arrow)
    with pytest.raises(UserError, match=rf"soft-label cache {re.escape(str(out / 'cache'))}: {re.escape(str(arrow))} "
                                        r"is damaged and cannot be read \(.*\); score the data again with the cache"):
        SoftLabelCache(out / "cache")


def test_shards_of_another_scoring_run_say_what_differs(tiny_data, tiny_slm, tmp_path):
    """Two plain runs on one out_dir with other settings (the first stopped before its merge): the second is told
    that out_dir holds another run's shards, what differs, and what to do; nothing about shard=."""
    import json
    import shutil

    out = tmp_path / "two"
    other = tmp_path / "other_slm"  # the same weights under another config file: another model fingerprint
    shutil.copytree(tiny_slm, other)
    (other / "config.json").write_text(json.dumps(json.loads((tiny_slm / "config.json").read_text()), indent=1))
    main(_score_args(tiny_data, tiny_slm, out, "num_shards=1", "shard=0"))  # what a run killed before its merge leaves
    with pytest.raises(UserError) as e:
        main(_score_args(tiny_data, tiny_slm, out, "num_shards=1", "topk=5", "confident_threshold=0.3"))
    assert str(e.value) == (f"out_dir={out} holds finished shards of another scoring run that was not merged "
                            "(confident_threshold: 0.5 there, 0.3 here; topk: 10 there, 5 here); set overwrite=true "
                            "to score again over them, or choose another out_dir")
    with pytest.raises(UserError, match=rf"\(model: '{re.escape(str(tiny_slm))}' there, '{re.escape(str(other))}' "
                                        r"here; model_fingerprint: '\w+' there, '\w+' here\)"):
        main(_score_args(tiny_data, other, out, "num_shards=1"))
    main(_score_args(tiny_data, other, out, "num_shards=1", "overwrite=true"))
    assert json.loads((out / "manifest.json").read_text())["model"] == str(other)


def test_a_second_process_on_the_same_out_dir_is_refused(tiny_data, tiny_slm, single, tmp_path):
    """While one plain process scores into out_dir, another is refused, naming the first; `shard=` jobs share the
    lock with each other, not with a whole run. The lock goes when its holders do."""
    from data_tools.score_output import out_dir_lock

    out = tmp_path / "busy"
    busy = rf"out_dir={re.escape(str(out))} is being written by another data_tools.score process \(pid {os.getpid()} on "
    with out_dir_lock(out, exclusive=True):  # as a running `python -m data_tools.score` holds it
        with pytest.raises(UserError, match=busy):
            main(_score_args(tiny_data, tiny_slm, out, "num_shards=2"))
        with pytest.raises(UserError, match=busy):
            main(_score_args(tiny_data, tiny_slm, out, "num_shards=2", "shard=1"))
    assert not out.exists()  # made for the lock alone, and removed with it
    with out_dir_lock(out, exclusive=False):  # a shard job is running
        main(_score_args(tiny_data, tiny_slm, out, "num_shards=2", "shard=0"))  # another shard job: fine
        with pytest.raises(UserError, match=busy):
            main(_score_args(tiny_data, tiny_slm, out, "num_shards=2"))
    main(_score_args(tiny_data, tiny_slm, out, "num_shards=2"))
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "scores"]
    assert _scores(out).equals(_scores(single))


def test_links_in_out_dir_are_never_followed_out_of_it(tiny_data, tiny_slm, single, tmp_path):
    """out_dir/cache and out_dir/shards are links to the user's own folders: scoring replaces, and drops, only our
    entries there; the user's files and the links stay."""
    from slm_assist.core.dataset import PackedDataset
    from slm_assist.core.scores import ScoresDir

    out, cache_disk, shard_disk = tmp_path / "linked", tmp_path / "big_disk", tmp_path / "scratch"
    for d in (out, cache_disk, shard_disk):
        d.mkdir()
    (cache_disk / "notes.txt").write_text("mine\n")
    (shard_disk / "keep.txt").write_text("also mine\n")
    (out / "cache").symlink_to(cache_disk)
    (out / "shards").symlink_to(shard_disk)
    np.save(tmp_path / "sel.npy", np.array([1, 5, 6]))
    cached = ["cache.mode=top_k", "cache.k=4", f"cache.indices={tmp_path / 'sel.npy'}"]
    for extra in ([], ["overwrite=true"]):  # written, then replaced, through the link
        main(_score_args(tiny_data, tiny_slm, out, *cached, *extra))
        assert (out / "cache").is_symlink() and (out / "shards").is_symlink()
        assert len(SoftLabelCache(out / "cache")) == 3
        assert (cache_disk / "notes.txt").read_text() == "mine\n"
        assert sorted(p.name for p in shard_disk.iterdir()) == ["keep.txt"]
    main(_score_args(tiny_data, tiny_slm, out, "overwrite=true"))  # no cache now: the old one is dropped
    assert (out / "cache").is_symlink() and (out / "shards").is_symlink()
    assert sorted(p.name for p in cache_disk.iterdir()) == ["notes.txt"]
    assert (cache_disk / "notes.txt").read_text() == "mine\n"
    assert sorted(p.name for p in shard_disk.iterdir()) == ["keep.txt"]
    assert _scores(out).equals(_scores(single))
    with pytest.raises(UserError, match="no finished data_tools.score output with a cache/"):
        ScoresDir.open(out, "distill.source.caches[0]").soft_labels(PackedDataset.open(tiny_data))
