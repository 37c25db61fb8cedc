"""bench/gpu/verify.py is fail-soft: each stage lands in the JSONL and the JSON as it ends, a failing stage is
recorded and the next one still runs, and --resume reruns only what failed."""

from __future__ import annotations

import json
import sys

import pytest

from .conftest import load_bench


def test_stages_are_recorded_one_by_one_and_failures_do_not_stop_the_run(tmp_path, monkeypatch):
    verify = load_bench("gpu/verify")
    calls = []

    def good(c):
        calls.append("good")
        return {"mfu": 0.5, "detail": 1}

    def bad(c):
        calls.append("bad")
        raise RuntimeError("out of memory")

    def late(c):
        calls.append("late")
        return {"kd_step_ratio_online": 1.1}

    monkeypatch.setattr(verify, "STAGES", {"good": good, "bad": bad, "late": late})
    out = tmp_path / "gpu.json"
    argv = ["verify.py", "--tiny", "--out", str(out), "--work", str(tmp_path / "w")]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit, match=r"stages failed: \['bad'\]"):
        verify.main()
    assert calls == ["good", "bad", "late"]
    lines = [json.loads(x) for x in (tmp_path / "gpu.jsonl").read_text().splitlines()]
    assert [(x["stage"], x["ok"]) for x in lines] == [("good", True), ("bad", False), ("late", True)]
    res = json.loads(out.read_text())
    assert set(verify.KEYS) <= set(res) and res["mfu"] == 0.5 and res["kd_step_ratio_online"] == 1.1
    assert res["trainer_vs_plain_1b"] is None and "out of memory" in res["stages"]["bad"]["error"]

    monkeypatch.setattr(verify, "STAGES", {"good": good, "bad": lambda c: calls.append("fixed") or {}, "late": late})
    monkeypatch.setattr(sys, "argv", [*argv, "--resume"])
    verify.main()  # only the failed stage runs again, and nothing fails now
    assert calls[3:] == ["fixed"] and "error" not in json.loads(out.read_text())["stages"]["bad"]


def test_profile_splits_time_by_kind():
    import torch

    tt = load_bench("trainer_throughput")
    a = torch.randn(256, 256)

    def step():
        (a @ a).relu_().sum()

    res = tt.profile(step, 2, torch.device("cpu"))
    assert set(res["share"]) == {"gemm", "attention", "optimizer", "other"}
    assert sum(res["share"].values()) == pytest.approx(1.0, abs=1e-3)
    assert res["share"]["gemm"] > 0 and res["share"]["other"] > 0 and res["top"]


def test_ce_path_stage_runs_the_same_loss_every_way(tmp_path):
    """The ce_path stage's loss paths compute the same CE (the fused-linear pass at w_t = 0 is CE), so its timings
    compare like with like; on CPU Liger is left out (it needs CUDA)."""
    verify = load_bench("gpu/verify")
    res = verify.stage_ce_path(verify.Ctx(True, tmp_path))
    assert res["paths"] == ["materialised", "fused_linear"]
    for vocab in ("vocab_2000", "vocab_8000"):
        row = res[vocab]
        assert row["fused_linear"]["loss"] == pytest.approx(row["materialised"]["loss"], rel=1e-3)
        assert row["fused_linear_time_vs_materialised"] > 0
