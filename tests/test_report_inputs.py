"""Run directories that `slm_assist.report` and `read_metrics` must take without a traceback: a finished run
without metrics.jsonl, a metrics log torn by a kill, a corrupt one, a run directory that does not exist, and bad
--data / --select."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slm_assist.core.errors import UserError
from slm_assist.core.model_dir import META
from slm_assist.core.run_dir import METRICS, read_metrics

from .conftest import error_line, run_module

RECORDS = [{"step": 1, "loss": 5.0, "ce": 5.0}, {"step": 2, "loss": 4.5, "ce": 4.5, "val_loss": 4.75},
           {"step": 3, "loss": 4.0, "ce": 4.0}]


def finished_run(root: Path, name: str = "run") -> Path:
    """A run directory as a finished run leaves it, without metrics.jsonl: final/ with the trainer's run metadata
    (Trainer.metadata(): run_config, data_manifest, params, step, tokens_seen, stages)."""
    run = root / name
    (run / "final").mkdir(parents=True)
    meta = {"run_config": {"run_dir": str(run), "data": {"path": str(root / "data")}, "train": {"max_steps": 3}},
            "data_manifest": {}, "params": 61_000, "step": 3, "tokens_seen": 384, "stages": []}
    (run / "final" / META).write_text(json.dumps(meta, indent=2) + "\n")
    return run


def write_metrics(run: Path, text: str) -> None:
    (run / METRICS).write_text(text)


def test_read_metrics_drops_a_torn_last_line(tmp_path):
    write_metrics(tmp_path, "".join(json.dumps(r) + "\n" for r in RECORDS) + '{"step": 4, "lo')
    assert read_metrics(tmp_path) == RECORDS
    write_metrics(tmp_path, "".join(json.dumps(r) + "\n" for r in RECORDS) + '{"step": 4, "loss": 3.\n\n')
    assert read_metrics(tmp_path) == RECORDS  # torn, then a newline from a later append: still the last record


def test_read_metrics_names_a_corrupt_line_before_the_last(tmp_path):
    lines = [json.dumps(r) for r in RECORDS]
    write_metrics(tmp_path, "\n".join([lines[0], '{"step": 2, "lo', lines[2]]) + "\n")
    with pytest.raises(UserError, match=rf"{METRICS}:2: corrupt metrics record .*'{{\"step\": 2, \"lo'"):
        read_metrics(tmp_path)
    write_metrics(tmp_path, "\n".join([lines[0], "[1, 2]", lines[2]]) + "\n")
    with pytest.raises(UserError, match=rf"{METRICS}:2: corrupt metrics record \(not an object with an integer 'step'\)"):
        read_metrics(tmp_path)


def test_report_on_a_finished_run_without_metrics(tmp_path):
    """val_loss shows as — and the loss-curve plot skips the run; the run with metrics is reported as before."""
    bare = finished_run(tmp_path, "bare")
    logged = finished_run(tmp_path, "logged")
    write_metrics(logged, "".join(json.dumps(r) + "\n" for r in RECORDS))
    assert read_metrics(bare) == []
    out = tmp_path / "report" / "report.md"
    res = run_module("slm_assist.report", [str(bare), str(logged), "--out", str(out)], timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Traceback" not in res.stderr and "No artists" not in res.stderr, res.stderr
    table = {line.split()[0]: line.split() for line in res.stdout.splitlines() if line.startswith(str(tmp_path))}
    assert table[str(bare)][4] == "—" and table[str(logged)][4] == "4.7500"
    report = out.read_text()
    assert "| bare | 0.06M | 3 | 384 | — |" in report and "| logged | 0.06M | 3 | 384 | 4.7500 |" in report
    assert (out.parent / "loss_curves.png").stat().st_size > 1000


def test_report_input_errors_are_one_line(tmp_path):
    """Every bad input is one `error:` line (exit 2), found before anything is written."""
    run = finished_run(tmp_path)
    out = tmp_path / "out" / "report.md"
    packed = tmp_path / "packed"
    packed.mkdir()
    (packed / "manifest.json").write_text(json.dumps({"sources": [], "vocab_size": 1, "tokenizer_fingerprint": "x",
                                                      "seq_len": 2, "splits": {}}))
    not_select = tmp_path / "not_select"
    not_select.mkdir()
    corrupt_select = tmp_path / "corrupt_select"
    corrupt_select.mkdir()
    (corrupt_select / "selection.json").write_text('{"policy": ')
    torn_middle = finished_run(tmp_path, "torn_middle")
    write_metrics(torn_middle, '{"step": 1, "loss": 5.0}\n{"step": 2, "lo\n{"step": 3, "loss": 4.0}\n')
    cases = [
        ([str(tmp_path / "missing")], [f"{tmp_path / 'missing'}: no such directory"]),
        ([str(run / "final" / META)], ["not a run directory"]),
        ([str(torn_middle)], [f"{torn_middle / METRICS}:2: corrupt metrics record"]),
        ([str(run), "--out", str(out), "--data", str(tmp_path / "nodata")], ["nodata", "not a packed dataset"]),
        ([str(run), "--out", str(out), "--data", str(packed), "--select", str(not_select)],
         [f"--select {not_select}", "no selection.json"]),
        ([str(run), "--out", str(out), "--data", str(packed), "--select", str(corrupt_select)],
         [f"{corrupt_select / 'selection.json'}", "corrupt selection summary"]),
    ]
    for argv, expected in cases:
        res = run_module("slm_assist.report", argv, timeout=300)
        assert res.returncode == 2, (argv, res.stdout, res.stderr)
        line = error_line(res.stderr)
        for want in expected:
            assert want in line, (argv, want, line)
        assert not out.exists(), argv  # no section of the report was written
