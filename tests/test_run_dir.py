"""A run directory never lies about what made it and never loses a user's file: relaunches are checked against
the config of the checkpoint they resume (refused with nothing changed, accepted with a line, or overridden and
recorded), one process at a time, checksums on every checkpoint file, nothing unpickled, nothing of the user's
deleted, no absolute local path in what a model carries."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from slm_assist.core.errors import UserError
from slm_assist.core.run_dir import LOCK, RunDir, read_metrics
from slm_assist.train import main

from .conftest import REPO, error_line, run_module, run_overrides

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished(tiny_data, tmp_path_factory) -> Path:
    """A finished 4-step run, checkpoints at 2 and 4."""
    run = tmp_path_factory.mktemp("finished") / "run"
    main(run_overrides(tiny_data, run, "train.max_steps=4", "checkpoint.every=2"))
    return run


def _copy(finished: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(finished, run, symlinks=True)
    return run


def _args(data, run, *extra):
    return run_overrides(data, run, "train.max_steps=4", "checkpoint.every=2", *extra)


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `root` (but the lock, which a launch takes) with its bytes and mtime."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != LOCK}


def test_a_finished_run_relaunched_is_not_exported_again_and_keeps_the_users_files(tiny_data, finished, tmp_path,
                                                                                   capsys):
    run = _copy(finished, tmp_path)
    mine = {"README.md": "my notes\n", "adapter.safetensors": "lora", "tokenizer_notes.md": "x", ".mine.lock": "y"}
    for name, text in mine.items():  # names close to ours: still not ours
        (run / "final" / name).write_text(text)
    (run / "final" / "eval").mkdir()
    (run / "final" / "eval" / "mine.json").write_text("{}\n")
    before = _snapshot(run / "final")
    main(_args(tiny_data, run))
    assert "final/ is up to date, not exported again" in capsys.readouterr().out
    assert _snapshot(run / "final") == before

    # a longer run is exported again: the user's entries are carried into the new export
    main(_args(tiny_data, run, "train.max_steps=6"))
    out = capsys.readouterr().out
    assert "train.max_steps: 4 -> 6 (extended)" in out and "kept 5 entries this command did not write" in out
    assert all((run / "final" / name).read_text() == text for name, text in mine.items())
    assert (run / "final" / "eval" / "mine.json").read_text() == "{}\n"
    meta = json.loads((run / "final" / "slm_assist.json").read_text())
    assert meta["step"] == 6
    assert meta["history"] == [{"step": 4, "changes": [{"key": "train.max_steps", "was": 4, "now": 6,
                                                        "how": "extended"}]}]


def test_final_as_a_symlink_keeps_everything_the_link_reaches(tiny_data, finished, tmp_path):
    run = _copy(finished, tmp_path)
    elsewhere = tmp_path / "shared_models" / "llm"
    shutil.move(str(run / "final"), elsewhere)
    (elsewhere / "other_model.bin").write_bytes(b"precious")
    (run / "final").symlink_to(elsewhere)
    main(_args(tiny_data, run, "train.max_steps=6"))
    assert (run / "final").is_symlink() and (run / "final").resolve() == elsewhere.resolve()
    assert (elsewhere / "other_model.bin").read_bytes() == b"precious"
    assert json.loads((elsewhere / "slm_assist.json").read_text())["step"] == 6
    assert sorted(p.name for p in elsewhere.parent.iterdir()) == ["llm"]  # no temp copies left next to it


@pytest.fixture(scope="module")
def other_data(tiny_data, tmp_path_factory) -> Path:
    """The tiny corpus packed again with seq_len 16 (the same tokenizer)."""
    from data_tools.pack import PrepareConfig, prepare
    from slm_assist.core.config import load_config

    out = tmp_path_factory.mktemp("other") / "data16"
    prepare(load_config(PrepareConfig, None, [f"out_dir={out}", f"tokenizer.path={tiny_data / 'tokenizer'}",
                                              "corpus.max_docs=40", "pack.seq_len=16", "pack.val_fraction=0.1"]))
    return out


@pytest.mark.parametrize("change, expect", [
    (["optim.lr=3e-3"], r"optim\.lr: 0\.002 there, 0\.003 here.*checkpoint\.allow_changes=\[optim\.lr\]"),
    (["train.micro_batch_size=2"], r"train\.micro_batch_size: 4 there, 2 here"),
    (["DATA16"], r"data\.path: .* there, .*data16' here"),
    (["TEACHER"], r"distill\.source\.kind: 'none' there, 'teacher' here; distill\.source\.teachers: \[\] there, "
                  r"\[.*slm'\] here"),
    (["model.hidden_size=48"], r"model\.hidden_size: 32 there, 48 here.*model\.hidden_size cannot change in a resumed "
                               r"run"),
])
def test_a_resume_that_changes_the_math_is_refused_and_changes_nothing(change, expect, tiny_data, tiny_slm,
                                                                        other_data, finished, tmp_path):
    run = _copy(finished, tmp_path)
    shutil.rmtree(run / "final")  # as if killed before the export: the next launch would resume step 4
    before = _snapshot(run)
    replace = {"DATA16": [f"data.path={other_data}"],
               "TEACHER": ["distill.source.kind=teacher", f"distill.source.teachers=[{tiny_slm}]"]}
    extra = [x for c in change for x in replace.get(c, [c])]
    with pytest.raises(UserError, match=expect) as e:
        main(_args(tiny_data, run, "train.max_steps=6", *extra))
    assert "Nothing was changed on disk" in str(e.value) and "accepted as they are: train.max_steps" in str(e.value)
    assert _snapshot(run) == before


def test_a_model_shape_change_is_one_error_line_on_the_command_line(tiny_data, finished, tmp_path):
    run = _copy(finished, tmp_path)
    before = _snapshot(run)
    res = run_module("slm_assist.train", _args(tiny_data, run, "model.hidden_size=48"))
    assert res.returncode == 2, res.stderr[-2000:]
    line = error_line(res.stderr)
    assert "model.hidden_size: 32 there, 48 here" in line and "size mismatch" not in line
    assert _snapshot(run) == before


def test_harmless_changes_are_accepted_with_a_line_and_moved_data_by_content(tiny_data, finished, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    moved = tmp_path / "moved_data"
    shutil.copytree(tiny_data, moved)
    main(_args(moved, run, "train.max_steps=5", "train.log_every=2", "train.torch_threads=2"))
    out = capsys.readouterr().out
    for line in ("train.log_every: 1 -> 2 (accepted)", "train.torch_threads: 1 -> 2 (accepted)",
                 "(moved)", "train.max_steps: 4 -> 5 (extended)"):
        assert line in out, (line, out)
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4, 5]

    # the same path with other content (re-packed in place) is a change of the data
    shutil.rmtree(moved)
    from data_tools.pack import PrepareConfig, prepare
    from slm_assist.core.config import load_config

    prepare(load_config(PrepareConfig, None, [f"out_dir={moved}", f"tokenizer.path={tiny_data / 'tokenizer'}",
                                              "corpus.max_docs=30", "pack.seq_len=32", "pack.val_fraction=0.1"]))
    with pytest.raises(UserError, match=r"data\.path: .*moved_data \(content \w+\)' there, .*\(content \w+\)' here"):
        main(_args(moved, run, "train.max_steps=6"))


def test_an_override_resumes_with_the_new_value_and_the_metadata_records_both(tiny_data, finished, tmp_path):
    run = _copy(finished, tmp_path)
    main(_args(tiny_data, run, "train.max_steps=6", "optim.lr=3e-3", "schedule.kind=constant",
               "checkpoint.allow_changes=[optim.lr, schedule.kind]"))
    lrs = {r["step"]: r["lr"] for r in read_metrics(run)}
    assert lrs[5] == pytest.approx(3e-3) and lrs[6] == pytest.approx(3e-3)  # the new peak, constant: applied
    meta = json.loads((run / "final" / "slm_assist.json").read_text())
    assert meta["run_config"]["optim"]["lr"] == 3e-3
    (entry,) = meta["history"]
    assert entry["step"] == 4 and {c["key"]: (c["was"], c["now"], c["how"]) for c in entry["changes"]} == {
        "optim.lr": (2e-3, 3e-3, "override"), "schedule.kind": ("cosine", "constant", "override"),
        "train.max_steps": (4, 6, "extended")}
    from slm_assist.hub import model_card

    assert "`optim.lr` 0.002 → 0.003 (override)" in model_card(run / "final").split("## Relaunches")[1]
    # a later relaunch compares with the checkpoint made under the override: the same command is accepted
    main(_args(tiny_data, run, "train.max_steps=6", "optim.lr=3e-3", "schedule.kind=constant"))


def test_a_second_process_on_the_same_run_dir_is_refused(tiny_data, finished, tmp_path):
    run = _copy(finished, tmp_path)
    holder = RunDir(run)
    holder.lock()
    try:
        res = run_module("slm_assist.train", _args(tiny_data, run, "seed=7", "train.max_steps=6"))
    finally:
        holder.unlock()
    assert res.returncode == 2, res.stderr[-2000:]
    line = error_line(res.stderr)
    assert f"in use by pid {os.getpid()}" in line and "wait for it to finish, or use another run_dir" in line
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]


def test_a_planted_pickle_in_a_checkpoint_never_runs(tiny_data, finished, tmp_path):
    """A run directory copied from elsewhere, with a pickle that would create a file when unpickled and checksums
    made to match (as whoever planted it would): the resume refuses it, and nothing runs."""
    import torch

    from slm_assist.core.files import file_sha256
    from slm_assist.core.run_dir import RECORD

    run = _copy(finished, tmp_path)
    shutil.rmtree(run / "final")
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")

    ckpt = run / "checkpoints" / "step_00000004"
    for name in ("mp_rank_00_model_states.pt", "train_state_rank0.pt"):
        torch.save({"module": Payload()}, ckpt / name)
    record = json.loads((ckpt / RECORD).read_text())
    record["files"] = {f.name: file_sha256(f) for f in ckpt.iterdir() if f.name != RECORD}
    (ckpt / RECORD).write_text(json.dumps(record))
    with pytest.raises(UserError, match=r"step_00000004/mp_rank_00_model_states\.pt: holds pickled objects other "
                                        r"than tensors and plain data \(io\.open\).*not loaded"):
        main(_args(tiny_data, run))
    assert not marker.exists()


def test_a_full_disk_at_a_checkpoint_keeps_the_previous_one(tiny_data, tmp_path, monkeypatch):
    from slm_assist.training import checkpoint

    real = checkpoint.save_file

    def full_at_step_4(tensors, path):
        if "step_00000004" in str(path):
            raise OSError(28, "No space left on device")
        real(tensors, path)

    monkeypatch.setattr(checkpoint, "save_file", full_at_step_4)
    run = tmp_path / "run"
    with pytest.raises(UserError, match=r"no space left on .*checkpoints .*while writing the checkpoint of step 4; "
                                        r"the last good checkpoint .*step_00000002 is kept"):
        main(_args(tiny_data, run))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002"]
    assert not (run / "final").exists()
    monkeypatch.undo()
    main(_args(tiny_data, run))  # space again: it resumes from step 2
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]


def _mount_tmpfs(where: Path, size_kib: int) -> None:
    where.mkdir(parents=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(where)], capture_output=True)
    if res.returncode:
        pytest.skip(f"cannot mount a small filesystem here ({res.stderr.decode().strip()})")


def test_a_real_full_disk_during_training_is_one_error_line(tiny_data, finished, tmp_path):
    """On a filesystem with room for one checkpoint (and the log) but not two: exit 2, one line naming the
    directory, the first checkpoint intact."""
    one = sum(f.stat().st_size for f in (finished / "checkpoints" / "step_00000002").rglob("*") if f.is_file())
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, (one * 3 // 2 + (256 << 10)) // 1024)
    try:
        run = disk / "run"
        res = run_module("slm_assist.train", _args(tiny_data, run, "checkpoint.keep_last=2"))
        assert res.returncode == 2, res.stderr[-2000:]
        errors = [x for x in res.stderr.splitlines() if x.startswith("error: ")]
        assert "Traceback" not in res.stderr and len(errors) == 1, res.stderr[-3000:]  # after the progress bar
        assert f"no space left on {run / 'checkpoints'}" in errors[0] and "step_00000002 is kept" in errors[0]
        ckpts = RunDir(run).checkpoints()
        assert [p.name for p in ckpts] == ["step_00000002"] and RunDir(run).damage(ckpts[0]) is None
        assert not list((run / "checkpoints").glob(".tmp-*"))
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_exported_metadata_names_no_absolute_path_and_still_reads_back(tiny_data, tiny_slm, tmp_path):
    from slm_assist.report import run_summary

    run = tmp_path / "salt"
    main(run_overrides(tiny_data, run, "train.max_steps=2", "checkpoint.every=0", "distill.source.kind=teacher", f"distill.source.teachers=[{tiny_slm}]",
                       "distill.schedule.kind=step", "distill.schedule.n_kd_steps=1"))
    text = (run / "final" / "slm_assist.json").read_text()
    assert str(tmp_path) not in text and str(tiny_data) not in text and str(tiny_slm) not in text
    meta = json.loads(text)
    assert RunDir(run).resolve(meta["run_config"]["distill"]["source"]["teachers"][0]).resolve() == tiny_slm.resolve()
    assert meta["inputs"]["distill.source.teachers[0]"] and meta["inputs"]["data.path"]
    assert run_summary(run)["recipe"].startswith("SALT: KD from")


# ---- compress: the same owner for every stage, and the launch checked as a whole before anything is written ----
ONE = "stages:\n  - {name: gd, teacher: finetuned, data: general, loss: {kd: 1.0}, max_steps: 2}\n"
TWO = ("stages:\n  - {name: new, teacher: pretrained, data: general, loss: {kd: 1.0}, max_steps: 1}\n"
       "  - {name: gd, teacher: finetuned, data: general, loss: {kd: 1.0}, max_steps: 2}\n")


def _compress(tmp_path, data, teacher, stages=ONE, *extra) -> list[str]:
    """A one-stage compress run distilling from a fine-tuned teacher made elsewhere (`tmp_path/finetuned`)."""
    (tmp_path / "stages.yaml").write_text(stages)
    return [str(tmp_path / "stages.yaml"), f"run_dir={tmp_path / 'cmp'}", f"teacher={teacher}",
            f"finetuned_teacher={tmp_path / 'finetuned'}",
            f"general_data={data}", "init.kind=layers", "init.layers=[2]", "train.dtype=fp32",
            "train.micro_batch_size=4", "train.eval_batches=1", "train.torch_threads=1", "checkpoint.every=2", *extra]


@pytest.fixture
def compressed(tiny_data, tiny_slm, tmp_path) -> Path:
    from slm_assist.compress.__main__ import main as compress

    shutil.copytree(tiny_slm, tmp_path / "finetuned")  # a copy: one test replaces it in place
    compress(_compress(tmp_path, tiny_data, tiny_slm))
    return tmp_path / "cmp"


@pytest.mark.parametrize("change, expect", [
    (["optim.lr=2e-3"], r"stage 'gd'.*optim\.lr: 0\.001 there, 0\.002 here"),
    (["data_seed=3"], r"data\.seed: 0 there, 3 here"),
    (["train.micro_batch_size=2"], r"train\.micro_batch_size: 4 there, 2 here"),
    (["TWO"], r"stage 'new' has not run, but the later stage\(s\) \['gd'\] finished without it"),
    (["REPLACED"], r"stage 'gd'.*finished with other settings \(teacher_fingerprint: "),
])
def test_a_compress_relaunch_that_changes_a_finished_stage_is_refused_first(change, expect, compressed, tiny_data,
                                                                           tiny_slm, tmp_path):
    from slm_assist.compress.__main__ import main as compress
    from slm_assist.report import main as report

    teacher = tiny_slm
    stages = TWO if change == ["TWO"] else ONE
    if change == ["REPLACED"]:  # the fine-tuned teacher retrained in place: same path, other weights
        from safetensors.torch import load_file, save_file

        finetuned = tmp_path / "finetuned" / "model.safetensors"
        save_file({k: v * 1.01 for k, v in load_file(str(finetuned)).items()}, str(finetuned),
                  metadata={"format": "pt"})
    before = _snapshot(compressed)
    extra = [c for c in change if c not in ("TWO", "REPLACED")]
    with pytest.raises(UserError, match=expect):
        compress(_compress(tmp_path, tiny_data, teacher, stages, *extra))
    assert _snapshot(compressed) == before and not (compressed / "new").exists()
    report(["--compress", str(compressed)])  # the report reads the launch that ran, not the refused one


def test_a_stage_interrupted_then_relaunched_with_another_lr_is_refused(compressed, tiny_data, tiny_slm, tmp_path):
    from slm_assist.compress.__main__ import main as compress

    shutil.rmtree(compressed / "gd" / "final")  # as if killed after its step-2 checkpoint, before the export
    before = _snapshot(compressed)
    stages = ONE.replace("max_steps: 2", "max_steps: 4, lr: 0.005")
    with pytest.raises(UserError, match=r"stage 'gd' .*interrupted at step_00000002.*optim\.lr: 0\.001 there, 0\.005 "
                                        r"here"):
        compress(_compress(tmp_path, tiny_data, tiny_slm, stages))
    assert _snapshot(compressed) == before
    compress(_compress(tmp_path, tiny_data, tiny_slm, ONE.replace("max_steps: 2", "max_steps: 4")))
    assert json.loads((compressed / "gd" / "final" / "slm_assist.json").read_text())["step"] == 4


def test_the_cli_names_what_a_foreign_lock_holder_is(tmp_path):
    """The lock file says who holds it; a stale one (its process gone) does not block: flock dies with it."""
    run = tmp_path / "r"
    code = f"import os; from slm_assist.core.run_dir import RunDir; RunDir({str(run)!r}).lock(); os._exit(0)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    assert (run / LOCK).read_text().startswith("pid ")
    RunDir(run).lock()  # the holder is gone: free again


def test_a_finished_run_refuses_what_it_cannot_honour(tiny_data, finished, tmp_path):
    """An override on a finished run (nothing would train with it), fewer steps than it ran, a typo in
    allow_changes, and a finished model whose checkpoints were deleted: each one error, the run untouched."""
    run = _copy(finished, tmp_path)
    before = _snapshot(run)
    for extra, expect in [(["optim.lr=3e-3", "checkpoint.allow_changes=[optim.lr]"],
                           r"finished at step 4: checkpoint\.allow_changes=\['optim\.lr'\] would change nothing"),
                          (["train.max_steps=3"], r"checkpoint at step 4, past train\.max_steps=3"),
                          (["checkpoint.allow_changes=[optim.lrr]"], r"\['optim\.lrr'\] names no setting")]:
        with pytest.raises(UserError, match=expect):
            main(run_overrides(tiny_data, run, "train.max_steps=4", "checkpoint.every=2", *extra))
        assert _snapshot(run) == before
    shutil.rmtree(run / "checkpoints")
    with pytest.raises(UserError, match=r"holds a finished model in final/ but no checkpoint"):
        main(run_overrides(tiny_data, run, "train.max_steps=4", "optim.lr=0.5"))
    assert (run / "final" / "model.safetensors").read_bytes() == (finished / "final" / "model.safetensors").read_bytes()


def test_a_shorter_run_is_a_change_of_its_schedule(tiny_data, tmp_path):
    run = tmp_path / "run"
    args = run_overrides(tiny_data, run, "train.max_steps=8", "checkpoint.every=2")
    killed = run_module("slm_assist.train", args, env={"SLM_ASSIST_FAULT": "kill_after_checkpoint:4"})
    assert killed.returncode == -9
    with pytest.raises(UserError, match=r"train\.max_steps: 8 there, 6 here"):
        main(run_overrides(tiny_data, run, "train.max_steps=6", "checkpoint.every=2"))


def test_starting_over_drops_the_old_run_before_anything_else(tiny_data, finished, tmp_path):
    """checkpoint.resume=false, killed before its first checkpoint: the old run is gone, so the next launch can
    never resume it as if it were the new one."""
    run = _copy(finished, tmp_path)
    args = run_overrides(tiny_data, run, "train.max_steps=4", "checkpoint.every=2", "optim.lr=3e-3",
                         "checkpoint.resume=false")
    killed = run_module("slm_assist.train", args, env={"SLM_ASSIST_FAULT": "kill_before_commit:2"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert "removed the previous run's 2 checkpoint(s)" in killed.stdout
    assert RunDir(run).checkpoints() == []
    with pytest.raises(UserError, match=r"holds a finished model in final/ but no checkpoint"):
        main(args[:-1])  # resume=true: the old run's final/ is all there is; it is not taken for the new run
    main(args)
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]
    assert json.loads((run / "final" / "slm_assist.json").read_text())["run_config"]["optim"]["lr"] == 3e-3


def test_an_error_in_a_run_gives_its_run_dir_back(tiny_data, finished, tmp_path):
    run = _copy(finished, tmp_path)
    shutil.rmtree(run / "final")
    (run / "checkpoints" / "step_00000004" / "train_state_rank0.json").write_text("{}")  # damaged
    (run / "checkpoints" / "step_00000002" / "train_state_rank0.json").write_text("{}")
    for _ in range(2):  # the same command again: the same error, not a silent start from scratch
        with pytest.raises(UserError, match=r"no intact checkpoint is left to resume \(step_00000004: "
                                            r"train_state_rank0\.json does not match its checksum; step_00000002"):
            main(_args(tiny_data, run))
    code = f"from slm_assist.core.run_dir import RunDir; RunDir({str(run)!r}).lock()"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)  # not held by this process any more


def test_a_weight_decay_override_applies_from_zero(tiny_data, tmp_path):
    from slm_assist.core.config import load_config, split_argv
    from slm_assist.salt.recipe import RunConfig, build_trainer

    run = tmp_path / "run"
    main(run_overrides(tiny_data, run, "train.max_steps=2", "checkpoint.every=2", "optim.weight_decay=0.0"))
    path, overrides = split_argv(run_overrides(tiny_data, run, "train.max_steps=3", "optim.weight_decay=0.1",
                                               "checkpoint.allow_changes=[optim.weight_decay]"), "")
    trainer = build_trainer(load_config(RunConfig, path, overrides))
    trainer.fit()
    groups = trainer.engine.lr_scheduler.optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]


def test_settings_that_only_look_like_paths_are_not_inputs(tiny_data, tmp_path, monkeypatch):
    """A working directory holding files named like setting values (cosine, auto): they are values, not inputs."""
    monkeypatch.chdir(tmp_path)
    for name in ("cosine", "auto", "none", "llama"):
        Path(name).write_text("not an input\n")
    run = tmp_path / "run"
    main(run_overrides(tiny_data, run, "train.max_steps=1", "checkpoint.every=0"))
    meta = json.loads((run / "final" / "slm_assist.json").read_text())
    assert meta["run_config"]["schedule"]["kind"] == "cosine" and set(meta["inputs"]) == {"data.path"}
    Path("cosine").write_text("changed\n")
    main(run_overrides(tiny_data, run, "train.max_steps=2", "checkpoint.every=0"))  # extended, nothing refused


def test_world_size_is_compared_as_a_launch_setting():
    from slm_assist.core.relaunch import compare_launch
    from slm_assist.training.checkpoint import RELAUNCH_RULES

    old = {"train": {"max_steps": 4}, "launch": {"world_size": 1}}
    new = {"train": {"max_steps": 4}, "launch": {"world_size": 2}}
    assert compare_launch(old, {}, new, {}, RELAUNCH_RULES, "x", "resume") == [
        {"key": "launch.world_size", "was": 1, "now": 2, "how": "accepted"}]


def test_a_full_disk_while_exporting_is_one_error_and_keeps_final(tiny_data, finished, tmp_path, monkeypatch):
    from safetensors import SafetensorError

    from slm_assist.training import trainer

    run = _copy(finished, tmp_path)
    before = _snapshot(run / "final")

    def full(*a, **k):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No "
                              "space left on device\" })")

    monkeypatch.setattr(trainer, "write_model_dir", full)
    with pytest.raises(UserError, match=r"no space left on .* while writing run_dir/final=.*final was left as it was"):
        main(_args(tiny_data, run, "train.max_steps=5"))
    assert _snapshot(run / "final") == before


def test_compress_checks_a_stage_against_its_newest_readable_record(compressed, tiny_data, tiny_slm, tmp_path):
    """The record of a finished stage's newest checkpoint unreadable: the relaunch compares with what is left
    (nothing here) instead of stopping on it, as a training resume does."""
    from slm_assist.compress.__main__ import main as compress
    from slm_assist.core.run_dir import RECORD

    (compressed / "gd" / "checkpoints" / "step_00000002" / RECORD).write_text("{not json")
    compress(_compress(tmp_path, tiny_data, tiny_slm))


def test_a_score_cache_made_for_other_rows_under_the_same_path_is_another_run(tiny_data, tiny_slm, tmp_path):
    import numpy as np

    from data_tools.score import ScoreConfig, Scorer
    from slm_assist.core.config import load_config

    index = tmp_path / "index.npy"
    identity = []
    for rows in (np.arange(0, 100), np.arange(0, 10)):
        np.save(index, rows)
        cfg = load_config(ScoreConfig, REPO / "configs/demo/score.yaml",
                          [f"model={tiny_slm}", f"data={tiny_data}", f"out_dir={tmp_path / 'out'}",
                           "cache.mode=top_k", "cache.k=4", f"cache.indices={index}"])
        identity.append(Scorer(cfg).output.identity)
    assert identity[0]["cache"] == identity[1]["cache"] and identity[0]["cache_rows"] != identity[1]["cache_rows"]
