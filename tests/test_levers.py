"""Issue 13's SALT levers, each against its definition: z-loss, confidence gating, the teacher ensemble (online and
from caches) and the easy-to-hard KD-phase curriculum."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from slm_assist.core.config import load_config
from slm_assist.core.errors import ConfigError
from slm_assist.core.soft_labels import TopKLabels
from slm_assist.kd.losses import SoftTargets, kd_loss, mixed_ce_kd, top_k_kl
from slm_assist.kd.sources import combine_logits, member_weights, merge_top_k, token_gate
from slm_assist.salt.objective import DistillConfig
from slm_assist.training.batches import ShardedBatches
from slm_assist.training.objective import CausalLMObjective, ce_with_z_loss

from .test_schedules_and_data import Rows, _take

V = 11


def _logits(seed: int, shape=(2, 5, V)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3


# ---- z-loss ---------------------------------------------------------------------------------------------------

def test_z_loss_adds_the_squared_log_normaliser():
    s = _logits(1).requires_grad_(True)
    y = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(2))
    y[0, 0] = -100  # ignored target
    loss, m = ce_with_z_loss(s, y, 1e-2)
    keep = y.reshape(-1) != -100
    flat = s.reshape(-1, V)[keep]
    want_ce = F.cross_entropy(flat, y.reshape(-1)[keep])
    want_z = torch.logsumexp(flat, -1).square().mean()
    torch.testing.assert_close(loss, want_ce + 1e-2 * want_z)
    torch.testing.assert_close(m["z"], want_z.detach())
    assert ce_with_z_loss(s, y, 0.0)[1].keys() == {"ce"}
    # the penalty's gradient pulls log Z to 0: a shift of every logit by c changes only the z-term
    shifted, _ = ce_with_z_loss(s + 5.0, y, 1e-2)
    assert shifted > loss


@pytest.mark.parametrize("soft", ["teacher", "smoothing"])
def test_z_loss_in_the_mixed_kd_loss(soft):
    s, t = _logits(3).requires_grad_(True), _logits(4)
    y = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(5))
    targets = SoftTargets(logits=t) if soft == "teacher" else SoftTargets(smoothing=0.1)
    base, _ = mixed_ce_kd(s, y, 0.6, targets, chunk=3)
    with_z, parts = mixed_ce_kd(s, y, 0.6, targets, chunk=3, z_loss=1e-3)
    z = torch.logsumexp(s.reshape(-1, V), -1).square().mean()
    torch.testing.assert_close(with_z, base + 1e-3 * z, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts["z"], z.detach(), rtol=1e-5, atol=1e-6)
    (g,) = torch.autograd.grad(with_z, s)
    s2 = s.detach().clone().requires_grad_(True)
    want = mixed_ce_kd(s2, y, 0.6, targets, chunk=0)[0] + 1e-3 * torch.logsumexp(s2.reshape(-1, V), -1).square().mean()
    (g2,) = torch.autograd.grad(want, s2)
    torch.testing.assert_close(g, g2, rtol=1e-4, atol=1e-7)


def test_causal_lm_objective_honours_z_loss():
    from transformers import LlamaConfig, LlamaForCausalLM

    from slm_assist.training.batches import Batch

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    ids = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(1))
    obj = CausalLMObjective()
    plain, m0 = obj(model, Batch(ids), 0)
    obj.z_loss = 0.1
    loss, m = obj(model, Batch(ids), 0)
    torch.testing.assert_close(m["ce"], plain.detach(), rtol=1e-5, atol=1e-6)
    logits = model(input_ids=ids).logits[:, :-1].reshape(-1, V)
    torch.testing.assert_close(loss, plain + 0.1 * logits.logsumexp(-1).square().mean(), rtol=1e-5, atol=1e-6)
    assert "z" not in m0


# ---- ensembles and gates -------------------------------------------------------------------------------------

def test_member_weights_mean_and_vote():
    top1 = torch.tensor([[3, 3, 1], [3, 2, 2], [5, 2, 0]])  # 3 members x 3 tokens
    conf = torch.tensor([[0.9, 0.5, 0.9], [0.2, 0.4, 0.3], [0.1, 0.5, 0.2]])
    mean = member_weights(top1, conf, "mean")
    assert torch.allclose(mean, torch.full((3, 3), 1 / 3))
    vote = member_weights(top1, conf, "vote")
    # token 0: members 0 and 1 agree on 3; token 1: members 1 and 2 on 2; token 2: all differ, member 0 is
    # the most confident
    want = torch.tensor([[0.5, 0.0, 1.0], [0.5, 0.5, 0.0], [0.0, 0.5, 0.0]])
    torch.testing.assert_close(vote, want)


def test_combine_logits_is_the_weighted_mixture():
    a, b = _logits(6), _logits(7)
    assert combine_logits([a], "mean") is a
    mixed = combine_logits([a, b], "mean").exp()
    torch.testing.assert_close(mixed, (a.softmax(-1) + b.softmax(-1)) / 2)
    voted = combine_logits([a, b, a], "vote").exp()  # two identical members always win the vote
    agree = (a.argmax(-1) == b.argmax(-1)).unsqueeze(-1)  # then b is in the majority too
    torch.testing.assert_close(voted, torch.where(agree, (2 * a.softmax(-1) + b.softmax(-1)) / 3, a.softmax(-1)))
    assert agree.any() and not agree.all()


def _top_k(logits: torch.Tensor, k: int) -> TopKLabels:
    lp = logits.log_softmax(-1)
    top = lp.topk(k, -1)
    return TopKLabels(top.indices, top.values, (1 - top.values.exp().sum(-1)).clamp_min(0))


def test_merged_full_vocab_caches_equal_the_online_mixture():
    a, b = _logits(8), _logits(9)
    w = torch.tensor([0.3, 0.7])[:, None, None].expand(2, 2, 5)
    merged = merge_top_k([_top_k(a, V), _top_k(b, V)], w)
    assert isinstance(merged, TopKLabels)
    dense = torch.zeros(2, 5, V).scatter_add(-1, merged.ids, merged.logprobs.exp())  # unused slots add 0
    torch.testing.assert_close(dense, 0.3 * a.softmax(-1) + 0.7 * b.softmax(-1))
    assert (merged.logprobs > float("-inf")).sum(-1).eq(V).all()  # each id once
    assert (merged.logprobs[..., :-1] >= merged.logprobs[..., 1:]).all()  # sorted, unused slots last
    s = _logits(10).requires_grad_(True)
    got = top_k_kl(s.reshape(-1, V), merged.ids.reshape(-1, 2 * V), merged.logprobs.reshape(-1, 2 * V),
                   merged.tail.reshape(-1))
    assert torch.isfinite(got).all()
    want = kd_loss(s, (0.3 * a.softmax(-1) + 0.7 * b.softmax(-1)).log(), chunk=0)
    torch.testing.assert_close(got.mean(), want, rtol=1e-4, atol=1e-5)
    (g,) = torch.autograd.grad(got.mean(), s)
    assert torch.isfinite(g).all()


def test_merged_top_k_keeps_the_tail_mass():
    a, b = _logits(11), _logits(12)
    w = torch.full((2, 2, 5), 0.5)
    merged = merge_top_k([_top_k(a, 3), _top_k(b, 3)], w)
    used = merged.logprobs > float("-inf")
    total = torch.where(used, merged.logprobs.exp(), 0.0).sum(-1) + merged.tail
    torch.testing.assert_close(total, torch.ones(2, 5), rtol=1e-5, atol=1e-5)
    assert used.sum(-1).min() >= 3 and used.sum(-1).max() <= 6


def test_an_outvoted_teachers_tokens_do_not_enter_the_merged_record():
    a, b, c = _logits(13), _logits(14), _logits(13) + 0.01  # a and c agree on every top-1; b is outvoted where
    members = [_top_k(x, 3) for x in (a, b, c)]               # it differs
    top1 = torch.stack([m.ids[..., 0] for m in members])
    conf = torch.stack([m.logprobs[..., 0].exp() for m in members])
    w = member_weights(top1, conf, "vote")
    assert (w[1] == 0).any()
    voted = merge_top_k(members, w)
    s = _logits(15)

    def kl(rec):
        n = rec.ids.shape[-1]
        return top_k_kl(s.reshape(-1, V), rec.ids.reshape(-1, n), rec.logprobs.reshape(-1, n), rec.tail.reshape(-1))

    lone = merge_top_k([members[0], members[2]], w[[0, 2]] / w[[0, 2]].sum(0))
    out = (w[1] == 0).reshape(-1)
    torch.testing.assert_close(kl(voted)[out], kl(lone)[out], rtol=1e-5, atol=1e-6)


def test_confidence_gate_drops_only_confidently_wrong_tokens():
    ids = torch.tensor([[[4, 1], [2, 0], [7, 3]]])
    logprobs = torch.tensor([[[0.9, 0.05], [0.5, 0.4], [0.95, 0.01]]]).log()
    y = torch.tensor([[1, 0, 7]])
    # token 0: top-1 is 4 at 0.9, target 1 -> confidently wrong; token 1: wrong at 0.5 < 0.6; token 2: right
    assert token_gate(ids, logprobs, y, 0, 0.6).tolist() == [0.0, 1.0, 1.0]
    assert token_gate(ids, logprobs, y, 0, 0.4).tolist() == [0.0, 0.0, 1.0]
    assert token_gate(ids, logprobs, y, 1, 0.0).tolist() == [0.0, 0.0, 1.0]  # top-1 gating
    assert token_gate(ids, logprobs, y, 0, 0.0) is None


def test_distill_sections_refuse_what_they_cannot_mean():
    """The sections leave no invalid combination to write; the few cross-section rules each name their key."""
    t = ["source.kind=teacher", "source.teachers=[t]"]
    curriculum = ["data.curriculum=mean_loss", "data.curriculum_scores=s"]
    for bad, match in [(["source.teachers=[a]"], r"source\.teachers=\['a'\] has no effect with kind=none"),
                       (["source.kind=teacher"], r"source\.teachers: expected at least one model dir"),
                       ([*t, "source.combine=vote"], r"source\.combine='vote' has no effect with one teacher"),
                       ([*t, "data.curriculum=salt_ds"], r"data\.curriculum_scores: expected a scores dir"),
                       ([*t, "data.curriculum_scores=s"], r"data\.curriculum_scores: expected \"\" with curriculum=none"),
                       ([*t, "gate.confidence=1.5"], r"gate\.confidence: expected in \[0, 1\)"),
                       (["source.kind=label_smoothing", "source.epsilon=0.1", "gate.confidence=0.5"],
                        r"gate\.confidence=0\.5 has no effect with source\.kind=label_smoothing"),
                       (["source.kind=label_smoothing"], r"source\.epsilon: expected in \(0, 1\)"),
                       (["source.kind=cache", "source.caches=[c]", "source.teachers=[a]"],
                        r"source\.teachers=\['a'\] has no effect with kind=cache"),
                       (["source.kind=cache", "source.caches=[c]", "loss.tau=2"], r"loss\.kind/tau: expected forward_kl"),
                       ([*t, *curriculum, "schedule.kind=constant", "schedule.n_kd_fraction=0.2"], "curriculum"),
                       ([*t, *curriculum, "schedule.n_kd_fraction=0"], "curriculum"),
                       ([*t, *curriculum, "handover.every=5"], r"data\.curriculum: expected none with handover"),
                       (["source.kind=teacher", "source.teachers=[t, a]", "handover.every=5"],
                        r"handover\.every: expected 0 with a teacher ensemble"),
                       ([*t, "handover.every=5", "handover.teacher=h"], r"handover\.teacher: expected the SLM"),
                       (["source.kind=cache", "source.caches=[c]", "handover.every=5"], r"handover\.teacher: expected"),
                       (["source.kind=teacher", "source.teachers=[t, a]", "loss.fused_linear=true"],
                        r"loss\.fused_linear: expected false unless")]:
        with pytest.raises(ConfigError, match=match):
            load_config(DistillConfig, None, bad)
    ok = load_config(DistillConfig, None, ["source.kind=teacher", "source.teachers=[t, a, b]", "source.combine=vote",
                                           *curriculum, "gate.confidence=0.5"])
    assert ok.source.members == ["t", "a", "b"] and ok.teacher == "t"
    cached = load_config(DistillConfig, None, ["source.kind=cache", "source.caches=[c]", "handover.every=5",
                                               "handover.teacher=h"])
    assert cached.teacher == "h"


# ---- curriculum ----------------------------------------------------------------------------------------------

def test_curriculum_orders_the_first_sequences_easy_to_hard_and_keeps_the_rest():
    key = np.random.default_rng(0).permutation(50).astype(float)
    key[7] = np.nan  # unscored: last
    plain = ShardedBatches(Rows(50), 4, 0, 1, seed=3)
    curr = ShardedBatches(Rows(50), 4, 0, 1, seed=3)
    curr.order_first(key, 20)
    a, b = sum(_take(plain, 12), []), sum(_take(curr, 12), [])  # 48 = one epoch
    assert sorted(a[:20]) == sorted(b[:20])  # the same sequences, only their order differs
    b_keys = [key[i] if i != 7 else np.inf for i in b[:20]]
    per_batch = [b_keys[i : i + 4] for i in range(0, 20, 4)]
    assert all(max(p) <= min(q) for p, q in zip(per_batch, per_batch[1:]))  # ascending across micro-batches
    assert a[20:] == b[20:]
    assert sum(_take(plain, 5), []) == sum(_take(curr, 5), [])  # later epochs: unchanged


def test_curriculum_spans_epochs_on_a_subset_and_resumes_exactly():
    rows = np.arange(100, 130)
    key = np.arange(200, dtype=float)[::-1].copy()  # higher rows are easier
    s = ShardedBatches(Rows(200), 4, 0, 1, seed=1, rows=rows)
    s.order_first(key, 40)  # 28 per epoch: all of epoch 0 and 12 of epoch 1
    def easy_to_hard(batches: list[list[int]]) -> bool:  # rows within a micro-batch come sorted by index
        return all(min(p) > max(q) for p, q in zip(batches, batches[1:]))

    batches0 = _take(s, 7)
    epoch0 = sum(batches0, [])
    assert easy_to_hard(batches0) and set(epoch0) <= set(rows.tolist())
    head1 = _take(s, 3)
    state = s.state_dict()
    rest = _take(s, 6)
    assert easy_to_hard(head1) and not easy_to_hard(rest)
    resumed = ShardedBatches(Rows(200), 4, 0, 1, seed=0, rows=rows)
    resumed.order_first(key, 40)
    resumed.load_state_dict(state)
    assert _take(resumed, 6) == rest
    two_ranks = [ShardedBatches(Rows(200), 2, r, 2, seed=1, rows=rows) for r in (0, 1)]
    for t in two_ranks:
        t.order_first(key, 40)
    assert sorted(sum(_take(two_ranks[0], 7) + _take(two_ranks[1], 7), [])) == sorted(epoch0)


def test_auto_chunk_is_sized_by_device():
    from slm_assist.kd.losses import chunk_tokens

    assert chunk_tokens(-1, 32000) == 131 and chunk_tokens(-1, 32000, cuda=True) == 524
    assert chunk_tokens(0, 32000, cuda=True) == 0 and chunk_tokens(77, 32000) == 77
    assert chunk_tokens(-1, 10**9) == 1


@pytest.mark.parametrize("kind, gates, z", [("forward_kl", (0, 0.0), 0.0), ("forward_kl", (3, 0.2), 1e-3),
                                            ("jsd", (0, 0.1), 0.0), ("nkd", (0, 0.0), 1e-3)])
def test_fused_linear_ce_kd_equals_the_loss_on_materialised_logits(kind, gates, z):
    from slm_assist.kd.fused_linear import fused_linear_ce_kd

    g = torch.Generator().manual_seed(3)
    n, hdim, vocab, padded = 13, 8, V, V + 5
    h = torch.randn(n, hdim, generator=g, requires_grad=True)
    w = (torch.randn(padded, hdim, generator=g) * 0.7).requires_grad_(True)
    t_h, t_w = torch.randn(n, 6, generator=g), torch.randn(vocab, 6, generator=g)
    y = torch.randint(0, vocab, (n,), generator=g)
    topk, conf = gates
    loss, parts = fused_linear_ce_kd(h, w, t_h, t_w, y, 0.6, kind=kind, tau=1.5, chunk=4, gate_topk=topk,
                                     gate_confidence=conf, z_loss=z)
    gh, gw = torch.autograd.grad(loss, (h, w))

    h2, w2 = h.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    t = t_h @ t_w.T
    gate = None
    if topk or conf:
        top = t.topk(max(1, topk), -1)
        gate = token_gate(top.indices, top.values - t.logsumexp(-1, keepdim=True), y, topk, conf)
    want, want_parts = mixed_ce_kd((h2 @ w2.T)[:, :vocab], y, 0.6, SoftTargets(logits=t, gate=gate), kind=kind,
                                   tau=1.5, chunk=0, z_loss=z)
    gh2, gw2 = torch.autograd.grad(want, (h2, w2))
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh, gh2, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw, gw2, rtol=1e-4, atol=1e-6)
    assert gw[vocab:].abs().max() == 0  # padded rows: no logits, no gradient
    for k, v in want_parts.items():
        torch.testing.assert_close(parts[k], v, rtol=1e-5, atol=1e-6)
    if gate is not None:
        assert 0 < parts["gate_frac"] < 1
