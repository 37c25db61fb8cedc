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
    import json
    import os

    from slm_assist.train import main

    from .conftest import run_overrides

    run = tmp_path / "salt"
    main(run_overrides(tiny_data, run, "train.max_steps=2", "checkpoint.every=0", "distill.source.kind=teacher", f"distill.source.teachers=[{tiny_slm}]",
                       "distill.schedule.kind=step", "distill.schedule.n_kd_steps=1", "distill.gate.topk=4"))
    card = model_card(run / "final")
    teacher = json.loads((run / "final" / "slm_assist.json").read_text())["run_config"]["distill"]["source"]["teachers"][0]
    assert os.path.normpath(run / teacher) == str(tiny_slm)  # as recorded: absolute, or relative to the run
    assert "## SALT recipe" in card and f"teacher: `{tiny_slm.name}`" in card and str(tiny_slm) not in card
    assert "schedule: step, w = 0.667, n_KD = 1 steps" in card and "top-4" in card and "- salt" in card
    assert "| validation loss (last training eval) |" in card


def test_card_and_push_carry_the_selections_dataset_card(tiny_data, tiny_slm, tmp_path, monkeypatch, capsys):
    """A run that distilled on a data_tools.select subset: the model card links the subset's dataset card, and the
    push uploads that card and its figures under data_card/; once the selection is gone, the push notes it."""
    import json
    import shutil

    from data_tools.select import SelectConfig
    from data_tools.select import run as select
    from slm_assist.core.config import load_config
    from slm_assist.train import main

    from .conftest import run_overrides
    from .test_select import write_scores

    sel = tmp_path / "select"
    select(load_config(SelectConfig, None, [f"scores={write_scores(tmp_path / 'scores', data=tiny_data)}",
                                            f"out_dir={sel}", "fraction=1"]))
    run = tmp_path / "salt"
    main(run_overrides(tiny_data, run, "train.max_steps=2", "checkpoint.every=0", "distill.source.kind=teacher", f"distill.source.teachers=[{tiny_slm}]",
                       "distill.schedule.kind=step", "distill.schedule.n_kd_steps=1",
                       f"distill.data.selection={sel / 'index.npy'}"))
    final = run / "final"
    card = model_card(final)
    assert ("- Selected pretraining subset: [data_card/README.md](data_card/README.md) (the KD phase's `salt_ds` "
            "subset, 9 of 10 sequences)") in card
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    with FakeHub() as hub:
        push(final, "my-org/salt", endpoint=hub.url)
        shutil.rmtree(sel)
        push(final, "my-org/salt", endpoint=hub.url)
    with_card, without = (c["files"] for c in hub.commits)
    assert {f for f in with_card if f.startswith("data_card/")} == {
        "data_card/README.md", "data_card/hist_salt_ds.png", "data_card/hist_mean_loss.png"}
    assert with_card["data_card/README.md"].decode().startswith("---\npretty_name: slm_assist salt_ds selection")
    assert with_card["README.md"].decode() == card.replace("REPO_ID", "my-org/salt")
    assert not any(f.startswith("data_card/") for f in without)
    assert "Selected pretraining subset" not in without["README.md"].decode()
    recorded = json.loads((final / "slm_assist.json").read_text())["run_config"]["distill"]["data"]["selection"]
    where = "" if recorded == str(sel / "index.npy") else f" ({sel / 'index.npy'})"  # a run-relative one: resolved
    assert f"note: the run's selection {recorded}{where}: no README.md dataset card there" in capsys.readouterr().err


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


@pytest.fixture
def silent_hub():
    """An endpoint that accepts TCP connections and never answers: the URL."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held, stop = [], threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            held.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    server.close()
    for conn in held:
        conn.close()


def staging_dirs(tmp):
    return sorted(p.name for p in tmp.glob("slm_assist_push_*"))


def test_silent_endpoint_times_out_with_a_clear_error(exported, silent_hub, tmp_path):
    import time

    from .conftest import run_module

    before = snapshot(exported)
    start = time.monotonic()
    res = run_module("slm_assist.hub", ["push", str(exported), "--repo-id", "my-org/tiny", "--endpoint", silent_hub,
                                        "--timeout", "2"],
                     env={"HF_TOKEN": "hf_test_token", "TMPDIR": str(tmp_path)}, timeout=60)
    assert time.monotonic() - start < 30
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    (line,) = [x for x in res.stderr.splitlines() if x.startswith("error:")]
    assert f"hub endpoint {silent_hub} did not answer within 2 s" in line
    assert "--timeout" in line and "the local folder is unchanged" in line
    assert snapshot(exported) == before
    assert staging_dirs(tmp_path) == []


def test_push_timeout_in_process_restores_the_client_factory(exported, silent_hub, monkeypatch, tmp_path):
    from huggingface_hub.utils import _http

    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    factory = _http._GLOBAL_CLIENT_FACTORY
    with pytest.raises(UserError, match=r"did not answer within 0.5 s \((Read|Connect|Write|Pool)Timeout"):
        push(exported, "my-org/tiny", endpoint=silent_hub, timeout=0.5)
    assert _http._GLOBAL_CLIENT_FACTORY is factory and staging_dirs(tmp_path) == []
    with pytest.raises(UserError, match="--timeout 0.0: expected a positive number"):
        push(exported, "my-org/tiny", endpoint=silent_hub, timeout=0.0)


def test_sigterm_during_a_push_removes_the_staging_copy(exported, silent_hub, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from .conftest import REPO, clean_env

    before = snapshot(exported)
    proc = subprocess.Popen(
        [sys.executable, "-m", "slm_assist.hub", "push", str(exported), "--repo-id", "my-org/tiny",
         "--endpoint", silent_hub],  # the default --timeout (60 s) outlasts the test
        cwd=REPO, env=clean_env(HF_TOKEN="hf_test_token", TMPDIR=str(tmp_path)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not staging_dirs(tmp_path):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no staging dir appeared"
            time.sleep(0.05)
        time.sleep(0.5)  # into the copy or the wait for the hub
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0 and "Traceback" not in err
    assert staging_dirs(tmp_path) == []
    assert snapshot(exported) == before


def test_push_removes_stale_staging_of_dead_processes_only(exported, monkeypatch, tmp_path):
    import os
    import subprocess

    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    dead = subprocess.Popen(["true"])
    dead.wait()  # reaped: its pid names no process now
    stale = tmp_path / f"slm_assist_push_{dead.pid}_k1ll9"
    live = tmp_path / f"slm_assist_push_{os.getpid()}_alive"
    keep = [live, tmp_path / "unrelated", tmp_path / "slm_assist_push_notapid"]
    for d in [stale, *keep]:
        (d / "final").mkdir(parents=True)
        (d / "final" / "model.safetensors").write_bytes(b"x")
    (tmp_path / f"slm_assist_push_{dead.pid}_file").write_text("not a dir")  # only dirs are ours
    with FakeHub() as hub:
        push(exported, "my-org/tiny", endpoint=hub.url)
    assert len(hub.commits) == 1
    assert not stale.exists()
    for d in keep:
        assert (d / "final" / "model.safetensors").read_bytes() == b"x"
    assert (tmp_path / f"slm_assist_push_{dead.pid}_file").read_text() == "not a dir"
    assert staging_dirs(tmp_path) == sorted([live.name, "slm_assist_push_notapid", f"slm_assist_push_{dead.pid}_file"])


def copy_model(exported, final, edit=None):
    """A copy of the exported folder at `final` (its parent: the run directory), its run metadata changed by
    `edit(meta)`."""
    import json
    import shutil

    shutil.copytree(exported, final)
    if edit is not None:
        meta = json.loads((final / "slm_assist.json").read_text())
        edit(meta)
        (final / "slm_assist.json").write_text(json.dumps(meta))
    return final


def test_push_leaves_hidden_entries_out_unless_include_hidden(exported, tmp_path, monkeypatch, capsys):
    from slm_assist.hub import main

    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    final = copy_model(exported, tmp_path / "run" / "final")
    (final / ".env").write_text("HF_TOKEN=hf_leaked\n")
    (final / ".secret").mkdir()
    (final / ".secret" / "key.txt").write_text("private key")
    (final / "extra").mkdir()
    (final / "extra" / "notes.txt").write_text("kept")
    (final / "extra" / ".hidden").write_text("nested, still hidden")
    (tmp_path / "outside.bin").write_bytes(b"linked")
    (final / "linked.bin").symlink_to("../../outside.bin")  # relative: the staging copy must not keep it a link
    before = snapshot(final)
    with FakeHub() as hub:
        push(final, "my-org/tiny", endpoint=hub.url)
        main(["push", str(final), "--repo-id", "my-org/tiny", "--endpoint", hub.url, "--include-hidden"])
    default, everything = (c["files"] for c in hub.commits)
    visible = {f for f in before if not any(part.startswith(".") for part in f.split("/"))}
    assert {".env", ".secret/key.txt", "extra/.hidden"} == set(before) - visible
    assert set(default) == visible | {"README.md"}
    assert default["linked.bin"] == b"linked" and default["extra/notes.txt"] == b"kept"
    assert set(everything) == set(before) | {"README.md"}
    assert everything[".env"] == b"HF_TOKEN=hf_leaked\n" and everything[".secret/key.txt"] == b"private key"
    err = capsys.readouterr().err
    assert [x for x in err.splitlines() if "hidden" in x] == [
        f"left out 3 hidden entries of {final} (--include-hidden uploads them): .env, .secret/, extra/.hidden"]
    assert "hf_leaked" not in err and "key.txt" not in err
    assert snapshot(final) == before and (final / "linked.bin").is_symlink()


def test_redact_hides_the_credentials_of_urls_and_nothing_else():
    from slm_assist.hub import redact

    assert redact("hub https://alice:s3cret@hub.example/api/x failed") == "hub https://***@hub.example/api/x failed"
    assert redact("url 'http://h:1/p?access_token=T&X-Amz-Signature=S&sig=G&api_key=K&password=P&region=eu#f'") == (
        "url 'http://h:1/p?access_token=***&X-Amz-Signature=***&sig=***&api_key=***&password=***&region=eu#f'")
    assert redact("at: http://bob:pa/ss@h:1/api/commit/main.") == "at: http://***@h:1/api/commit/main."
    assert redact("--endpoint alice:s3cret@hub.example: bad") == "--endpoint ***@hub.example: bad"
    assert redact("HF_ENDPOINT=https://tok@hub.example") == "HF_ENDPOINT=https://***@hub.example"
    plain = "push of /runs/x/final to a/b via https://huggingface.co/a/b?revision=main failed at 12:30; me@example.com"
    assert redact(plain) == plain


def test_unreachable_or_bad_endpoint_with_credentials_is_redacted(exported, monkeypatch):
    from slm_assist.core.dist import _free_port

    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    port = _free_port()  # closed: nothing listens there
    for endpoint, shown in [(f"http://alice:pw-SECRET@127.0.0.1:{port}", f"http://***@127.0.0.1:{port}"),
                            (f"http://127.0.0.1:{port}/?token=tok-SECRET", f"http://127.0.0.1:{port}/?token=***")]:
        with pytest.raises(UserError) as e:
            push(exported, "my-org/tiny", endpoint=endpoint)
        assert "SECRET" not in str(e.value)
        assert f"hub endpoint {shown} is unreachable (ConnectError" in str(e.value)
    monkeypatch.setenv("HF_ENDPOINT", f"https://bob:env-SECRET@127.0.0.1:{port}")
    with pytest.raises(UserError, match=rf"hub endpoint https://\*\*\*@127.0.0.1:{port} is unreachable") as e:
        push(exported, "my-org/tiny")
    assert "SECRET" not in str(e.value)
    monkeypatch.setenv("HF_ENDPOINT", "bob:env-SECRET@hub.example")  # no scheme
    with pytest.raises(UserError, match=r"^HF_ENDPOINT=\*\*\*@hub.example: expected an http:// or https:// URL"):
        push(exported, "my-org/tiny")
    with pytest.raises(UserError, match=r"^--endpoint \*\*\*@hub.example: expected an http:// or https:// URL"):
        push(exported, "my-org/tiny", endpoint="bob:arg-SECRET@hub.example")
    with pytest.raises(UserError, match=r"InvalidURL") as e:  # a port that is not a number: still one line
        push(exported, "my-org/tiny", endpoint="http://bob:port-SECRET@127.0.0.1:notaport")
    assert "SECRET" not in str(e.value)


def test_rejected_push_with_credentials_in_the_endpoint_is_redacted(exported, monkeypatch, tmp_path):
    """The hub's rejection (and huggingface_hub's own retry warning before it) names the endpoint: the CLI's whole
    output carries no credential; nor does an exception text that quotes the request URL."""
    from .conftest import run_module

    before = snapshot(exported)
    with FakeHub() as hub:
        hub.fail_preupload, hub.reject_commit = [503], 403  # one retried answer, then the rejection
        endpoint = hub.url.replace("http://", "http://alice:pw-SECRET@")
        res = run_module("slm_assist.hub", ["push", str(exported), "--repo-id", "my-org/tiny", "--endpoint", endpoint],
                         env={"HF_TOKEN": "hf_test_token", "TMPDIR": str(tmp_path)}, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "SECRET" not in res.stderr + res.stdout
    shown = hub.url.replace("http://", "http://***@")
    assert f"HTTP Error 503 thrown while requesting POST {shown}/api/models/my-org/tiny/preupload/main" in res.stderr
    (line,) = [x for x in res.stderr.splitlines() if x.startswith("error:")]
    assert line.startswith(f"error: hub {shown} rejected the push of {exported} to my-org/tiny (HTTP 403)")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    with FakeHub() as hub:  # a query token: the request URL, quoted in the hub's answer, carries it
        with pytest.raises(UserError, match=r"\(HTTP 404\)") as e:
            push(exported, "my-org/tiny", endpoint=f"{hub.url}/?token=tok-SECRET")
    assert "SECRET" not in str(e.value) and f"'{hub.url}/?token=***'" in str(e.value)
    assert snapshot(exported) == before


def test_card_shows_no_local_absolute_path(exported, tmp_path):
    """The card renders a path setting by its last component(s). What it still prints as recorded are the lines of
    salt.recipe.describe and the stages' summaries (their owners' text): every other line is free of local paths."""
    import json

    from slm_assist.recipes import describe

    runs = tmp_path / "runs"

    def absolute(meta):
        cfg = meta["run_config"]
        cfg["run_dir"] = str(runs / "compress" / "gd")
        cfg["data"]["path"] = str(tmp_path / "data" / "tiny")
        cfg["model"]["pretrained"] = str(runs / "compress" / "init")
        cfg["distill"]["source"].update(kind="teacher", teachers=[str(runs / "slm" / "final")])
        cfg["distill"]["data"].update(selection=str(tmp_path / "select" / "index.npy"), curriculum_scores=str(tmp_path))
        cfg["distill"]["handover"].update(teacher=str(runs / "slm" / "final"))
        meta["data_manifest"]["sources"] = [str(tmp_path / "corpus" / "wiki.txt"), str(tmp_path / "corpus" / "books"),
                                            str(runs / "slm" / "final")]
        meta["stages"] = [{"name": "GD", "trains": "student",
                           "summary": f"trains the student from `{runs / 'compress' / 'init'}`; teacher "
                                      f"`{runs / 'slm' / 'final'}` (pretrained)",
                           "start": str(runs / "compress" / "init"), "teacher": str(runs / "slm" / "final"),
                           "metrics": {"val_loss": 3.5}}]

    final = copy_model(exported, runs / "compress" / "gd" / "final", absolute)
    card = model_card(final)
    meta = json.loads((final / "slm_assist.json").read_text())
    theirs = set(describe(meta, final.parent).lines) | {s["summary"] for s in meta["stages"]}
    assert [x for x in card.splitlines() if str(tmp_path) in x and x not in theirs] == []
    assert "- sources: `wiki.txt`, `books`, `slm/final`" in card and "\n# compress\n" in card


def test_a_run_relative_selection_still_finds_its_dataset_card(exported, tiny_data, tmp_path, monkeypatch, capsys):
    """Paths in the run metadata may be relative to the run directory (the model folder's parent), whatever the
    current directory."""
    import shutil

    from data_tools.select import SelectConfig
    from data_tools.select import run as select
    from slm_assist.core.config import load_config

    from .test_select import write_scores

    sel = tmp_path / "select"
    select(load_config(SelectConfig, None, [f"scores={write_scores(tmp_path / 'scores', data=tiny_data)}",
                                            f"out_dir={sel}", "fraction=1"]))

    def relative(meta):
        meta["run_config"]["run_dir"] = "runs/run"  # recorded by its last two parts
        meta["run_config"]["distill"]["source"].update(kind="teacher", teachers=["../slm/final"])
        meta["run_config"]["distill"]["data"]["selection"] = "../select/index.npy"

    final = copy_model(exported, tmp_path / "run" / "final", relative)
    (tmp_path / "elsewhere" / "deeper").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "elsewhere" / "deeper")  # where ../select/index.npy is not the selection
    card = model_card(final)
    assert ("- Selected pretraining subset: [data_card/README.md](data_card/README.md) (the KD phase's `salt_ds` "
            "subset, 9 of 10 sequences)") in card
    assert "\n# run\n" in card
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    with FakeHub() as hub:
        push(final, "my-org/rel", endpoint=hub.url)
        shutil.rmtree(sel)
        push(final, "my-org/rel", endpoint=hub.url)
    with_card, without = (c["files"] for c in hub.commits)
    assert {"data_card/README.md", "data_card/hist_salt_ds.png"} <= set(with_card)
    assert not any(f.startswith("data_card/") for f in without)
    assert (f"note: the run's selection ../select/index.npy ({sel / 'index.npy'}): no README.md dataset card there"
            in capsys.readouterr().err)
