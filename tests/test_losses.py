"""KD losses against full-tensor references (values and gradients), chunked == unchunked, and the KD schedule
against its closed form."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from slm_assist.core.errors import ConfigError
from slm_assist.core.soft_labels import SampledLabels, TopKLabels
from slm_assist.kd.losses import ce_plus_kd as ce_plus_kd_fn
from slm_assist.kd.losses import kd_loss
from slm_assist.kd.schedule import KDScheduleConfig, kd_weight

V = 37


def _logits(seed: int, shape=(2, 5, V), scale=2.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _ref(kind: str, s: torch.Tensor, t: torch.Tensor, tau: float, beta: float = 0.5) -> torch.Tensor:
    """Straightforward full-tensor references."""
    ls, lt = F.log_softmax(s / tau, -1), F.log_softmax(t / tau, -1)
    if kind == "forward_kl":
        per = F.kl_div(ls, lt, log_target=True, reduction="none").sum(-1)  # KL(p_t || p_s)
    elif kind == "reverse_kl":
        per = (ls.exp() * (ls - lt)).sum(-1)
    else:  # jsd
        m = beta * lt.exp() + (1 - beta) * ls.exp()
        per = beta * (lt.exp() * (lt - m.log())).sum(-1) + (1 - beta) * (ls.exp() * (ls - m.log())).sum(-1)
    return per.mean() * tau**2


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("chunk", [0, 3])
def test_divergences_match_reference_values_and_gradients(kind, tau, chunk):
    s = _logits(0).requires_grad_(True)
    t = _logits(1)
    got = kd_loss(s, t, kind=kind, tau=tau, beta=0.3 if kind == "jsd" else 0.5, chunk=chunk)
    (g_got,) = torch.autograd.grad(got, s)
    s2 = s.detach().clone().requires_grad_(True)
    want = _ref(kind, s2, t, tau, beta=0.3)
    (g_want,) = torch.autograd.grad(want, s2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "nkd"])
def test_nonnegative_and_zero_when_student_equals_teacher(kind):
    t = _logits(2)
    y = torch.randint(0, V, t.shape[:-1], generator=torch.Generator().manual_seed(3))
    for seed in range(5):
        s = _logits(10 + seed)
        if kind != "nkd":
            assert kd_loss(s, t, kind=kind) >= 0
    if kind != "nkd":
        assert kd_loss(t.clone(), t, kind=kind).abs() < 1e-6
    else:  # NKD's non-target part vanishes; what remains is the teacher-weighted target cross-entropy
        p_t = F.softmax(t, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
        want = (-(p_t * p_t.log())).mean()
        torch.testing.assert_close(kd_loss(t.clone(), t, kind="nkd", targets=y, gamma=1.5), want)


def test_nkd_matches_its_definition_with_gradients():
    s = _logits(4).requires_grad_(True)
    t = _logits(5)
    y = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(6))
    tau, gamma = 2.0, 1.5
    got = kd_loss(s, t, kind="nkd", targets=y, tau=tau, gamma=gamma, chunk=4)
    (g_got,) = torch.autograd.grad(got, s)

    s2 = s.detach().clone().requires_grad_(True)
    total = 0.0
    for b in range(2):
        for i in range(5):
            yy = int(y[b, i])
            p_t = F.softmax(t[b, i], -1)
            lp_s = F.log_softmax(s2[b, i], -1)
            keep = [j for j in range(V) if j != yy]
            q_t = F.softmax(t[b, i, keep] / tau, -1)
            lq_s = F.log_softmax(s2[b, i, keep] / tau, -1)
            total = total - p_t[yy] * lp_s[yy] + gamma * tau**2 * (q_t * (q_t.log() - lq_s)).sum()
    want = total / 10
    (g_want,) = torch.autograd.grad(want, s2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-7)


def test_chunking_bounds_memory_but_not_results():
    s = _logits(7, (3, 11, V)).requires_grad_(True)
    t = _logits(8, (3, 11, V))
    a = kd_loss(s, t, chunk=0)
    (ga,) = torch.autograd.grad(a, s)
    for chunk in (1, 4, 1000):
        b = kd_loss(s, t, chunk=chunk)
        (gb,) = torch.autograd.grad(b, s)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-8)


def test_bf16_inputs_are_reduced_in_fp32():
    s, t = _logits(9).bfloat16().requires_grad_(True), _logits(9).bfloat16()
    loss = kd_loss(s, t + 0.01)
    assert loss.dtype == torch.float32 and loss >= 0
    (g,) = torch.autograd.grad(loss, s)
    assert g.dtype == torch.bfloat16  # the gradient comes back in the student's dtype


def test_padded_student_vocab_is_cut_to_the_teacher():
    s = _logits(11, (2, 5, V + 27))
    t = _logits(12)
    torch.testing.assert_close(kd_loss(s, t), kd_loss(s[..., :V].contiguous(), t))


def test_token_weights_average_over_weighted_tokens():
    s, t = _logits(13), _logits(14)
    w = torch.zeros(2, 5)
    w[0, 1] = w[1, 3] = 1.0
    per = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(kd_loss(s, t, token_weights=w), (per[0, 1] + per[1, 3]) / 2)


def test_top_k_cache_with_full_vocab_equals_online_kd():
    s = _logits(15).requires_grad_(True)
    t = _logits(16)
    lp_t = F.log_softmax(t, -1)
    top, ids = lp_t.topk(V, -1)
    cache = TopKLabels(ids, top, torch.zeros(2, 5))
    a = kd_loss(s, t)
    b = kd_loss(s, kind="top_k", cache=cache, chunk=3)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(a, s)[0], torch.autograd.grad(b, s)[0], rtol=1e-4, atol=1e-7)


def test_top_k_with_tail_matches_bucketed_kl():
    s, t = _logits(17), _logits(18)
    lp_t, lp_s = F.log_softmax(t, -1), F.log_softmax(s, -1)
    top, ids = lp_t.topk(5, -1)
    tail = 1 - top.exp().sum(-1)
    got = kd_loss(s, kind="top_k", cache=TopKLabels(ids, top, tail))
    s_k = lp_s.gather(-1, ids)
    s_tail = 1 - s_k.exp().sum(-1)
    want = ((top.exp() * (top - s_k)).sum(-1) + tail * (tail.log() - s_tail.log())).mean()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_sampled_kd_is_unbiased_for_forward_kl():
    from data_tools.softlabels import sampled_labels, sequence_generator

    s, t = _logits(19, (1, 3, V)), _logits(20, (1, 3, V))
    draws, n = 3000, 4
    total = 0.0
    for i in range(draws):
        lab = sampled_labels(t[0], n, sequence_generator(0, i))
        ids = lab.ids.long()[None]
        cache = SampledLabels(ids, F.log_softmax(t, -1).gather(-1, ids))  # weights 1/n, implied
        total += kd_loss(s, kind="sampled", cache=cache).item()
    assert total / draws == pytest.approx(kd_loss(s, t).item(), rel=0.03)


def test_bad_arguments():
    s = _logits(0)
    with pytest.raises(ValueError, match="unknown KD kind 'kl'"):
        kd_loss(s, s, kind="kl")
    with pytest.raises(ValueError, match="needs cache= and tau=1"):
        kd_loss(s, kind="top_k", tau=2.0, cache=TopKLabels(*[torch.zeros(2, 5, 1)] * 2, torch.zeros(2, 5)))
    with pytest.raises(ValueError, match="nkd needs targets"):
        kd_loss(s, s, kind="nkd")


# ---- KD weight schedule -----------------------------------------------------------------------------------

def _w(kind: str, step: int, total: int = 100, **kw) -> float:
    n_kd = {} if kind == "constant" else {"n_kd_steps": 20}  # constant: KD throughout, no phase length
    return kd_weight(step, total, KDScheduleConfig(kind=kind, weight=0.6, **n_kd, **kw))


def test_schedule_settings_without_effect_are_errors():
    with pytest.raises(ConfigError, match=r"n_kd_steps=20 has no effect with schedule\.kind=constant"):
        KDScheduleConfig(kind="constant", n_kd_steps=20)
    with pytest.raises(ConfigError, match=r"warmup_steps=3 has no effect with schedule\.kind=step"):
        KDScheduleConfig(kind="step", warmup_steps=3)
    with pytest.raises(ConfigError, match=r"n_kd_fraction=0\.3 has no effect with schedule\.n_kd_steps=5"):
        KDScheduleConfig(n_kd_steps=5, n_kd_fraction=0.3)


def test_constant_and_step():
    assert [_w("constant", s) for s in (0, 19, 20, 99)] == [0.6] * 4
    assert [_w("step", s) for s in (0, 19, 20, 99)] == [0.6, 0.6, 0.0, 0.0]


def test_linear():
    assert _w("linear", 0) == pytest.approx(0.6)
    assert _w("linear", 10) == pytest.approx(0.3)
    assert _w("linear", 19) == pytest.approx(0.6 * (1 / 20))
    assert _w("linear", 20) == 0.0


def test_linear_ratio():
    r0 = 0.6 / 0.4
    for step in (0, 5, 10, 19):
        r = r0 * (1 - step / 20)
        assert _w("linear_ratio", step) == pytest.approx(r / (1 + r))
    assert _w("linear_ratio", 20) == 0.0


def test_wsd():
    kw = {"warmup_steps": 4, "decay_fraction": 0.25}  # decay over the last 5 KD steps: 15..19
    assert _w("wsd", 0, **kw) == pytest.approx(0.15)
    assert _w("wsd", 3, **kw) == pytest.approx(0.6)
    assert _w("wsd", 14, **kw) == pytest.approx(0.6)
    assert _w("wsd", 15, **kw) == pytest.approx(0.6)
    assert _w("wsd", 17, **kw) == pytest.approx(0.6 * (1 - 2 / 5))
    assert _w("wsd", 20, **kw) == 0.0


def test_step_with_a_gentle_exit():
    """n_kd = 20 of 100 steps, then a 9-step exit window (0.09 of the run): w falls to 0 at step 29."""
    lin = [_w("step", s, exit_fraction=0.09) for s in (19, 20, 24, 28, 29)]
    assert lin == pytest.approx([0.6, 0.6 * 9 / 10, 0.6 * 5 / 10, 0.6 * 1 / 10, 0.0])
    cos = [_w("step", s, exit_fraction=0.09, exit_shape="cosine") for s in (19, 20, 24, 28, 29)]
    assert cos == pytest.approx([0.6, 0.6 * 0.5 * (1 - math.cos(math.pi * 0.9)), 0.3,
                                 0.6 * 0.5 * (1 - math.cos(math.pi * 0.1)), 0.0])
    assert cos[1] > lin[1] and cos[3] < lin[3]  # cosine holds w longer, then falls faster
    assert KDScheduleConfig(kind="step", n_kd_steps=20, exit_fraction=0.09).n_exit(100) == 9
    with pytest.raises(ConfigError, match=r"exit_fraction=0\.1 has no effect with schedule\.kind=linear"):
        KDScheduleConfig(kind="linear", exit_fraction=0.1)
    with pytest.raises(ConfigError, match=r"exit_shape='cosine' has no effect with exit_fraction=0"):
        KDScheduleConfig(kind="step", exit_shape="cosine")


def test_n_kd_as_fraction_of_the_run():
    cfg = KDScheduleConfig(kind="step", weight=0.5, n_kd_fraction=0.17)
    assert cfg.n_kd(208_000) == 35_360
    assert kd_weight(35_359, 208_000, cfg) == 0.5 and kd_weight(35_360, 208_000, cfg) == 0.0
    assert math.isclose(KDScheduleConfig(n_kd_steps=7).n_kd(1000), 7)


@pytest.mark.parametrize("kind", ["forward_kl", "nkd"])
def test_fused_ce_plus_kd_matches_separate_terms(kind):
    s = _logits(21).requires_grad_(True)
    t = _logits(22)
    y = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(23))
    share = torch.rand(2, 5, generator=torch.Generator().manual_seed(24)) * 0.7
    loss, ce_tok, kd_tok, _ = ce_plus_kd_fn(s, y, share, teacher_logits=t, kind=kind, tau=2.0, chunk=3)
    (g,) = torch.autograd.grad(loss, s)
    s2 = s.detach().clone().requires_grad_(True)
    ce = F.cross_entropy(s2.reshape(-1, V), y.reshape(-1), reduction="none")
    kd = torch.stack([kd_loss(s2.reshape(-1, V)[i : i + 1], t.reshape(-1, V)[i : i + 1], kind=kind, tau=2.0,
                              targets=y.reshape(-1)[i : i + 1]) for i in range(10)])
    want = ((1 - share.reshape(-1)) * ce + share.reshape(-1) * kd).mean()
    (g2,) = torch.autograd.grad(want, s2)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g, g2, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(ce_tok, ce.detach())
    torch.testing.assert_close(kd_tok, kd.detach(), rtol=1e-5, atol=1e-6)
