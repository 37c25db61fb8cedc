"""Hub push against a local stand-in for the hub (tests/hub_server.py): the files and card it receives, and the
failure modes, each leaving the local folder exactly as it was."""

from __future__ import annotations

import hashlib

import pytest

from slm_assist.core.errors import UserError
from slm_assist.hub import model_card, push

from .hub_server import FakeHub


def snapshot(d):
    return {p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def exported(tiny_data, tmp_path_factory):
    """A `final/` folder written by slm_assist.train (weights, tokenizer, slm_assist.json)."""
    from slm_assist.train import main

    from .conftest import run_overrides

    run = tmp_path_factory.mktemp("hub") / "run"
    main(run_overrides(tiny_data, run, "train.max_steps=2", "checkpoint.every=0"))
    return run / "final"


def test_push_uploads_the_folder_and_a_generated_card(exported, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    before = snapshot(exported)
    with FakeHub() as hub:
        url = push(exported, "my-org/tiny", private=True, endpoint=hub.url)
    assert url.startswith(hub.url + "/my-org/tiny/commit/")
    assert hub.repos == {"my-org/tiny": {"private": True}}
    (commit,) = hub.commits
    assert commit["revision"] == "main" and not commit["pr"]
    files = commit["files"]
    assert set(files) == set(before) | {"README.md"}  # exactly the folder, plus the card
    for name, digest in before.items():
        assert hashlib.sha256(files[name]).hexdigest() == digest
    card = files["README.md"].decode()
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert card == model_card(exported).replace("REPO_ID", "my-org/tiny")
    assert "## Data" in card and "## Training" in card and "my-org/tiny" in card
    assert snapshot(exported) == before


def test_push_to_a_revision_and_as_a_pull_request(exported, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    with FakeHub() as hub:
        push(exported, "my-org/tiny", revision="dev", endpoint=hub.url)
        url = push(exported, "my-org/tiny", create_pr=True, endpoint=hub.url)
    assert [c["revision"] for c in hub.commits] == ["dev", "refs/pr/1"]
    assert url == f"{hub.url}/my-org/tiny/discussions/1"


def test_card_describes_the_salt_recipe(tiny_data, tiny_slm, tmp_path):
    from slm_assist.train import main

    from .conftest import run_overrides

    run = tmp_path / "salt"
    main(run_overrides(tiny_data, run, "train.max_steps=2", "checkpoint.every=0", f"distill.teacher={tiny_slm}",
                       "distill.schedule.kind=step", "distill.schedule.n_kd_steps=1", "distill.gate_topk=4"))
    card = model_card(run / "final")
    assert "## SALT recipe" in card and f"teacher: `{tiny_slm}`" in card
    assert "schedule: step, w = 0.667, n_KD = 1 steps" in card and "top-4" in card and "- salt" in card
    assert "| validation loss (last training eval) |" in card


def test_missing_token_is_a_clear_error(exported, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no token saved by `hf auth login` either
    before = snapshot(exported)
    with FakeHub() as hub, pytest.raises(UserError, match="no Hugging Face token: set HF_TOKEN"):
        push(exported, "my-org/tiny", endpoint=hub.url)
    assert hub.calls == [] and snapshot(exported) == before


def test_unreachable_endpoint_is_a_clear_error(exported, monkeypatch):
    from slm_assist.core.dist import _free_port

    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    before = snapshot(exported)
    with pytest.raises(UserError, match=r"hub endpoint http://127.0.0.1:\d+ is unreachable \(ConnectError"):
        push(exported, "my-org/tiny", endpoint=f"http://127.0.0.1:{_free_port()}")
    assert snapshot(exported) == before


def test_rejected_commit_is_a_clear_error(exported, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    before = snapshot(exported)
    with FakeHub() as hub:
        hub.reject_commit = 403
        with pytest.raises(UserError, match=r"rejected the push .* \(HTTP 403\).*local folder is unchanged"):
            push(exported, "my-org/tiny", endpoint=hub.url)
    assert hub.commits == [] and snapshot(exported) == before


def test_cli_exit_code_and_bad_folder(tmp_path, monkeypatch):
    from .conftest import run_module

    res = run_module("slm_assist.hub", ["push", str(tmp_path), "--repo-id", "a/b"], env={"HF_TOKEN": "x"})
    assert res.returncode == 2 and "not a save_pretrained model directory" in res.stderr
    res = run_module("slm_assist.hub", ["card", str(tmp_path)])
    assert res.returncode == 2 and "no slm_assist.json" in res.stderr


def test_stages_render_in_the_card_and_carry_over_to_the_next_run(exported, tiny_data, tmp_path):
    import json
    import shutil

    from slm_assist.core.model_dir import append_stage
    from slm_assist.train import main

    from .conftest import run_overrides

    assert json.loads((exported / "slm_assist.json").read_text())["stages"] == []
    staged = tmp_path / "gd"
    shutil.copytree(exported, staged)
    stage = {"name": "GD", "summary": "General distillation from the pretrained LLM.", "metrics": {"val_loss": 3.5}}
    append_stage(staged, stage)
    card = model_card(staged)
    assert "## Stage: GD\n\nGeneral distillation from the pretrained LLM." in card and "| GD: val_loss | 3.5000 |" in card
    run = tmp_path / "next"  # a run starting from the staged model keeps the record, for later stages to extend
    main(run_overrides(tiny_data, run, f"model.pretrained={staged}", "train.max_steps=1", "checkpoint.every=0"))
    assert json.loads((run / "final" / "slm_assist.json").read_text())["stages"] == [stage]
    with pytest.raises(UserError, match="no slm_assist.json; not a model exported by slm_assist"):
        (tmp_path / "bare").mkdir()
        (tmp_path / "bare" / "config.json").write_text("{}")
        append_stage(tmp_path / "bare", stage)


def test_reports_and_cards_share_one_recipe_text():
    from slm_assist.core.config import load_config, to_dict
    from slm_assist.salt.recipe import RunConfig, describe

    def recipe(*overrides):
        return describe(to_dict(load_config(RunConfig, None, list(overrides))))

    assert recipe().short == "CE" and recipe().lines == []
    control = recipe("distill.label_smoothing=0.3", "distill.schedule.n_kd_steps=5")
    assert control.short == "control: label smoothing ε=0.3, step w=0.667 for 5 steps" and control.tags == []
    assert "- control: label smoothing ε = 0.3 instead of a teacher" in control.lines
    assert "- schedule: step, w = 0.667, n_KD = 5 steps" in control.lines  # n_KD from the schedule's own rule
    salt = recipe("distill.teacher=runs/x/slm/final", "train.max_steps=1000")
    assert salt.short == "SALT: KD from slm, step w=0.667 for 20% of steps" and salt.tags == ["salt", "distillation"]
    assert "- schedule: step, w = 0.667, n_KD = 200 steps" in salt.lines
