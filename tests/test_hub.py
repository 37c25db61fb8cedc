"""Hub push against a local stand-in for the hub (tests/hub_server.py): the files and card it receives, and the
failure modes, each leaving the local folder exactly as it was."""

from __future__ import annotations

import hashlib

import pytest

from slm_assist.errors import UserError
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
    from slm_assist.dist import _free_port

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
