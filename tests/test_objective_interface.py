"""The Trainer's side of the Objective interface: trainable modules of an objective (optimised, cast, all-reduced,
checkpointed, not exported), the attention an objective asks for, and Batch labels / loss masks."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from slm_assist.core.config import load_config, split_argv
from slm_assist.core.errors import UserError
from slm_assist.salt.recipe import RunConfig
from slm_assist.training.batches import Batch
from slm_assist.training.checkpoint import read_deepspeed_file
from slm_assist.training.objective import CausalLMObjective
from slm_assist.training.trainer import Trainer

from .conftest import REPO, run_module, run_overrides
from .heads_run import trainer

pytestmark = pytest.mark.slow


def _cfg(*args: str) -> RunConfig:
    path, overrides = split_argv(list(args), "")
    return load_config(RunConfig, path, overrides)


def test_objective_heads_are_trained_cast_checkpointed_and_not_exported(tiny_data, tmp_path):
    common = ("train.max_steps=6", "checkpoint.every=3", "optim.lr=0.01")
    a = trainer(_cfg(*run_overrides(tiny_data, tmp_path / "A", *common)))
    head = a.objective.proj
    assert head.weight.dtype == torch.bfloat16  # cast with the model (train.dtype=bf16)
    before = head.weight.detach().clone()
    a.fit()
    assert not torch.equal(head.weight.detach(), before)  # optimised
    ckpt = read_deepspeed_file(tmp_path / "A/checkpoints/step_00000003/mp_rank_00_model_states.pt")
    assert "heads.0.weight" in ckpt["module"]  # checkpointed
    exported = load_file(str(tmp_path / "A/final/model.safetensors"))
    assert not any(k.startswith("heads") for k in exported)
    plain = Trainer(_cfg(*run_overrides(tiny_data, tmp_path / "P", "train.max_steps=1")), CausalLMObjective())
    assert set(exported) == set(plain.model.state_dict()) - {"lm_head.weight"}  # the model's; tied head once

    # resume from step 3 with a deliberately wrong head: the checkpoint restores it, and the run ends bit-exactly
    shutil.copytree(tmp_path / "A", tmp_path / "B")
    shutil.rmtree(tmp_path / "B/checkpoints/step_00000006")
    shutil.rmtree(tmp_path / "B/final")
    b = trainer(_cfg(*run_overrides(tiny_data, tmp_path / "B", *common)))
    with torch.no_grad():
        b.objective.proj.weight.add_(1.0)
    b.fit()
    assert torch.equal(b.objective.proj.weight, head.weight)
    final_b = load_file(str(tmp_path / "B/final/model.safetensors"))
    assert all(torch.equal(exported[k], final_b[k]) for k in exported)


def test_objective_heads_are_all_reduced_across_ranks(tiny_data, tmp_path):
    args = run_overrides(tiny_data, tmp_path / "run", "train.max_steps=4", "checkpoint.every=0", "train.zero_stage=2",
                         "train.micro_batch_size=2", "optim.lr=0.01")
    res = run_module("torch.distributed.run", ["--nproc_per_node", "2", str(REPO / "tests/heads_run.py"),
                                               str(tmp_path), *args])
    assert res.returncode == 0, res.stderr[-3000:]
    h0, h1 = (torch.load(tmp_path / f"head_rank{r}.pt") for r in (0, 1))
    assert torch.equal(h0["weight"], h1["weight"])  # the ranks saw different batches: the gradients were reduced
    init = torch.load(tmp_path / "head_init_rank0.pt")
    assert not torch.equal(h0["weight"], init["weight"])  # and the head did train


def test_an_objective_gets_the_attention_it_asks_for(tiny_data, tmp_path):
    t = trainer(_cfg(*run_overrides(tiny_data, tmp_path / "e", "train.max_steps=1")), attn_implementation="eager")
    assert t.model.config._attn_implementation == "eager"
    with pytest.raises(UserError, match=r"model\.attn_implementation=sdpa: ProjectedCE needs eager; set "):
        trainer(_cfg(*run_overrides(tiny_data, tmp_path / "s", "model.attn_implementation=sdpa")),
                attn_implementation="eager")


def test_causal_lm_objective_takes_labels_and_a_loss_mask():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=32, max_position_embeddings=16))
    ids = torch.randint(0, 50, (2, 10))
    labels = torch.randint(0, 50, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[:, :6] = 0  # only the last four targets count
    batch = Batch(ids, labels=labels, loss_mask=mask)
    assert torch.equal(batch.targets(), labels[:, 1:])
    loss, metrics = CausalLMObjective()(model, batch, 0)
    logits = model(input_ids=ids).logits[:, :-1]
    keep = mask[:, 1:].bool()
    want = torch.nn.functional.cross_entropy(logits[keep], labels[:, 1:][keep])
    torch.testing.assert_close(loss, want)
    plain, _ = CausalLMObjective()(model, Batch(ids), 0)
    torch.testing.assert_close(plain, model(input_ids=ids, labels=ids).loss)


def test_a_stream_the_trainer_lacks_is_an_error_not_a_silent_fallback(tiny_data, tmp_path):
    t = trainer(_cfg(*run_overrides(tiny_data, tmp_path / "k", "train.max_steps=1")))
    t.objective.stream = lambda step: "kd"
    with pytest.raises(KeyError, match=r"ProjectedCE asked for batch stream 'kd'; this Trainer has \['main'\]"):
        t.train_step()
