"""Trainer: exact resume after kill -9, atomic checkpoints, DeepSpeed vs plain AdamW, multi-process, NaN guard,
HF export. Runs in-process where it can (fast), in subprocesses where a kill or a launcher is the point."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from slm_assist.core import dist
from slm_assist.core.errors import UserError
from slm_assist.core.faults import FAULT_ENV
from slm_assist.core.run_dir import RunDir, read_metrics
from slm_assist.train import main
from slm_assist.training.objective import CausalLMObjective
from slm_assist.training.trainer import NonFiniteLossError

from .conftest import REPO, TINY_MODEL, run_module, run_overrides

pytestmark = pytest.mark.slow

DETERMINISTIC_KEYS = ("loss", "ce", "val_loss", "lr", "grad_norm", "tokens")


def _losses(run_dir):
    return [{k: r.get(k) for k in ("step", *DETERMINISTIC_KEYS)} for r in read_metrics(run_dir)]


def _weights(run_dir):
    return load_file(str(run_dir / "final" / "model.safetensors"))


def _ckpt_names(run_dir):
    root = run_dir / "checkpoints"
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


@pytest.fixture(scope="module")
def straight_run(tiny_data, tmp_path_factory):
    """Run A: 8 steps straight, checkpoint every 4."""
    run = tmp_path_factory.mktemp("runs") / "A"
    main(run_overrides(tiny_data, run, "train.max_steps=8", "checkpoint.every=4"))
    return run


def test_resume_after_sigkill_is_bit_exact(tiny_data, straight_run, tmp_path, capsys):
    run_b = tmp_path / "B"
    args = run_overrides(tiny_data, run_b, "train.max_steps=8", "checkpoint.every=4")
    killed = run_module("slm_assist.train", args, env={FAULT_ENV: "kill_after_checkpoint:4"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert _ckpt_names(run_b) == ["step_00000004"]
    assert not (run_b / "final").exists()

    # Other seeds on resume (allowed explicitly): a run that silently restarted from scratch would diverge from A
    # here; the model, optimizer, data position and RNG must all come from the checkpoint.
    main([*args, "seed=999", "data.seed=999", "checkpoint.allow_changes=[seed, data.seed]"])
    assert "resumed from" in capsys.readouterr().out
    history = json.loads((run_b / "final" / "slm_assist.json").read_text())["history"]
    assert history == [{"step": 4, "changes": [{"key": "data.seed", "was": 0, "now": 999, "how": "override"},
                                               {"key": "seed", "was": 0, "now": 999, "how": "override"}]}]
    a, b = _weights(straight_run), _weights(run_b)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _losses(run_b) == _losses(straight_run)
    assert [r["step"] for r in read_metrics(run_b)] == list(range(1, 9))


def test_kill_during_checkpoint_write_leaves_previous_one(tiny_data, tmp_path):
    run = tmp_path / "C"
    args = run_overrides(tiny_data, run, "train.max_steps=4", "checkpoint.every=2", "checkpoint.keep_last=5")
    killed = run_module("slm_assist.train", args, env={FAULT_ENV: "kill_before_commit:4"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert _ckpt_names(run) == [".tmp-step_00000004", "step_00000002"]
    assert RunDir(run).checkpoints()[-1].name == "step_00000002"  # the partial one is ignored

    main(args)
    assert _ckpt_names(run) == ["step_00000002", "step_00000004"]
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]


def test_keep_last_prunes_old_checkpoints(tiny_data, tmp_path):
    run = tmp_path / "K"
    main(run_overrides(tiny_data, run, "train.max_steps=6", "checkpoint.every=1", "checkpoint.keep_last=2"))
    assert _ckpt_names(run) == ["step_00000005", "step_00000006"]


@pytest.mark.parametrize("first_bad, kept", [(2, r"the last good checkpoint is .*step_00000002\."),
                                              (0, r"no checkpoint had been written yet\.")])
def test_nan_loss_stops_without_checkpoint(tiny_data, tmp_path, monkeypatch, first_bad, kept):
    original = CausalLMObjective.__call__

    def poisoned(self, model, batch, step):
        loss, metrics = original(self, model, batch, step)
        return (loss * float("nan"), metrics) if step >= first_bad else (loss, metrics)

    monkeypatch.setattr(CausalLMObjective, "__call__", poisoned)
    run = tmp_path / "N"
    with pytest.raises(NonFiniteLossError, match=rf"non-finite loss \(nan\) at step {first_bad + 1}.*{kept}"):
        main(run_overrides(tiny_data, run, "train.max_steps=6", "checkpoint.every=2"))
    assert _ckpt_names(run) == (["step_00000002"] if first_bad == 2 else [])
    assert not (run / "final").exists()
    assert isinstance(NonFiniteLossError("x"), UserError)  # so the CLI exits non-zero with the message


def test_a_damaged_checkpoint_is_set_aside_and_the_previous_one_resumed(tiny_data, straight_run, tmp_path, capsys):
    """64 flipped bytes inside a tensor of the newest checkpoint: caught by its checksums, moved aside (kept), and
    the run resumes from the one before, with the losses of the straight run."""
    run = tmp_path / "damaged"
    shutil.copytree(straight_run, run)
    shutil.rmtree(run / "final")
    states = run / "checkpoints" / "step_00000008" / "mp_rank_00_model_states.pt"
    blob = bytearray(states.read_bytes())
    blob[len(blob) // 2: len(blob) // 2 + 64] = bytes(b ^ 0xFF for b in blob[len(blob) // 2: len(blob) // 2 + 64])
    states.write_bytes(bytes(blob))
    main(run_overrides(tiny_data, run, "train.max_steps=8", "checkpoint.every=4"))
    out = capsys.readouterr().out
    assert "step_00000008 is damaged (mp_rank_00_model_states.pt does not match its checksum)" in out
    assert "resumed from" in out and "step_00000004" in out
    assert (run / "checkpoints" / "damaged-step_00000008" / "mp_rank_00_model_states.pt").read_bytes() == bytes(blob)
    assert _losses(run) == _losses(straight_run)
    # the only checkpoint damaged too: nothing intact is left, which is an error, not a silent restart
    only = tmp_path / "only"
    main(run_overrides(tiny_data, only, "train.max_steps=2", "checkpoint.every=0"))
    (only / "checkpoints" / "step_00000002" / "train_state_rank0.json").write_text("{}")
    with pytest.raises(UserError, match=r"no intact checkpoint is left.*checkpoint\.resume=false"):
        main(run_overrides(tiny_data, only, "train.max_steps=3", "checkpoint.every=0"))


def test_tokenizer_mismatch_with_manifest_is_an_error(tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["tokenizer_fingerprint"] = "0" * 16
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="does not match the manifest's tokenizer_fingerprint"):
        main(run_overrides(data, tmp_path / "r", "train.max_steps=1"))


def test_export_loads_and_generates(straight_run, tiny_data):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = straight_run / "final"
    assert (final / "model.safetensors").is_file() and (final / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(str(final))
    tok = AutoTokenizer.from_pretrained(str(final))
    ids = tok("The Python tutorial", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=5, do_sample=False, min_new_tokens=5)
    assert out.shape == (1, ids.shape[1] + 5)
    # the exported weights are the trained ones: validation loss recomputed from the export matches the log
    from slm_assist.core.dataset import load_split
    from slm_assist.training.batches import validation_batches
    from slm_assist.training.objective import eval_loss

    batches = validation_batches(load_split(tiny_data, "validation"), 4, 2, 0, 1)
    total, count = eval_loss(model.to(torch.bfloat16), batches, len(tok), torch.device("cpu"))
    assert total / count == pytest.approx(read_metrics(straight_run)[-1]["val_loss"], abs=2e-2)


def test_logged_val_loss_is_the_eval_loss_on_the_real_vocabulary(tiny_data, tmp_path):
    """val_loss in metrics.jsonl is `slm_assist.eval`'s loss of the exported model on the same validation rows, also
    with a padded vocabulary (400 tokens in 448 output rows), where a softmax over the padded rows differs."""
    from slm_assist.core.dataset import load_split
    from slm_assist.eval import dataset_loss, load_model

    run = tmp_path / "padded"
    main(run_overrides(tiny_data, run, "train.max_steps=4", "checkpoint.every=0", "model.pad_vocab_to=64",
                       "train.dtype=fp32"))
    logged = read_metrics(run)[-1]["val_loss"]
    model, tok = load_model(run / "final", torch.device("cpu"))
    assert (len(tok), model.get_output_embeddings().weight.shape[0]) == (400, 448)
    rows = 2 * 4  # train.eval_batches x train.micro_batch_size (run_overrides), one rank: the first 8 rows
    tol = 1e-5
    assert dataset_loss(model, tok, tiny_data, batch_size=4, max_rows=rows)["loss"] == pytest.approx(logged, rel=tol)
    ids = torch.tensor(load_split(tiny_data, "validation")[:rows]["input_ids"])
    with torch.no_grad():
        padded = model(input_ids=ids, labels=ids).loss.item()  # the old val_loss: HF's softmax over all 448 rows
    assert padded - logged > 100 * tol * logged


def test_saved_config_and_metrics(straight_run):
    from slm_assist.core.config import load_config
    from slm_assist.salt.recipe import RunConfig

    cfg = load_config(RunConfig, straight_run / "config.yaml")
    assert cfg.train.max_steps == 8 and cfg.model.hidden_size == 32
    rec = read_metrics(straight_run)[-1]
    assert {"loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "step"} <= rec.keys()
    assert rec["tokens_per_s"] > 0 and rec["grad_norm"] > 0
    assert list((straight_run / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("stage", [0, 2])
def test_deepspeed_step_matches_plain_adamw(stage):
    from transformers import LlamaConfig, LlamaForCausalLM

    from slm_assist.training.engine import deepspeed_config, initialize
    from slm_assist.training.optim import OptimConfig, ScheduleConfig, lr_factor, param_groups

    dist.init()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64, max_position_embeddings=32))
    ref, init = copy.deepcopy(model), copy.deepcopy(model)
    # eps=1e-3, not 1e-8: Adam moves a weight by lr·m/(√v + eps), so a rounding-level difference δ in a small
    # gradient g (the clip factor's last bit, then the weights' last bits in the next forward) moves it by ~lr·δ/|g|:
    # with eps=1e-8 up to the whole atol below on some seeds. eps bounds that by lr·δ/eps, and makes the step
    # depend on the clipping, eps and gradient scale that DeepSpeed must pass on, not only on the gradient's sign.
    optim = OptimConfig(lr=1e-2, grad_clip=0.5, eps=1e-3)
    sched = ScheduleConfig(kind="cosine", warmup_steps=1)
    ds_cfg = deepspeed_config(micro_batch=4, grad_accum=1, world=1, dtype="fp32", zero_stage=stage, grad_clip=0.5)
    engine = initialize(model, ds_cfg, optim, sched, total_steps=4, device=torch.device("cpu"))
    opt = torch.optim.AdamW(param_groups(ref, optim.weight_decay), lr=optim.lr, betas=(optim.beta1, optim.beta2),
                            eps=optim.eps)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, 4, sched))
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        ids = torch.randint(0, 97, (4, 16), generator=g)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        ref_loss = ref(input_ids=ids, labels=ids).loss
        ref_loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        opt.step()
        lr_sched.step()
        opt.zero_grad()
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    for (name, p), q in zip(engine.module.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6, msg=name)
    moved = max((p.detach() - q.detach()).abs().max().item() for p, q in zip(ref.parameters(), init.parameters()))
    assert moved > 1e-3  # the comparison is between trained weights, not untouched copies


def test_two_process_torchrun_zero3(tiny_data, tmp_path):
    run = tmp_path / "ddp"
    args = run_overrides(tiny_data, run, "train.max_steps=12", "checkpoint.every=6", "train.zero_stage=3",
                         "optim.lr=0.01", "train.micro_batch_size=2")
    res = run_module("torch.distributed.run", ["--nproc_per_node", "2", "-m", "slm_assist.train", *args])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "world=2" in res.stdout
    recs = read_metrics(run)
    assert recs[-1]["loss"] < recs[0]["loss"] - 0.5
    assert sorted((run / "checkpoints" / "step_00000012").glob("train_state_rank*.json"))[-1].name == "train_state_rank1.json"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(run / "final"))  # ZeRO-3 export gathered full weights
    assert model.get_input_embeddings().weight.shape[0] == 400


def test_cli_bad_override_exits_2():
    res = run_module("slm_assist.train", ["configs/demo/llm.yaml", "train.max_steps=abc"])
    assert res.returncode == 2
    assert "train.max_steps: expected an integer, got 'abc'" in res.stderr and "Traceback" not in res.stderr
    res = run_module("slm_assist.train", [str(REPO / "configs/demo/llm.yaml"), "data.path=/nonexistent", *TINY_MODEL])
    assert res.returncode == 2 and "/nonexistent: no manifest.json" in res.stderr


def test_grad_accumulation_matches_a_bigger_micro_batch(tiny_data, tmp_path):
    """4 sequences in one micro-batch == 2 micro-batches of 2 (same global batch, same sequences)."""
    # optim.eps=1e-3: the two sum the gradient in another order, and Adam turns a rounding difference δ in a small
    # gradient g into a weight difference ~lr·δ/|g| (with eps=1e-8, up to 1/7 of atol on some seeds); eps bounds
    # it by lr·δ/eps (test_deepspeed_step_matches_plain_adamw)
    common = ("train.max_steps=3", "train.dtype=fp32", "checkpoint.every=0", "optim.eps=1e-3")
    main(run_overrides(tiny_data, tmp_path / "mb4", *common, "train.micro_batch_size=4"))
    main(run_overrides(tiny_data, tmp_path / "ga2", *common, "train.micro_batch_size=2", "train.grad_accum=2"))
    a, b = _weights(tmp_path / "mb4"), _weights(tmp_path / "ga2")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    assert [r["loss"] for r in read_metrics(tmp_path / "ga2")] == pytest.approx(
        [r["loss"] for r in read_metrics(tmp_path / "mb4")], rel=1e-5)


def test_activation_checkpointing_keeps_the_numerics(tiny_data, tmp_path):
    common = ("train.max_steps=3", "train.dtype=fp32", "checkpoint.every=0")
    main(run_overrides(tiny_data, tmp_path / "plain", *common))
    args = run_overrides(tiny_data, tmp_path / "ckpt", *common, "train.activation_checkpointing=true")
    main(args)
    assert _losses(tmp_path / "ckpt") == _losses(tmp_path / "plain")
    from slm_assist.core.config import load_config, split_argv
    from slm_assist.salt.recipe import RunConfig, build_trainer

    path, overrides = split_argv(args, "")
    assert build_trainer(load_config(RunConfig, path, overrides)).engine.module.is_activation_checkpointing


def test_start_from_pretrained_directory(tiny_data, straight_run, tmp_path):
    """model.pretrained loads the exported weights: the first validation loss is the export's, not random init."""
    run = tmp_path / "cont"
    main(run_overrides(tiny_data, run, f"model.pretrained={straight_run / 'final'}", "train.max_steps=1",
                       "optim.lr=1e-9", "schedule.warmup_steps=0", "schedule.kind=constant"))
    assert read_metrics(run)[-1]["val_loss"] == pytest.approx(read_metrics(straight_run)[-1]["val_loss"], abs=2e-2)
    with pytest.raises(UserError, match=r"model\.pretrained=.*: not a save_pretrained model directory"):
        main(run_overrides(tiny_data, tmp_path / "x", f"model.pretrained={tmp_path}", "train.max_steps=1"))


def test_mfu_is_logged_from_model_flops_and_throughput(tiny_data, tmp_path):
    from transformers import AutoModelForCausalLM

    from slm_assist.training.models import flops_per_token

    run = tmp_path / "mfu"
    main(run_overrides(tiny_data, run, "train.max_steps=2", "checkpoint.every=0", "train.peak_tflops=1e-6"))
    fpt = flops_per_token(AutoModelForCausalLM.from_pretrained(str(run / "final")), 32)
    for r in read_metrics(run):
        assert r["mfu"] == pytest.approx(fpt * r["tokens_per_s"] / 1e6, rel=1e-9)


def test_patience_stops_early_and_a_rerun_stays_stopped(tiny_data, tmp_path, monkeypatch):
    from slm_assist.training.trainer import Trainer

    script = iter([5.0, 4.0, 4.5, 4.2, 3.0, 2.0])
    monkeypatch.setattr(Trainer, "evaluate", lambda self: next(script))
    run = tmp_path / "P"
    args = run_overrides(tiny_data, run, "train.max_steps=8", "train.eval_every=1", "train.patience=2",
                         "checkpoint.every=0")
    assert main(args)["step"] == 4  # 4.5 and 4.2 do not beat 4.0
    assert [r["step"] for r in read_metrics(run) if r.get("early_stop")] == [4]
    assert json.loads((run / "final" / "slm_assist.json").read_text())["step"] == 4
    assert main(args)["step"] == 4  # resumed from the final checkpoint: still stopped
    from data_tools.pack import PrepareConfig, prepare
    from slm_assist.core.config import load_config

    no_val = tmp_path / "no_val"
    prepare(load_config(PrepareConfig, None, [f"out_dir={no_val}", f"tokenizer.path={tiny_data / 'tokenizer'}",
                                              "corpus.max_docs=20", "pack.seq_len=32", "pack.val_fraction=0"]))
    with pytest.raises(UserError, match=r"train\.patience=2 needs a validation split"):
        main(run_overrides(no_val, tmp_path / "Q", "train.patience=2", "train.max_steps=2"))


def test_compiled_layers_train_like_eager_without_graph_breaks(tiny_data, tmp_path):
    """train.compile=true compiles each decoder layer: the same losses as eager (fp32, so the kernels' rounding is
    the only difference), no graph break, one compiled frame for training and one for evaluation (grad mode) that
    every layer reuses (a KV-cache update would recompile per layer until dynamo falls back to eager), and an
    export with the usual state-dict keys."""
    from torch._dynamo.utils import counters

    from slm_assist.core.errors import ConfigError

    common = ("train.max_steps=2", "train.log_every=1", "checkpoint.every=0", "train.dtype=fp32")
    main(run_overrides(tiny_data, tmp_path / "eager", *common, "train.compile=false"))
    counters.clear()
    torch._dynamo.reset()
    main(run_overrides(tiny_data, tmp_path / "compiled", *common, "train.compile=true"))
    assert not counters["graph_break"], dict(counters["graph_break"])
    layers = json.loads((tmp_path / "compiled" / "final" / "config.json").read_text())["num_hidden_layers"]
    assert layers >= 2 and counters["frames"]["total"] == 2, (layers, dict(counters["frames"]))
    assert counters["stats"]["unique_graphs"] > 0  # something was compiled
    eager, compiled = (read_metrics(tmp_path / r) for r in ("eager", "compiled"))
    assert len(eager) == len(compiled) == 2
    for a, b in zip(eager, compiled):
        for k in ("loss", "val_loss"):
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-4), k
    keys = load_file(str(tmp_path / "compiled" / "final" / "model.safetensors")).keys()
    assert keys == load_file(str(tmp_path / "eager" / "final" / "model.safetensors")).keys()
    with pytest.raises(ConfigError, match="compile"):
        main(run_overrides(tiny_data, tmp_path / "z3", "train.compile=true", "train.zero_stage=3"))
