"""SALT objective in the trainer: teacher checks before any step, the loss mix and the KD phase."""

from __future__ import annotations

import threading

import pytest

from slm_assist.core.errors import ConfigError, UserError
from slm_assist.core.run_dir import read_metrics
from slm_assist.kd.sources import CachedSoftLabels
from slm_assist.train import main

from .conftest import run_overrides

pytestmark = pytest.mark.slow


def test_salt_run_mixes_ce_and_kd_then_hands_over(tiny_data, tiny_slm, tmp_path):
    run = tmp_path / "salt"
    main(run_overrides(tiny_data, run, "train.max_steps=6", "checkpoint.every=0", "model.pad_vocab_to=64",
                       "distill.source.kind=teacher", f"distill.source.teachers=[{tiny_slm}]", "distill.schedule.kind=step", "distill.schedule.weight=0.6",
                       "distill.schedule.n_kd_steps=3", "distill.loss.chunk_tokens=16"))
    recs = read_metrics(run)
    assert [r["w_t"] for r in recs] == [0.6, 0.6, 0.6, 0.0, 0.0, 0.0]
    assert [r["kd_phase"] for r in recs] == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    for r in recs[:3]:
        assert r["kd"] > 0
        assert r["loss"] == pytest.approx(0.4 * r["ce"] + 0.6 * r["kd"], rel=1e-5)
    for r in recs[3:]:
        assert "kd" not in r and r["loss"] == pytest.approx(r["ce"], rel=1e-6)


def test_label_smoothing_control_mixes_ce_and_smoothed_ce(tiny_data, tmp_path):
    """No teacher: (1-w)·CE + w·CE(one-hot smoothed by eps), on the same schedule as SALT."""
    run = tmp_path / "ls"
    main(run_overrides(tiny_data, run, "train.max_steps=4", "checkpoint.every=0", "distill.source.kind=label_smoothing",
                       "distill.source.epsilon=0.3",
                       "distill.schedule.kind=step", "distill.schedule.weight=0.5", "distill.schedule.n_kd_steps=2"))
    recs = read_metrics(run)
    assert [r["w_t"] for r in recs] == [0.5, 0.5, 0.0, 0.0]
    for r in recs[:2]:
        assert r["loss"] == pytest.approx(0.5 * r["ce"] + 0.5 * r["kd"], rel=1e-5)
    assert "kd" not in recs[2] and recs[2]["loss"] == pytest.approx(recs[2]["ce"], rel=1e-6)
    with pytest.raises(ConfigError, match=r"distill\.source\.teachers=\['x'\] has no effect with kind=label_smoothing"):
        main(run_overrides(tiny_data, tmp_path / "bad", "distill.source.kind=label_smoothing", "distill.source.epsilon=0.3",
                           "distill.source.teachers=[x]"))


def test_teacher_with_another_tokenizer_fails_before_any_step(tiny_data, slm_other_tokenizer, tmp_path):
    other = slm_other_tokenizer
    run = tmp_path / "r"
    with pytest.raises(UserError, match=r"distill\.source\.teachers\[0\]=.*other: tokenizer fingerprint \w+ differs from the data's"):
        main(run_overrides(tiny_data, run, "train.max_steps=2", "distill.source.kind=teacher", f"distill.source.teachers=[{other}]"))
    assert not (run / "metrics.jsonl").exists()  # no step ran


def test_padded_vocab_sizes_may_differ(tiny_data, tiny_slm, tmp_path):
    """Teacher 400 rows (unpadded), student padded to 448: only the 400 real tokens are compared."""
    run = tmp_path / "pad"
    main(run_overrides(tiny_data, run, "train.max_steps=2", "checkpoint.every=0", "model.pad_vocab_to=64",
                       "distill.source.kind=teacher", f"distill.source.teachers=[{tiny_slm}]", "distill.schedule.kind=constant"))
    assert all(r["kd"] > 0 for r in read_metrics(run))


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """A student trained for 12 steps: better than the random-init tiny_slm on validation data."""
    run = tmp_path_factory.mktemp("runs") / "trained"
    main(run_overrides(tiny_data, run, "train.max_steps=12", "checkpoint.every=0", "optim.lr=0.01"))
    return run / "final"


@pytest.fixture(scope="module")
def trained_fp32(trained, tmp_path_factory):
    """`trained` (exported in bf16) saved in fp32: a teacher far from uniform, unlike the random-init tiny_slm,
    that runs in fp32 online as the fp32 scorer runs it for a cache. KD comparisons then compare fp32 paths on
    well-conditioned values: between two almost uniform models the KD is ~0.01, a difference of log-probs ~-6
    whose rounding (fp32, or fp16 in a cache, rounded alike for values that close) is a sizeable part of it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("runs") / "trained_fp32"
    AutoModelForCausalLM.from_pretrained(str(trained), dtype=torch.float32).save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(trained)).save_pretrained(str(out))
    return out


def test_token_gating_matches_its_definition(tiny_data, tiny_slm, trained):
    import numpy as np
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from slm_assist.core.config import load_config
    from slm_assist.core.dataset import load_split
    from slm_assist.kd.sources import OnlineTeacher
    from slm_assist.salt.objective import DistillConfig, SALTObjective
    from slm_assist.training.batches import Batch

    student = AutoModelForCausalLM.from_pretrained(str(trained))
    teacher = AutoModelForCausalLM.from_pretrained(str(tiny_slm)).eval()
    ids = torch.from_numpy(np.asarray(load_split(tiny_data, "train")[:3]["input_ids"], dtype=np.int64))
    w = 0.6

    def objective(*overrides):
        cfg = load_config(DistillConfig, None, ["source.kind=teacher", f"source.teachers=[{tiny_slm}]",
                                                "schedule.kind=constant", f"schedule.weight={w}", *overrides])
        return SALTObjective(cfg, OnlineTeacher(teacher, cfg.gate.topk), 400, total_steps=10)

    with torch.no_grad():
        logits = student(input_ids=ids).logits[:, :-1].reshape(-1, 400).float()
        t = teacher(input_ids=ids).logits[:, :-1].reshape(-1, 400).float()
        y = ids[:, 1:].reshape(-1)
        ce = F.cross_entropy(logits, y, reduction="none")
        kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1)
        for k in (1, 5):
            g = (t.gather(-1, y[:, None]).squeeze(-1) >= t.topk(k, -1).values[:, -1]).float()
            want = ((1 - w * g) * ce + w * g * kl).mean()
            got, metrics = objective(f"gate.topk={k}")(student, Batch(ids), 0)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            assert metrics["gate_frac"].item() == pytest.approx(g.mean().item())
            assert 0 < g.mean() < 1
        full, _ = objective("gate.topk=400")(student, Batch(ids), 0)
        off, _ = objective()(student, Batch(ids), 0)
        torch.testing.assert_close(full, off)


def test_auto_handover_fires_when_the_student_is_better(tiny_data, tiny_slm, trained, tmp_path, capsys):
    run = tmp_path / "fires"
    main(run_overrides(tiny_data, run, "train.max_steps=4", "checkpoint.every=0", f"model.pretrained={trained}",
                       "distill.source.kind=teacher", f"distill.source.teachers=[{tiny_slm}]", "distill.handover.every=2", "distill.schedule.n_kd_steps=4"))
    recs = read_metrics(run)
    assert [r["w_t"] for r in recs] == [0.0] * 4 and all(r["handover_step"] == 0 for r in recs)
    assert "auto handover at step 0" in capsys.readouterr().out


def test_auto_handover_stays_off_when_the_teacher_is_better(tiny_data, trained, tmp_path):
    run = tmp_path / "off"
    main(run_overrides(tiny_data, run, "train.max_steps=4", "checkpoint.every=0", "distill.source.kind=teacher", f"distill.source.teachers=[{trained}]",
                       "distill.handover.every=2", "distill.schedule.n_kd_steps=4", "distill.schedule.weight=0.5"))
    recs = read_metrics(run)
    assert [r["w_t"] for r in recs] == [0.5] * 4 and not any("handover_step" in r for r in recs)


def test_resume_inside_the_kd_phase_is_bit_exact(tiny_data, tiny_slm, tmp_path):
    import torch
    from safetensors.torch import load_file

    from slm_assist.core.faults import FAULT_ENV

    from .conftest import run_module

    common = ("train.max_steps=8", "checkpoint.every=3", "distill.source.kind=teacher", f"distill.source.teachers=[{tiny_slm}]",
              "distill.schedule.n_kd_steps=5", "distill.gate.topk=20")
    main(run_overrides(tiny_data, tmp_path / "A", *common))
    args = run_overrides(tiny_data, tmp_path / "B", *common)
    killed = run_module("slm_assist.train", args, env={FAULT_ENV: "kill_after_checkpoint:3"})  # inside KD phase
    assert killed.returncode == -9, killed.stderr[-2000:]
    main(args)
    a, b = (load_file(str(tmp_path / r / "final" / "model.safetensors")) for r in ("A", "B"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    keys = ("step", "loss", "ce", "kd", "w_t", "kd_phase", "gate_frac")
    assert [{k: r.get(k) for k in keys} for r in read_metrics(tmp_path / "B")] == \
        [{k: r.get(k) for k in keys} for r in read_metrics(tmp_path / "A")]


def test_kd_phase_draws_from_the_selection_then_the_full_split(tiny_data, tiny_slm, tmp_path):
    import numpy as np

    from slm_assist.core.config import load_config, split_argv
    from slm_assist.salt.recipe import RunConfig, build_trainer

    sel = tmp_path / "index.npy"
    np.save(sel, np.arange(100, 132))  # 32 selected sequences
    path, overrides = split_argv(run_overrides(
        tiny_data, tmp_path / "sel", "train.max_steps=5", "checkpoint.every=0", "distill.source.kind=teacher", f"distill.source.teachers=[{tiny_slm}]",
        "distill.schedule.n_kd_steps=3", f"distill.data.selection={sel}"), "")
    trainer = build_trainer(load_config(RunConfig, path, overrides))
    seen: list[str] = []
    for name, stream in trainer.streams.items():
        original = stream.next

        def spy(original=original, name=name):
            seen.append(name)
            return original()
        stream.next = spy
    trainer.fit()
    assert seen == ["kd", "kd", "kd", "main", "main"]
    assert trainer.streams["kd"].cursor == 3 * 4 and trainer.streams["main"].cursor == 2 * 4
    with pytest.raises(UserError, match=r"distill\.data\.selection=.*bad\.npy: expected a 1-D array"):
        np.save(tmp_path / "bad.npy", np.array([[1, 2]]))
        main(run_overrides(tiny_data, tmp_path / "x", "train.max_steps=1", "distill.source.kind=teacher", f"distill.source.teachers=[{tiny_slm}]",
                           f"distill.data.selection={tmp_path / 'bad.npy'}"))


def test_zero3_student_with_teacher_on_two_processes(tiny_data, tiny_slm, tmp_path):
    from .conftest import run_module

    run = tmp_path / "z3"
    args = run_overrides(tiny_data, run, "train.max_steps=12", "checkpoint.every=6", "train.zero_stage=3",
                         "optim.lr=0.01", "train.micro_batch_size=2", "distill.source.kind=teacher", f"distill.source.teachers=[{tiny_slm}]",
                         "distill.schedule.n_kd_steps=6", "distill.gate.topk=50")
    res = run_module("torch.distributed.run", ["--nproc_per_node", "2", "-m", "slm_assist.train", *args])
    assert res.returncode == 0, res.stderr[-3000:]
    recs = read_metrics(run)
    assert [r["kd_phase"] for r in recs] == [1.0] * 6 + [0.0] * 6
    assert recs[5]["ce"] < recs[0]["ce"] - 0.3 and recs[-1]["ce"] < recs[5]["ce"]
    assert all(r["kd"] > 0 for r in recs[:6])


def test_cached_top_k_with_full_vocab_matches_online_kd(tiny_data, trained_fp32, tmp_path, monkeypatch):
    """KD from a top-k cache with k = vocabulary trains like the online teacher (fp16 log-probs aside); with the
    labels read ahead with their batches (the stream's prefetch thread, as on a GPU) it trains bit for bit the
    same as with the labels read at the step."""
    from data_tools.score import main as score_main

    from .conftest import REPO

    # a teacher far from uniform (KD ~1): with tiny_slm (KD ~0.01) the fp16 rounding of the cached log-probs moved
    # the KD by ~2e-5, all of the 2e-3 relative tolerance
    teacher = trained_fp32
    scores = tmp_path / "scores"
    score_main([str(REPO / "configs/demo/score.yaml"), f"model={teacher}", f"data={tiny_data}", f"out_dir={scores}",
                "batch_size=16", "dtype=fp32", "cache.mode=top_k", "cache.k=400", "torch_threads=1"])
    common = ("train.max_steps=3", "checkpoint.every=0", "train.dtype=fp32", "distill.schedule.kind=constant",
              "distill.gate.topk=10", "seed=1")  # seed 1: a student that differs from the teacher
    main(run_overrides(tiny_data, tmp_path / "online", *common, "distill.source.kind=teacher", f"distill.source.teachers=[{teacher}]"))
    main(run_overrides(tiny_data, tmp_path / "cached", *common, "distill.source.kind=cache", f"distill.source.caches=[{scores}]"))
    online, cached = read_metrics(tmp_path / "online"), read_metrics(tmp_path / "cached")
    for a, b in zip(online, cached):
        assert a["kd"] > 0.2 and b["kd"] == pytest.approx(a["kd"], rel=2e-3)
        assert b["gate_frac"] == a["gate_frac"]
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-3)
    monkeypatch.setattr("slm_assist.training.batches.PREFETCH", True)
    threads = []
    read = CachedSoftLabels.attach
    monkeypatch.setattr(CachedSoftLabels, "attach",
                        lambda self, b: threads.append(threading.current_thread().name) or read(self, b))
    main(run_overrides(tiny_data, tmp_path / "ahead", *common, "distill.source.kind=cache", f"distill.source.caches=[{scores}]"))
    # the first batch is read at the first step; the rest (and one past the end) in the stream's thread
    assert threads[0] == threading.main_thread().name and len(threads) >= 3
    assert all(t.startswith("batches") for t in threads[1:])
    keys = ("step", "loss", "ce", "kd", "gate_frac")
    assert [[r[k] for k in keys] for r in read_metrics(tmp_path / "ahead")] == [[r[k] for k in keys] for r in cached]
    # a KD phase of 1 step in 6: the stream stops attaching labels once the phase is over (a read or two late at
    # most), and the run is the same as without read-ahead
    threads.clear()
    short = ("train.max_steps=6", "checkpoint.every=0", "train.dtype=fp32", "distill.schedule.kind=step",
             "distill.schedule.n_kd_steps=1", "seed=1", "train.log_every=1", "distill.source.kind=cache", f"distill.source.caches=[{scores}]")
    main(run_overrides(tiny_data, tmp_path / "short_ahead", *short))
    assert 1 <= len(threads) <= 4  # of 7 reads
    monkeypatch.setattr("slm_assist.training.batches.PREFETCH", False)
    main(run_overrides(tiny_data, tmp_path / "short", *short))
    keys = ("step", "loss", "ce")
    assert [[r.get(k) for k in keys] for r in read_metrics(tmp_path / "short_ahead")] == \
        [[r.get(k) for k in keys] for r in read_metrics(tmp_path / "short")]


def test_cache_for_other_data_is_refused(tiny_data, tiny_slm, tmp_path):
    import json

    scores = tmp_path / "scores"
    (scores / "cache").mkdir(parents=True)
    (scores / "scores").mkdir()
    (scores / "manifest.json").write_text(json.dumps({"model_fingerprint": "0" * 16, "dataset_fingerprint": "0" * 16,
                                                      "split": "train"}))
    with pytest.raises(UserError, match=r"distill\.source\.caches\[0\]=.*scored for dataset 0+ split 'train', but this run"):
        main(run_overrides(tiny_data, tmp_path / "r", "train.max_steps=1", "distill.source.kind=cache", f"distill.source.caches=[{scores}]"))


def test_levers_online_ensemble_matches_cached_ensemble(tiny_data, tiny_slm, trained_fp32, tmp_path):
    """Every issue-13 lever on at once: a voted two-SLM ensemble with confidence gating, an easy-to-hard curriculum
    and the z-loss. From full-vocabulary top-k caches it trains like the online teachers (fp16 log-probs aside)."""
    from data_tools.score import main as score_main
    from slm_assist.core.config import load_config, split_argv
    from slm_assist.salt.recipe import RunConfig, build_trainer

    from .conftest import REPO

    # member b in fp32 (scored in fp32 for its cache): a bf16 teacher online would differ from its cache by bf16
    # rounding, ties included (top-1 votes, gates), not only by the fp16 log-probs
    scores = {}
    for name, model in (("a", tiny_slm), ("b", trained_fp32)):
        scores[name] = tmp_path / f"scores_{name}"
        score_main([str(REPO / "configs/demo/score.yaml"), f"model={model}", f"data={tiny_data}",
                    f"out_dir={scores[name]}", "batch_size=16", "dtype=fp32", "cache.mode=top_k", "cache.k=400",
                    "torch_threads=1"])
    common = ("train.max_steps=3", "checkpoint.every=0", "train.dtype=fp32", "distill.schedule.kind=step",
              "distill.schedule.n_kd_steps=2", "distill.source.combine=vote", "distill.gate.confidence=0.02",
              "distill.data.curriculum=mean_loss", f"distill.data.curriculum_scores={scores['a']}", "train.z_loss=1e-3",
              "seed=1")
    online = run_overrides(tiny_data, tmp_path / "online", *common, "distill.source.kind=teacher",
                           f"distill.source.teachers=[{tiny_slm}, {trained_fp32}]")
    path, overrides = split_argv(online, "")
    trainer = build_trainer(load_config(RunConfig, path, overrides))
    assert trainer.streams["main"].ordered_until == 2 * 4  # n_KD steps x micro-batch
    stream = trainer.streams["main"]
    first, second, third = (stream.next().index for _ in range(3))
    loss = stream.order_key
    assert loss[first].max() <= loss[second].min()  # the KD phase's sequences, easy to hard
    assert loss[third].min() < loss[second].max()  # then shuffled (seed 1 makes this hold)
    main(online)
    main(run_overrides(tiny_data, tmp_path / "cached", *common, "distill.source.kind=cache",
                       f"distill.source.caches=[{scores['a']}, {scores['b']}]"))
    a, b = read_metrics(tmp_path / "online"), read_metrics(tmp_path / "cached")
    for x, y in zip(a, b):
        assert x["z"] > 0 and y["z"] == pytest.approx(x["z"], rel=1e-3)
        assert y["loss"] == pytest.approx(x["loss"], rel=2e-3)
    for x, y in zip(a[:2], b[:2]):
        assert 0 < x["gate_frac"] < 1 and y["gate_frac"] == x["gate_frac"]
        assert x["kd"] > 0.1 and y["kd"] == pytest.approx(x["kd"], rel=2e-3)


def test_fused_linear_kd_trains_like_the_materialised_loss(tiny_data, trained_fp32, tmp_path):
    """distill.loss.fused_linear computes the KD phase's loss from hidden states, chunk by chunk: the same losses, gate
    and z-loss as the path through full logits (fp32), and the same weights after the run."""
    import torch
    from safetensors.torch import load_file

    # a teacher far from uniform: KD ~1, not ~0.01 (tiny_slm), so rel=1e-4 is far above the fp32 rounding
    common = ("train.max_steps=3", "checkpoint.every=0", "train.dtype=fp32", "distill.schedule.kind=step",
              "distill.schedule.n_kd_steps=2", "distill.gate.topk=10", "distill.loss.chunk_tokens=16",
              "train.z_loss=1e-3", "seed=1", "distill.source.kind=teacher", f"distill.source.teachers=[{trained_fp32}]", "model.pad_vocab_to=64")
    main(run_overrides(tiny_data, tmp_path / "plain", *common))
    main(run_overrides(tiny_data, tmp_path / "fused", *common, "distill.loss.fused_linear=true"))
    plain, fused = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "fused")
    for a, b in zip(plain, fused):
        for k in ("loss", "ce", "kd", "z", "gate_frac"):
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (a["step"], k)
    assert plain[0]["kd"] > 0.2 and 0 < plain[0]["gate_frac"] < 1
    wa, wb = (load_file(str(tmp_path / r / "final" / "model.safetensors")) for r in ("plain", "fused"))
    # Adam divides by the gradient's RMS, so rounding-level gradient differences reach the weights at ~1e-5
    assert all(torch.allclose(wa[k], wb[k], rtol=1e-4, atol=5e-5) for k in wa)
    with pytest.raises(UserError, match="fused_linear.*ZeRO-3"):
        main(run_overrides(tiny_data, tmp_path / "z3", *common, "distill.loss.fused_linear=true", "train.zero_stage=3"))
    with pytest.raises(ConfigError, match="fused_linear"):
        main(run_overrides(tiny_data, tmp_path / "c", "distill.source.kind=cache", "distill.source.caches=[x]",
                           "distill.loss.fused_linear=true"))
