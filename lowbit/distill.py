"""Distillation losses for QAT (METHODS.md 6.2): logit KD (full or stored top-K teacher) and hidden states.

Notation, per token: teacher log-probabilities ``log p = log_softmax(z_T / T)``, student
``log q = log_softmax(z_S / T)``, computed in float32 from any input dtype.

* ``fkl`` forward KL ``KL(p || q) = sum_v p (log p - log q)`` (mode covering; LLM-QAT, BitDistiller);
* ``rkl`` reverse KL ``KL(q || p)`` (mode seeking);
* ``jsd`` Jensen-Shannon ``0.5 KL(p || m) + 0.5 KL(q || m)``, ``m = (p + q) / 2``, with ``log m`` from
  ``logaddexp`` (no ``log 0``); it lies in ``[0, log 2]``.

Terms with a zero probability contribute 0 (``0 log 0 = 0``), so ``-inf`` logits (masked vocabulary
entries) are fine. Every divergence is multiplied by ``T^2`` (Hinton et al.): the gradient of the
softened loss w.r.t. the logits scales like ``1/T^2``, so the factor keeps the loss's gradient magnitude
independent of ``T`` (at ``T = 1`` it is the plain divergence).

**Reduction**: the per-token divergences are summed over the valid tokens (``mask`` true, or all tokens)
and divided by the number of valid tokens: a token mean, independent of batch size, sequence length and
padding (LLM-QAT's ``batchmean`` and BitDistiller's sum over tokens scale with length; METHODS.md 9.2).
Invalid tokens are dropped before anything is computed, so garbage or NaN logits there cannot leak into
the loss or its gradient. No valid token: 0.

**Memory**: the per-token divergences are computed :data:`KD_CHUNK` tokens at a time, each chunk under
activation checkpointing when the student needs a gradient, so the float32 softmax intermediates
(several ``tokens x V`` tensors; ~200 MB each for 1024 tokens of a 49k vocabulary) exist for one chunk
only, in the forward and in the backward pass. Only the logits and their gradient are full size.

**Gradients** reach the student only: teacher tensors are detached.

**Top-K teacher** (:func:`kd_loss_topk`): a generated dataset stores, per token, the teacher's K largest
logits ``topk_values`` at ``topk_indices`` and the full-vocabulary ``logsumexp`` of its logits (at
``T = 1``). Then the teacher's probabilities of the K tokens, ``p_k = exp(z_k - logsumexp)``, are exact,
and so is the remaining mass ``r = 1 - sum_k p_k`` (computed in float64, floored at 0), but not how
``r`` is spread over the other tokens. Two ways to handle it (``tail=``):

* ``"bucket"`` (default): both distributions are coarsened to K + 1 outcomes, the K tokens and one
  "rest" bucket (teacher ``r``, student ``q_rest = sum of q outside the K``, from a logsumexp of the
  student's other log-probabilities: no cancellation). The divergence of the coarsened pair is computed
  exactly. It equals the full-vocabulary divergence when K = V (there is no rest) and is a lower bound
  otherwise (data-processing inequality): what is approximated is the rest, taken as if the teacher
  spread ``r`` over the other tokens in proportion to the student's probabilities. Needs ``T = 1``,
  because the stored ``logsumexp`` is the ``T = 1`` one. ``r`` is floored at the float32 tiny value
  (``1.2e-38``) so that ``log r`` stays finite (it matters only to reverse KL, where a student rest
  mass over a teacher rest of ~0 then costs ``q_rest (log q_rest + 87)``, not ``inf``). With fp16-stored
  logits, ``p_k`` and hence ``r`` are only as accurate as that rounding (relative ``|z| 2^-11``).
* ``"renorm"``: both distributions are restricted to the K tokens and renormalised there
  (``logsumexp`` unused; any ``T``). It ignores the rest altogether (exact only when the teacher's
  ``r`` is 0 and the student's is too).

:func:`hidden_loss`: mean squared (``l2``) or absolute (``l1``) difference of hidden states, over all
elements of the valid tokens; with ``normalize`` divided by the teacher's mean square (``l2``) or mean
absolute value (``l1``) over the same elements, which makes it a relative, dimensionless error that is
comparable across layers of different scale.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

KD_KINDS = ("fkl", "rkl", "jsd")
KD_CHUNK = 256  # tokens per chunk of the logit losses (see Memory above)
TAILS = ("bucket", "renorm")
HIDDEN_KINDS = ("l2", "l1")


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """``sum_v a (log a - log b)`` over the last dimension, with ``0 log 0 = 0``."""
    a = log_a.exp()
    # the log-ratio is masked before the product, so no 0 * inf appears in the forward or the backward pass
    return (a * torch.where(a > 0, log_a - log_b, torch.zeros_like(a))).sum(-1)


def divergence(log_p: Tensor, log_q: Tensor, kind: str = "fkl") -> Tensor:
    """Per-row divergence of two normalised log-distributions (last dimension): teacher ``p``, student ``q``."""
    if kind == "fkl":
        return _kl(log_p, log_q)
    if kind == "rkl":
        return _kl(log_q, log_p)
    if kind == "jsd":
        log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
        return 0.5 * _kl(log_p, log_m) + 0.5 * _kl(log_q, log_m)
    raise ValueError(f"unknown KD loss {kind!r}; choose one of {KD_KINDS}")


def _valid(mask: Tensor | None, lead: torch.Size) -> Tensor | None:
    """Flat boolean index of the valid tokens (None: all)."""
    if mask is None:
        return None
    if tuple(mask.shape) != tuple(lead):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match the tokens {tuple(lead)}")
    return mask.reshape(-1).bool()


def _rows(t: Tensor, keep: Tensor | None) -> Tensor:
    t = t.reshape(-1, t.shape[-1])
    return t if keep is None else t[keep.to(t.device)]


def _token_mean(per_token: Tensor) -> Tensor:
    return per_token.sum() / max(per_token.numel(), 1)


def _chunked_mean(fn: Callable[..., Tensor], *rows: Tensor, chunk: int | None = None) -> Tensor:
    """Token mean of ``fn(*row_slices)`` (per-token values) over the rows of ``rows``, ``chunk`` rows at a time;
    checkpointed chunks when a gradient is needed, so only one chunk's intermediates are alive at once."""
    n, chunk = rows[0].shape[0], chunk or KD_CHUNK
    if n <= chunk:
        return _token_mean(fn(*rows))
    grad = torch.is_grad_enabled() and any(r.requires_grad for r in rows)
    total = rows[0].new_zeros((), dtype=torch.float32)
    for a in range(0, n, chunk):
        part = [r[a:a + chunk] for r in rows]
        val = checkpoint(lambda *x: fn(*x).sum(), *part, use_reentrant=False) if grad else fn(*part).sum()
        total = total + val
    return total / n

def _check(kind: str, temperature: float) -> None:
    if kind not in KD_KINDS:
        raise ValueError(f"unknown KD loss {kind!r}; choose one of {KD_KINDS}")
    if not (isinstance(temperature, (int, float)) and 0 < temperature < math.inf):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, kind: str = "fkl", temperature: float = 1.0,
            mask: Tensor | None = None) -> Tensor:
    """Token-mean ``T^2 * divergence(softmax(teacher/T), softmax(student/T))`` (see the module docstring).

    ``student_logits`` and ``teacher_logits``: ``(..., V)`` of any float dtype; ``mask``: ``(...)``, true
    for the tokens that count. Returns a float32 scalar."""
    _check(kind, temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    keep = _valid(mask, student_logits.shape[:-1])
    s, t = _rows(student_logits, keep), _rows(teacher_logits.detach(), keep)

    def per_token(s: Tensor, t: Tensor) -> Tensor:
        return divergence(F.log_softmax(t.float() / temperature, -1), F.log_softmax(s.float() / temperature, -1),
                          kind)

    return _chunked_mean(per_token, s, t) * temperature**2


def kd_loss_topk(student_logits: Tensor, topk_values: Tensor, topk_indices: Tensor, logsumexp: Tensor | None,
                 kind: str = "fkl", temperature: float = 1.0, mask: Tensor | None = None,
                 tail: str = "bucket") -> Tensor:
    """:func:`kd_loss` against a teacher stored as its top-K logits (see the module docstring).

    ``student_logits``: ``(..., V)``; ``topk_values`` (teacher logits at ``T = 1``) and ``topk_indices``:
    ``(..., K)``, K distinct indices per token; ``logsumexp``: ``(...)`` or ``(..., 1)``, the teacher's
    full-vocabulary logsumexp (needed by ``tail="bucket"``)."""
    _check(kind, temperature)
    if tail not in TAILS:
        raise ValueError(f"unknown top-K tail handling {tail!r}; choose one of {TAILS}")
    lead, V = student_logits.shape[:-1], student_logits.shape[-1]
    K = topk_values.shape[-1]
    if topk_values.shape != topk_indices.shape or topk_values.shape[:-1] != lead or not 0 < K <= V:
        raise ValueError(f"top-K values {tuple(topk_values.shape)} and indices {tuple(topk_indices.shape)} do not "
                         f"fit student logits {tuple(student_logits.shape)}")
    keep = _valid(mask, lead)
    s = _rows(student_logits, keep)
    idx = _rows(topk_indices, keep).long().to(s.device)
    z = _rows(topk_values.detach(), keep).float().to(s.device)
    if tail == "renorm":
        def renorm(s: Tensor, idx: Tensor, z: Tensor) -> Tensor:
            log_q_k = F.log_softmax(s.float() / temperature, -1).gather(-1, idx)
            return divergence(F.log_softmax(z / temperature, -1),
                              log_q_k - torch.logsumexp(log_q_k, -1, keepdim=True), kind)

        return _chunked_mean(renorm, s, idx, z) * temperature**2
    if temperature != 1:
        raise ValueError("tail='bucket' needs temperature 1 (the stored logsumexp is the T=1 one); "
                         "use tail='renorm' for another temperature")
    if logsumexp is None:
        raise ValueError("tail='bucket' needs the teacher's full-vocabulary logsumexp")
    if logsumexp.numel() != lead.numel():
        raise ValueError(f"logsumexp {tuple(logsumexp.shape)} does not fit the tokens {tuple(lead)}")
    lse = logsumexp.detach().reshape(-1, 1)
    if keep is not None:
        lse = lse[keep.to(lse.device)]
    log_p_k = z - lse.float().to(s.device)

    def bucket(s: Tensor, idx: Tensor, log_p_k: Tensor) -> Tensor:
        log_q = F.log_softmax(s.float(), -1)
        log_q_k = log_q.gather(-1, idx)
        if K == V:  # no rest: the top-K is the whole vocabulary
            return divergence(log_p_k, log_q_k, kind)
        rest = (1 - log_p_k.double().exp().sum(-1, keepdim=True)).clamp_min(0)
        log_p_rest = rest.clamp_min(torch.finfo(torch.float32).tiny).log().float()
        log_q_rest = torch.logsumexp(log_q.scatter(-1, idx, -math.inf), -1, keepdim=True)
        return divergence(torch.cat([log_p_k, log_p_rest], -1), torch.cat([log_q_k, log_q_rest], -1), kind)

    return _chunked_mean(bucket, s, idx, log_p_k)


def hidden_loss(student_h: Tensor, teacher_h: Tensor, kind: str = "l2", normalize: bool = True,
                mask: Tensor | None = None) -> Tensor:
    """Mean squared (``l2``) or absolute (``l1``) error of hidden states ``(..., d)`` over the valid tokens;
    ``normalize``: relative to the teacher's mean square (``l2``) or mean absolute value (``l1``)."""
    if kind not in HIDDEN_KINDS:
        raise ValueError(f"unknown hidden-state loss {kind!r}; choose one of {HIDDEN_KINDS}")
    if student_h.shape != teacher_h.shape:
        raise ValueError(f"student {tuple(student_h.shape)} and teacher {tuple(teacher_h.shape)} hidden states "
                         "differ in shape")
    keep = _valid(mask, student_h.shape[:-1])
    s = _rows(student_h, keep).float()
    t = _rows(teacher_h.detach(), keep).float()
    if s.numel() == 0:
        return s.sum()
    diff = s - t
    loss = diff.square().mean() if kind == "l2" else diff.abs().mean()
    if normalize:
        ref = t.square().mean() if kind == "l2" else t.abs().mean()
        loss = loss / ref.clamp_min(torch.finfo(torch.float32).tiny)
    return loss


__all__ = ["KD_KINDS", "KD_CHUNK", "kd_loss", "kd_loss_topk", "hidden_loss", "divergence"]
