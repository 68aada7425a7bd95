"""KD losses: oracle values in float64, token-mean reduction with masks, temperature, top-K teacher, gradients."""
from __future__ import annotations

import math

import pytest
import torch

from lowbit.distill import hidden_loss, kd_loss, kd_loss_topk

B, T, V = 3, 5, 11


def _logits(seed, scale=3.0, shape=(B, T, V)):
    return scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _mask():
    m = torch.ones(B, T, dtype=torch.bool)
    m[0, 3:] = False  # padding at the end of one row
    m[2, 0] = False
    return m


def _explicit(s, t, kind="fkl", temperature=1.0, mask=None):
    """Per-token divergences written out in float64, averaged over the valid tokens."""
    lp = torch.log_softmax(t.double() / temperature, -1)
    lq = torch.log_softmax(s.double() / temperature, -1)
    p, q = lp.exp(), lq.exp()
    if kind == "fkl":
        per = (p * (lp - lq)).sum(-1)
    elif kind == "rkl":
        per = (q * (lq - lp)).sum(-1)
    else:
        m = (p + q) / 2
        per = 0.5 * (p * (lp - m.log())).sum(-1) + 0.5 * (q * (lq - m.log())).sum(-1)
    per = per * temperature**2
    return per.mean() if mask is None else per[mask].sum() / mask.sum()


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd"])
def test_divergence_of_a_distribution_with_itself_is_zero_and_otherwise_positive(kind):
    t = _logits(0)
    assert abs(kd_loss(t, t, kind).item()) < 1e-6
    for seed in range(1, 6):
        assert kd_loss(_logits(seed), t, kind).item() > 0


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd"])
def test_matches_the_explicit_sum_averaged_over_valid_tokens(kind):
    s, t, m = _logits(1), _logits(2), _mask()
    torch.testing.assert_close(kd_loss(s, t, kind).double(), _explicit(s, t, kind), rtol=1e-5, atol=1e-6)
    want = _explicit(s, t, kind, mask=m)
    torch.testing.assert_close(kd_loss(s, t, kind, mask=m).double(), want, rtol=1e-5, atol=1e-6)
    # the token mean: masked positions do not count, whatever they hold (NaN included), nor does the batch size
    s_bad = s.clone().requires_grad_()
    t_bad = t.clone()
    with torch.no_grad():
        s_bad[~m] = float("nan")
    t_bad[~m] = float("inf")
    loss = kd_loss(s_bad, t_bad, kind, mask=m)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert torch.isfinite(s_bad.grad).all() and (s_bad.grad[~m] == 0).all()
    two = kd_loss(torch.cat([s, s]), torch.cat([t, t]), kind, mask=torch.cat([m, m]))
    torch.testing.assert_close(two, kd_loss(s, t, kind, mask=m))
    one_row = kd_loss(s[1:2], t[1:2], kind)  # a full row alone: its own token mean
    torch.testing.assert_close(one_row.double(), _explicit(s[1:2], t[1:2], kind), rtol=1e-5, atol=1e-6)


def test_reverse_kl_is_forward_kl_with_the_roles_swapped_and_jsd_is_symmetric_and_bounded():
    s, t = _logits(3), _logits(4)
    torch.testing.assert_close(kd_loss(s, t, "rkl"), kd_loss(t, s, "fkl"))
    torch.testing.assert_close(kd_loss(s, t, "jsd"), kd_loss(t, s, "jsd"))
    assert kd_loss(s, t, "jsd").item() <= math.log(2)
    # disjoint one-hot distributions reach log 2; -inf logits (masked vocabulary) are fine
    a = torch.full((4, V), -math.inf)
    b = torch.full((4, V), -math.inf)
    a[:, 0] = 0.0
    b[:, 1] = 0.0
    torch.testing.assert_close(kd_loss(a, b, "jsd"), torch.tensor(math.log(2)))
    assert kd_loss(a, a, "fkl").item() == 0 and kd_loss(a, a, "rkl").item() == 0


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd"])
def test_temperature_softens_both_and_scales_by_t_squared(kind):
    s, t, m = _logits(5), _logits(6), _mask()
    for temp in (0.5, 2.0, 4.0):
        torch.testing.assert_close(kd_loss(s, t, kind, temperature=temp, mask=m).double(),
                                   _explicit(s, t, kind, temp, m), rtol=1e-5, atol=1e-6)
    # T^2 * KL at T equals the KL of the pre-divided logits at T = 1 times T^2
    torch.testing.assert_close(kd_loss(s, t, kind, temperature=2.0), 4 * kd_loss(s / 2, t / 2, kind))
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(s, t, kind, temperature=0)


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd"])
def test_low_precision_inputs_are_computed_in_float32(kind):
    s, t = _logits(7, 8.0), _logits(8, 8.0)
    got = kd_loss(s.bfloat16(), t.bfloat16(), kind)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _explicit(s.bfloat16().float(), t.bfloat16().float(), kind),
                               rtol=1e-5, atol=1e-6)


def _topk(t, k):
    top = torch.topk(t, k, -1)
    return top.values, top.indices, torch.logsumexp(t, -1)


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd"])
def test_top_k_teacher_equals_the_full_loss_when_k_is_the_vocabulary(kind):
    s, t, m = _logits(9), _logits(10), _mask()
    vals, idx, lse = _topk(t, V)
    perm = torch.randperm(V, generator=torch.Generator().manual_seed(0))  # any order of the K entries
    vals, idx = vals[..., perm], idx[..., perm]
    full = kd_loss(s, t, kind, mask=m)
    torch.testing.assert_close(kd_loss_topk(s, vals, idx, lse, kind, mask=m), full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kd_loss_topk(s, vals, idx, lse.unsqueeze(-1), kind, mask=m), full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kd_loss_topk(s, vals, idx, None, kind, mask=m, tail="renorm"), full,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd"])
def test_top_k_teacher_with_a_rest_bucket_is_the_coarsened_divergence(kind):
    s, t, m = _logits(11), _logits(12), _mask()
    k = 4
    vals, idx, lse = _topk(t, k)
    got = kd_loss_topk(s, vals, idx, lse, kind, mask=m)
    # oracle: both distributions summed into K + 1 outcomes (the top-K tokens and the rest), in float64
    p, q = torch.softmax(t.double(), -1), torch.softmax(s.double(), -1)
    pk, qk = p.gather(-1, idx), q.gather(-1, idx)
    P = torch.cat([pk, 1 - pk.sum(-1, keepdim=True)], -1)
    Q = torch.cat([qk, 1 - qk.sum(-1, keepdim=True)], -1)
    want = _explicit(Q.log(), P.log(), kind, mask=m)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert got.item() <= kd_loss(s, t, kind, mask=m).item() + 1e-6  # a lower bound of the full divergence
    # renormalised over the top-K only
    want_r = _explicit(s.gather(-1, idx), vals, kind, temperature=2.0, mask=m)
    got_r = kd_loss_topk(s, vals, idx, None, kind, temperature=2.0, mask=m, tail="renorm")
    torch.testing.assert_close(got_r.double(), want_r, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="temperature 1"):
        kd_loss_topk(s, vals, idx, lse, kind, temperature=2.0)


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd"])
def test_gradients_reach_the_student_only(kind):
    s, t = _logits(13).requires_grad_(), _logits(14).requires_grad_()
    kd_loss(s, t, kind, temperature=2.0, mask=_mask()).backward()
    assert t.grad is None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    s.grad = None
    vals, idx, lse = _topk(t.detach(), 4)
    vals.requires_grad_()
    lse.requires_grad_()
    kd_loss_topk(s, vals, idx, lse, kind).backward()
    assert vals.grad is None and lse.grad is None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    # the gradient of forward KL w.r.t. the student logits is (q - p) / tokens (T = 1)
    if kind == "fkl":
        s.grad = None
        kd_loss(s, t).backward()
        want = (torch.softmax(s.detach(), -1) - torch.softmax(t.detach(), -1)) / (B * T)
        torch.testing.assert_close(s.grad, want, rtol=1e-5, atol=1e-7)


def test_hidden_loss_relative_mse_and_l1_over_valid_tokens():
    g = torch.Generator().manual_seed(15)
    t = 4 * torch.randn(B, T, 8, generator=g)
    s = (t + torch.randn(B, T, 8, generator=g)).requires_grad_()
    m = _mask()
    d = (s.detach() - t)[m]
    torch.testing.assert_close(hidden_loss(s, t, "l2", normalize=False, mask=m), d.square().mean())
    torch.testing.assert_close(hidden_loss(s, t, "l2", mask=m), d.square().mean() / t[m].square().mean())
    torch.testing.assert_close(hidden_loss(s, t, "l1", normalize=False, mask=m), d.abs().mean())
    torch.testing.assert_close(hidden_loss(s, t, "l1", mask=m), d.abs().mean() / t[m].abs().mean())
    torch.testing.assert_close(hidden_loss(s, t, "l2", normalize=False), (s.detach() - t).square().mean())
    assert hidden_loss(t, t).item() == 0
    # relative: invariant to a common rescaling
    torch.testing.assert_close(hidden_loss(10 * s, 10 * t), hidden_loss(s, t))
    tt = t.clone().requires_grad_()
    hidden_loss(s, tt, mask=m).backward()
    assert tt.grad is None and torch.isfinite(s.grad).all()
    with pytest.raises(ValueError, match="unknown hidden"):
        hidden_loss(s, t, "cos")


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd"])
def test_chunked_losses_equal_the_whole_batch_loss_and_gradient(kind, monkeypatch):
    """Computing the per-token divergences a few tokens at a time (checkpointed) changes neither the loss nor
    the student's gradient, with a mask and a ragged last chunk."""
    import lowbit.distill as distill

    s0, t = _logits(21, shape=(4, 7, V)), _logits(22, shape=(4, 7, V))
    vals, idx, lse = _topk(t, 4)
    m = torch.ones(4, 7, dtype=torch.bool)
    m[1, 5:] = False
    calls = {
        "full": lambda s: kd_loss(s, t, kind, temperature=1.5, mask=m),
        "bucket": lambda s: kd_loss_topk(s, vals, idx, lse, kind, mask=m),
        "renorm": lambda s: kd_loss_topk(s, vals, idx, None, kind, temperature=2.0, tail="renorm"),
    }
    for name, f in calls.items():
        got = {}
        for chunk in (10_000, 5):  # one chunk, then 26 valid tokens (28 for renorm) in chunks of 5
            monkeypatch.setattr(distill, "KD_CHUNK", chunk)
            s = s0.clone().requires_grad_()
            loss = f(s)
            loss.backward()
            got[chunk] = (loss.detach(), s.grad)
        torch.testing.assert_close(got[5][0], got[10_000][0], rtol=1e-6, atol=1e-7, msg=name)
        torch.testing.assert_close(got[5][1], got[10_000][1], rtol=1e-5, atol=1e-8, msg=name)
        with torch.no_grad():  # the no-grad path (no checkpointing) gives the same value
            torch.testing.assert_close(f(s0), got[5][0], rtol=1e-6, atol=1e-7)
