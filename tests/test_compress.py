"""Compression building blocks: the layer map, the latent losses against hand references, and the stage
objective (its teacher frozen, its projections trained as heads)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from slm_assist.compress.latent import attention_kl, layer_map
from slm_assist.compress.objective import CompressObjective, LossConfig
from slm_assist.core.config import load_config
from slm_assist.core.errors import ConfigError, UserError
from slm_assist.core.model_dir import ModelDir
from slm_assist.kd.latent import Projections, hidden_loss
from slm_assist.training.batches import Batch
from slm_assist.training.checkpoint import read_deepspeed_file


def _llama(layers: int, hidden: int, heads: int, kv_heads: int | None = None, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=50, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads or heads, max_position_embeddings=32,
                      attn_implementation="eager")
    return LlamaForCausalLM(cfg).eval()


def _sharpen(*models, factor: float = 10.0) -> None:
    """Scale the query and key weights (the attention logits by factor²): random init gives almost uniform
    attention rows, between which the KL (~3e-5) is a difference of nearly equal numbers whose fp32 value depends
    on the CPU's kernels; at factor 10 it is ~0.2, and different heads differ visibly."""
    with torch.no_grad():
        for model in models:
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight.mul_(factor)
                layer.self_attn.k_proj.weight.mul_(factor)


def test_layer_map_uniform_explicit_and_errors():
    assert layer_map(2, 4) == [(1, 2), (2, 4)]
    assert layer_map(3, 4) == [(1, 1), (2, 3), (3, 4)]
    assert layer_map(4, 4, embeddings=True) == [(0, 0), (1, 1), (2, 2), (3, 3), (4, 4)]
    assert layer_map(2, 6, [3, 6]) == [(1, 3), (2, 6)]
    with pytest.raises(UserError, match=r"loss\.layer_map=\[3, 7\]: teacher layer 7 is outside 1\.\.6"):
        layer_map(2, 6, [3, 7], field="loss.layer_map")
    with pytest.raises(UserError, match=r"needs one teacher layer per student layer \(3 of them\)"):
        layer_map(3, 6, [3, 6])


def test_hidden_loss_is_zero_only_at_matching_states():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    proj = Projections([(1, 1)], 8, 8)
    for kind in ("cosine", "mse"):
        assert hidden_loss(proj(1, x), x, kind).item() == pytest.approx(0.0, abs=1e-6)
        assert hidden_loss(x, torch.randn(2, 5, 8), kind).item() > 0.1
    assert hidden_loss(x, 3.0 * x, "cosine").item() == pytest.approx(0.0, abs=1e-6)  # direction only
    assert hidden_loss(x, 3.0 * x, "mse").item() == pytest.approx(4 / 9, rel=1e-5)  # (x - 3x)^2 / (3x)^2
    assert hidden_loss(10 * x, 30.0 * x, "mse").item() == pytest.approx(4 / 9, rel=1e-5)  # free of the scale
    y = torch.randn(2, 5, 8)
    cos = torch.nn.functional.cosine_similarity(x, y, dim=-1)
    assert hidden_loss(x, y, "cosine").item() == pytest.approx((1 - cos).mean().item(), rel=1e-6)
    wide = Projections([(1, 2), (2, 4)], 8, 12)
    assert not wide.identity and wide(2, x).shape == (2, 5, 12)


def _causal_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Rows [..., T, T] of attention probabilities: exactly 0 on keys after the query, as in a causal model."""
    T = logits.shape[-1]
    return logits.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)


def _reference_attention_kl(s: torch.Tensor, t: torch.Tensor) -> tuple[float, float]:
    """KL(mean of each student head's group of teacher heads ‖ student), summed over each row's causal keys and
    averaged over rows and heads, in float64 from the same fp32 inputs; and the absolute tolerance of an fp32
    computation of it: per row (T + 4)·eps·Σ_k(|p log p| + |p log s| + p), T for the sum over keys and 4 for the
    logs, products, difference and the teacher group mean (its rounding of p moves a term by ≤ eps·p·|log p/s + 1|),
    and n·eps·|row KL| for the mean over the n rows."""
    B, hs, T, _ = s.shape
    group = t.shape[1] // hs
    assert (s.triu(1) == 0).all() and (t.triu(1) == 0).all()  # the causal zeros the code must handle
    s64, t64 = s.double(), t.double()
    rows, mags = [], []
    for b in range(B):
        for h in range(hs):
            tg = t64[b, group * h : group * (h + 1)].mean(0)  # teacher heads h·g .. h·g + g - 1
            for q in range(T):
                p, log_r = tg[q, : q + 1], s64[b, h, q, : q + 1].log()  # keys after q: 0·log 0 = 0, left out
                rows.append((p * (p.log() - log_r)).sum().item())
                mags.append(((p * p.log()).abs() + (p * log_r).abs() + p).sum().item())
    n, eps = len(rows), torch.finfo(torch.float32).eps
    want = sum(rows) / n
    return want, eps * ((T + 4) * sum(mags) / n + n * sum(abs(r) for r in rows) / n)


def test_attention_kl_matches_a_reference_from_full_probabilities():
    # Well-conditioned inputs: random causal attentions that really differ (KL ~ 1 per row). Near-uniform rows,
    # as a random-init model gives, make the KL a difference of nearly equal numbers (~1e-5) whose fp32 value
    # depends on the CPU's kernels.
    g = torch.Generator().manual_seed(0)
    s = _causal_softmax(2.0 * torch.randn(2, 2, 9, 9, generator=g))  # [B, 2 student heads, T, T]
    t = _causal_softmax(2.0 * torch.randn(2, 6, 9, 9, generator=g))  # 6 teacher heads: groups of 3
    want, tol = _reference_attention_kl(s, t)
    assert 0.2 < want < 2 and tol < 1e-4 * want
    assert attention_kl(s, t).item() == pytest.approx(want, abs=tol)
    # each student head learns the mean of a contiguous group, not any other grouping of the teacher's heads
    other = t.unflatten(1, (3, 2)).transpose(1, 2).flatten(1, 2)  # heads 0, 2, 4, 1, 3, 5
    assert abs(_reference_attention_kl(s, other)[0] - want) > 100 * tol
    # the student as its own teacher: 0 up to fp32 rounding of the row entropies (xlogy vs log of the clamp)
    assert attention_kl(s, s).item() == pytest.approx(0.0, abs=_reference_attention_kl(s, s)[1])

    # real attentions, sharpened: a 2-head student, a 4-head teacher with 2 key-value heads
    student, teacher = _llama(2, 16, 2, seed=0), _llama(4, 32, 4, kv_heads=2, seed=1)
    _sharpen(student, teacher)
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        s = student(input_ids=ids, output_attentions=True).attentions[1]  # [B, 2, T, T]
        t = teacher(input_ids=ids, output_attentions=True).attentions[3]  # [B, 4, T, T]
    want, tol = _reference_attention_kl(s, t)
    assert 0.05 < want < 5 and tol < 1e-4 * want
    assert attention_kl(s, t).item() == pytest.approx(want, abs=tol)
    with pytest.raises(UserError, match="3 attention heads cannot be grouped onto the student's 2"):
        attention_kl(s, t[:, :3])


def test_loss_config_rejects_settings_without_effect():
    with pytest.raises(ConfigError, match=r"tau=2\.0 has no effect with kd=0"):
        load_config(LossConfig, None, ["ce=1", "tau=2"])
    with pytest.raises(ConfigError, match=r"layer_map=\[1\] has no effect without a latent loss"):
        load_config(LossConfig, None, ["kd=1", "layer_map=[1]"])
    with pytest.raises(ConfigError, match="at least one weight > 0"):
        load_config(LossConfig, None, [])


def test_objective_with_the_teacher_as_student_has_zero_distillation_terms():
    teacher = _llama(2, 16, 2)
    student = copy.deepcopy(teacher).train()
    cfg = load_config(LossConfig, None, ["ce=0.5", "kd=1", "hidden=1", "attention=1", "map_embeddings=true"])
    obj = CompressObjective(cfg, teacher.requires_grad_(False), student.config, vocab=50)
    assert obj.attn_implementation == "eager" and obj.trainable_modules() == []  # equal widths: no projection
    ids = torch.randint(0, 50, (2, 9))
    loss, m = obj(student, Batch(ids), step=0)
    assert m["kd"].item() == pytest.approx(0.0, abs=1e-5)
    assert m["hidden"].item() == pytest.approx(0.0, abs=1e-5)
    assert m["attention"].item() == pytest.approx(0.0, abs=1e-5)
    assert loss.item() == pytest.approx(0.5 * m["ce"].item(), rel=1e-4)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())  # the teacher is never trained
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)


def test_a_copied_or_pruned_student_learns_each_block_from_its_source_block():
    teacher, student = _llama(4, 16, 2), _llama(2, 16, 2, seed=3)
    cfg = load_config(LossConfig, None, ["hidden=1"])
    assert CompressObjective(cfg, teacher, student.config, 50, default_map=[1, 3]).pairs == [(1, 1), (2, 3)]
    assert CompressObjective(cfg, teacher, student.config, 50).pairs == [(1, 2), (2, 4)]  # uniform otherwise
    explicit = load_config(LossConfig, None, ["hidden=1", "layer_map=[2, 3]"])
    assert CompressObjective(explicit, teacher, student.config, 50, default_map=[1, 3]).pairs == [(1, 2), (2, 3)]

    wide = _llama(2, 16, 4)  # 4 teacher heads; a pruned 2-head student kept heads 3, 0 of block 1 and 1, 2 of 2
    _sharpen(wide, student)  # attention KLs ~0.2, not ~2e-5: heads, and so a wrong head map, differ by ~10%
    att = load_config(LossConfig, None, ["attention=1"])
    obj = CompressObjective(att, wide, student.config, 50, default_map=[1, 2], head_map=[[3, 0], [1, 2]])
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        _, m = obj(student, Batch(ids), step=0)
        s_att = student(input_ids=ids, output_attentions=True).attentions
        t_att = wide(input_ids=ids, output_attentions=True).attentions
    (kl1, tol1), (kl2, tol2) = (_reference_attention_kl(s_att[0], t_att[0][:, [3, 0]]),
                                _reference_attention_kl(s_att[1], t_att[1][:, [1, 2]]))
    assert m["attention"].item() == pytest.approx((kl1 + kl2) / 2, abs=(tol1 + tol2) / 2)


def test_objective_projections_are_heads_and_latent_scaling_matches_the_logit_term():
    teacher, student = _llama(4, 32, 4), _llama(2, 16, 2, seed=3).train()
    cfg = load_config(LossConfig, None, ["ce=1", "hidden=1", "scale_latent=true"])
    obj = CompressObjective(cfg, teacher.requires_grad_(False), student.config, vocab=50)
    (heads,) = obj.trainable_modules()
    assert sorted(heads.maps) == ["1", "2"] and heads.maps["1"].weight.shape == (32, 16)
    loss, m = obj(student, Batch(torch.randint(0, 50, (2, 9))), step=0)
    assert loss.item() == pytest.approx(2 * m["ce"].item(), rel=1e-4)  # latent rescaled to the CE term
    loss.backward()
    assert heads.maps["2"].weight.grad is not None


# ---- inits and stages -------------------------------------------------------------------------------------

def test_layers_init_keeping_every_block_reproduces_the_teacher_exactly():
    from slm_assist.compress.init import InitConfig, chosen_layers, copy_layers

    teacher = _llama(4, 16, 2)
    ids = torch.randint(0, 50, (2, 9))
    same = copy_layers(teacher, [1, 2, 3, 4]).eval()
    with torch.no_grad():
        assert torch.equal(same(input_ids=ids).logits, teacher(input_ids=ids).logits)
    half = copy_layers(teacher, chosen_layers(InitConfig(kind="layers"), 4))  # every 2nd, ending at the last
    assert half.config.num_hidden_layers == 2
    assert torch.equal(half.model.layers[1].mlp.up_proj.weight, teacher.model.layers[3].mlp.up_proj.weight)
    assert torch.equal(half.model.layers[0].self_attn.q_proj.weight, teacher.model.layers[1].self_attn.q_proj.weight)
    with pytest.raises(UserError, match=r"init\.layers=\[1, 5\]: block 5 is outside 1\.\.4"):
        chosen_layers(InitConfig(kind="layers", layers=[1, 5]), 4)


STAGES_YAML = """
stages:
  - {name: finetune, trains: teacher, teacher: none, data: task, loss: {ce: 1.0}, max_steps: 2}
  - {name: gd, teacher: pretrained, data: general, loss: {hidden: 1.0}, max_steps: 2}
  - {name: tsd, teacher: finetuned, data: task, max_steps: 2,
     loss: {ce: 1.0, kd: 1.0, hidden: 1.0, attention: 0.5, map_embeddings: true}}
"""


@pytest.mark.slow
def test_stages_chain_skip_when_finished_and_export_only_the_student(tiny_data, tiny_slm, tmp_path, capsys):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from slm_assist.compress.__main__ import main

    (tmp_path / "c.yaml").write_text(STAGES_YAML)
    run = tmp_path / "run"
    args = [str(tmp_path / "c.yaml"), f"run_dir={run}", f"teacher={tiny_slm}", f"general_data={tiny_data}",
            f"task_data={tiny_data}", "model.hidden_size=16", "model.num_layers=1", "model.num_heads=2",
            "model.ffn_size=32", "model.max_position_embeddings=64", "model.pad_vocab_to=1", "train.dtype=fp32",
            "train.micro_batch_size=4", "train.eval_batches=1", "train.torch_threads=1", "checkpoint.every=0"]
    main(args)
    meta = {s: json.loads((run / s / "final" / "slm_assist.json").read_text()) for s in ("finetune", "gd", "tsd")}
    def start(stage):  # recorded relative to the stage's run directory: no absolute local path in the metadata
        recorded = meta[stage]["run_config"]["model"]["pretrained"]
        assert not Path(recorded).is_absolute()
        return (run / stage / recorded).resolve()

    assert start("finetune") == tiny_slm.resolve()  # the teacher is fine-tuned
    assert start("gd") == (run / "init").resolve()
    assert start("tsd") == (run / "gd" / "final").resolve()  # the student carries over
    assert [s["name"] for s in meta["tsd"]["stages"]] == ["gd", "tsd"]
    summary = meta["tsd"]["stages"][1]["summary"]
    assert "fine-tuned" not in summary and "teacher `finetune/final` (finetuned)" in summary
    assert str(tmp_path) not in json.dumps(meta)  # no absolute local path anywhere in what the model carries
    weights = load_file(str(run / "tsd" / "final" / "model.safetensors"))
    assert not any(k.startswith(("heads", "model.heads")) for k in weights)  # projections are not exported
    from slm_assist.report import run_summary

    # reports find the recipe by the name the run recorded: a stage is a compression stage, not "CE"
    assert meta["tsd"]["recipe"] == "compress"
    assert run_summary(run / "tsd")["recipe"] == "compress: compressed student, stage tsd of gd → tsd"
    assert run_summary(run / "finetune")["recipe"] == "compress: fine-tuned teacher, stage finetune of finetune"
    student = AutoModelForCausalLM.from_pretrained(str(run / "tsd" / "final"))
    assert student.config.hidden_size == 16 and student.config.num_hidden_layers == 1
    ckpt = run / "gd" / "checkpoints"
    saved = read_deepspeed_file(next(ckpt.glob("step_*/mp_rank_00_model_states.pt")))["module"]
    assert any(k.startswith("heads.") for k in saved)  # ...but trained and checkpointed with the student

    tsd_meta = run / "tsd" / "final" / "slm_assist.json"  # as if killed between the export and the stage record
    tsd_meta.write_text(json.dumps({**meta["tsd"], "stages": meta["tsd"]["stages"][:-1]}))
    before = {p: p.stat().st_mtime_ns for p in run.rglob("final/*") if p != tsd_meta}
    capsys.readouterr()
    main(args)
    out = capsys.readouterr().out
    assert all(f"[{s}] finished" in out for s in ("finetune", "gd", "tsd"))
    assert {p: p.stat().st_mtime_ns for p in run.rglob("final/*") if p != tsd_meta} == before
    assert [s["name"] for s in json.loads(tsd_meta.read_text())["stages"]] == ["gd", "tsd"]  # the record is back

    with pytest.raises(UserError, match=r"init/ was made with other settings \(shape\.ffn_size: 32 there, 48 here\)"):
        main([*args, "model.ffn_size=48"])
    (tmp_path / "c.yaml").write_text(STAGES_YAML.replace("max_steps: 2,\n", "max_steps: 3,\n"))
    with pytest.raises(UserError, match=r"stage 'tsd' \(.*\) finished with other settings \(config\.max_steps: 2 "
                                        r"there, 3 here\); delete"):
        main(args)


def test_compress_config_errors_name_the_stage():
    from slm_assist.compress.stages import CompressConfig

    with pytest.raises(ConfigError, match=r"stage 'ged' distils from the fine-tuned teacher, which no earlier stage"):
        load_config(CompressConfig, None, ["task_data=x", "stages=[{name: ged, teacher: finetuned}]"])
    with pytest.raises(ConfigError, match=r"stage 'finetune' fine-tunes the teacher, but finetuned_teacher=ft "
                                          r"already names one"):
        load_config(CompressConfig, None, ["task_data=x", "finetuned_teacher=ft"])
    shared = load_config(CompressConfig, None, ["finetuned_teacher=ft", "stages=[{name: ged, teacher: finetuned}]"])
    assert shared.stages[0].teacher == "finetuned"
    with pytest.raises(ConfigError, match=r"task_data: empty, but stage 'finetune' trains on the task data"):
        load_config(CompressConfig, None, [])
    with pytest.raises(ConfigError, match=r"stages\[0\]\.teacher: expected a teacher for kd/hidden/attention"):
        load_config(CompressConfig, None, ["stages=[{name: a, teacher: none, loss: {kd: 1}}]"])
    with pytest.raises(ConfigError, match=r"model\.hidden_size=64 has no effect with init\.kind=layers"):
        load_config(CompressConfig, None, ["task_data=x", "init.kind=layers", "model.hidden_size=64"])


def test_prune_keeping_everything_is_the_identity_and_pruning_keeps_the_important_units():
    from slm_assist.compress.prune import importance, prune

    teacher = _llama(4, 32, 4, kv_heads=2)
    batches = [torch.randint(0, 50, (2, 12)) for _ in range(3)]
    imp = importance(teacher, batches)
    assert imp.channels.shape == (32,) and imp.blocks.shape == (4,) and imp.heads[0].shape == (2,)
    assert imp.neurons[0].shape == (64,) and bool((imp.blocks > 0).all())
    whole = prune(teacher, imp, hidden=32, layers=4, heads=4, kv_heads=2, ffn=64)
    same = whole.model.eval()
    assert whole.blocks == [1, 2, 3, 4] and whole.heads == [[0, 1, 2, 3]] * 4 and whole.channels == list(range(32))
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        assert torch.equal(same(input_ids=ids).logits, teacher(input_ids=ids).logits)

    pruned = prune(teacher, imp, hidden=16, layers=2, heads=2, kv_heads=1, ffn=32)
    small, kept, heads = pruned.model, pruned.blocks, pruned.heads
    c = small.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size,
            c.head_dim) == (16, 2, 2, 1, 32, 8)
    keep_d = imp.channels.topk(16).indices.sort().values
    assert pruned.channels == keep_d.tolist()
    block = int(imp.blocks.topk(2).indices.sort().values[0])
    assert kept == [b + 1 for b in imp.blocks.topk(2).indices.sort().values.tolist()]
    group = int(imp.heads[block].argmax())
    assert heads[0] == [2 * group, 2 * group + 1]  # the student's two heads are that KV group's query heads
    neurons = imp.neurons[block].topk(32).indices.sort().values
    t, s = teacher.model.layers[block], small.model.layers[0]
    assert torch.equal(s.self_attn.k_proj.weight, t.self_attn.k_proj.weight[group * 8 : group * 8 + 8][:, keep_d])
    assert torch.equal(s.self_attn.q_proj.weight, t.self_attn.q_proj.weight[group * 16 : group * 16 + 16][:, keep_d])
    assert torch.equal(s.mlp.down_proj.weight, t.mlp.down_proj.weight[keep_d][:, neurons])
    assert torch.equal(small.model.embed_tokens.weight, teacher.model.embed_tokens.weight[:, keep_d])
    with torch.no_grad():
        assert torch.isfinite(small(input_ids=ids).logits).all()
    with pytest.raises(UserError, match=r"model\.ffn_size=128 must be in 1\.\.64 \(the teacher's\)"):
        prune(teacher, imp, hidden=16, layers=2, heads=2, kv_heads=1, ffn=128)
    with pytest.raises(UserError, match=r"model\.num_heads=3 must be model\.num_kv_heads=1 x the teacher's 2"):
        prune(teacher, imp, hidden=16, layers=2, heads=3, kv_heads=1, ffn=32)


ONE_STAGE = "stages:\n  - {name: gd, teacher: pretrained, data: general, loss: {hidden: 1.0, kd: 1.0}, max_steps: 1}\n"


def _one_stage_args(tmp_path, tiny_data, teacher, *extra):
    (tmp_path / "one.yaml").write_text(ONE_STAGE)
    return [str(tmp_path / "one.yaml"), f"run_dir={tmp_path / 'run'}", f"teacher={teacher}",
            f"general_data={tiny_data}", "train.dtype=fp32", "train.micro_batch_size=4", "train.eval_batches=1",
            "train.torch_threads=1", "checkpoint.every=0", *extra]


@pytest.mark.slow
@pytest.mark.parametrize("init", ["layers", "prune", "model"])
def test_every_init_feeds_the_first_stage(init, tiny_data, tiny_slm, tmp_path):
    from transformers import AutoModelForCausalLM

    from slm_assist.compress.__main__ import main

    extra = {"layers": ["init.kind=layers", "init.layers=[2]"],
             "prune": ["init.kind=prune", "init.calibration=16", "model.hidden_size=16", "model.num_layers=1",
                       "model.num_heads=1", "model.ffn_size=32"],
             # the SALT SLM's role: any model dir; and a teacher fine-tuned elsewhere
             "model": ["init.kind=model", f"init.path={tiny_slm}", f"finetuned_teacher={tiny_slm}",
                       "stages=[{name: gd, teacher: finetuned, loss: {kd: 1.0}, max_steps: 1}]"]}[init]
    main(_one_stage_args(tmp_path, tiny_data, tiny_slm, *extra))
    start = AutoModelForCausalLM.from_pretrained(str(tmp_path / "run" / "init"))
    teacher = AutoModelForCausalLM.from_pretrained(str(tiny_slm))
    shape = (start.config.hidden_size, start.config.num_hidden_layers)
    assert shape == {"layers": (32, 1), "prune": (16, 1), "model": (32, 2)}[init]
    if init == "layers":
        assert torch.equal(start.model.layers[0].mlp.up_proj.weight, teacher.model.layers[1].mlp.up_proj.weight)
    assert (tmp_path / "run" / "gd" / "final" / "model.safetensors").is_file()
    record = json.loads((tmp_path / "run" / "gd" / "final" / "slm_assist.json").read_text())["stages"][0]
    assert (tmp_path / "run" / "gd" / record["teacher"]).resolve() == tiny_slm.resolve()
    assert record["teacher_fingerprint"] == ModelDir(tiny_slm).fingerprint()
    assert record["config"]["teacher"] == ("finetuned" if init == "model" else "pretrained")


LATENT_STAGE = ("stages:\n  - {name: gd, teacher: pretrained, data: general, max_steps: 4,\n"
                "     loss: {ce: 0.5, kd: 1.0, hidden: 1.0, attention: 0.5}}\n")
STUDENT = ["model.hidden_size=16", "model.num_layers=1", "model.num_heads=2", "model.ffn_size=32",
           "model.max_position_embeddings=64", "model.pad_vocab_to=1"]


def _latent_args(tmp_path, name, tiny_data, tiny_slm, *extra):
    (tmp_path / "latent.yaml").write_text(LATENT_STAGE)
    return [str(tmp_path / "latent.yaml"), f"run_dir={tmp_path / name}", f"teacher={tiny_slm}",
            f"general_data={tiny_data}", *STUDENT, "train.dtype=fp32", "train.micro_batch_size=4",
            "train.eval_batches=1", "train.eval_every=2", "train.torch_threads=1", "checkpoint.every=2", *extra]


@pytest.mark.slow
def test_a_stage_killed_mid_run_resumes_bit_exactly(tiny_data, tiny_slm, tmp_path):
    from safetensors.torch import load_file

    from slm_assist.core.faults import FAULT_ENV

    from .conftest import run_module

    straight = run_module("slm_assist.compress", _latent_args(tmp_path, "a", tiny_data, tiny_slm))
    assert straight.returncode == 0, straight.stderr[-3000:]
    args = _latent_args(tmp_path, "b", tiny_data, tiny_slm)
    killed = run_module("slm_assist.compress", args, env={FAULT_ENV: "kill_after_checkpoint:2"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not (tmp_path / "b" / "gd" / "final").exists()
    resumed = run_module("slm_assist.compress", args)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-3000:]
    a = load_file(str(tmp_path / "a" / "gd" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "gd" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    heads = [read_deepspeed_file(p)["module"] for p in
             (tmp_path / r / "gd" / "checkpoints" / "step_00000004" / "mp_rank_00_model_states.pt" for r in "ab")]
    assert any(k.startswith("heads.") for k in heads[0])  # the projections were checkpointed, and resumed
    assert all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0] if k.startswith("heads."))


@pytest.mark.slow
def test_two_process_zero3_compress_stage(tiny_data, tiny_slm, tmp_path):
    from transformers import AutoModelForCausalLM

    from .conftest import run_module

    args = _latent_args(tmp_path, "z3", tiny_data, tiny_slm, "train.zero_stage=3", "train.micro_batch_size=2")
    args = [a for a in args if "attention" not in a]
    res = run_module("torch.distributed.run", ["--nproc_per_node", "2", "-m", "slm_assist.compress", *args])
    assert res.returncode == 0, res.stderr[-3000:]
    student = AutoModelForCausalLM.from_pretrained(str(tmp_path / "z3" / "gd" / "final"))  # gathered on export
    assert student.config.hidden_size == 16 and student.get_input_embeddings().weight.shape == (400, 16)


def test_gap_recovered_and_the_report_refuses_other_directories(tmp_path):
    from slm_assist.compress.report import compress_figures, gap_recovered

    assert gap_recovered(4.0, 3.5, 3.0) == 0.5 and gap_recovered(4.0, 4.5, 3.0) == -0.5
    assert gap_recovered(3.0, 2.9, 3.2) is None  # a teacher that does not beat the scratch student: no gap
    assert gap_recovered(None, 3.5, 3.0) is None
    with pytest.raises(UserError, match=r"--compress .*: no config\.yaml; not a slm_assist\.compress run directory"):
        compress_figures(tmp_path, None)


def test_a_stage_sets_its_own_steps_lr_and_batch(tiny_data, tmp_path):
    from slm_assist.compress.stages import CompressConfig, stage_config
    from slm_assist.core.dataset import PackedDataset

    cfg = load_config(CompressConfig, None, [
        "task_data=t", "optim.lr=0.001", "train.micro_batch_size=8", "train.grad_accum=2",
        "stages=[{name: a, max_steps: 5, lr: 0.01, micro_batch_size: 2, grad_accum: 4}, {name: b, max_steps: 7}]"])
    data = PackedDataset.open(tiny_data)
    a, b = (stage_config(cfg, s, tmp_path / "start", data) for s in cfg.stages)
    assert (a.train.max_steps, a.optim.lr, a.train.micro_batch_size, a.train.grad_accum) == (5, 0.01, 2, 4)
    assert (b.train.max_steps, b.optim.lr, b.train.micro_batch_size, b.train.grad_accum) == (7, 0.001, 8, 2)
    assert a.run_dir.endswith("/a") and a.model.pretrained == str(tmp_path / "start")
    with pytest.raises(ConfigError, match=r"stages\[0\]\.micro_batch_size: expected >= 0"):
        load_config(CompressConfig, None, ["stages=[{name: a, micro_batch_size: -1}]"])


def test_z_loss_needs_a_logit_term_in_every_stage():
    from slm_assist.compress.stages import CompressConfig

    stages = '[{name: a, loss: {hidden: 1.0}}, {name: b, loss: {kd: 1.0}}]'
    with pytest.raises(ConfigError, match=r"train\.z_loss.*\['a'\]"):
        load_config(CompressConfig, None, ["train.z_loss=1e-4", f"stages={stages}"])
    load_config(CompressConfig, None, [f"stages={stages}"])
