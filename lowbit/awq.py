"""AWQ: activation-aware weight quantization (Lin et al. 2023, arXiv 2306.00978), METHODS.md 3.3.

Weights that meet large activations matter most. AWQ protects them with an exact per-input-channel
rescaling (:mod:`lowbit.smooth`): the weights of channel ``j`` are multiplied by ``s_j`` and its input
divided by it, so the salient columns see a relatively finer grid. Per scale group ([norm -> q, k, v],
[v -> o] without GQA, [norm -> gate, up], [up -> down]) it searches

    s(r) = s_x^r / sqrt(max(s_x^r) * min(s_x^r)),        s_x[j] = mean over tokens of |x_j|
    r*   = argmin_{r in {0, 1/n, ..., (n-1)/n}}  || f(X; W) - f(X; Q(W diag(s(r))) diag(s(r))^-1) ||^2

where ``f`` is the module the group feeds (the whole attention for q, k, v; the MLP for gate, up;
the Linear itself for o and down) and ``Q`` is the Linear's own weight quantizer (its ``w_spec``: any
lowbit format and granularity). ``r = 0`` is no scaling, so the search is never worse than RTN on
its own objective. Then, per output row and quantization group, the weight range is clipped:

    b* = argmin_{b = max|w| (1 - i/n), i < max_shrink n}  mean_tokens ( x_g . (Q(clamp(w, -b, b)) - w)_g )^2

with ``x_g`` the group's input columns (q and k are not clipped: their error goes through q k^T).
The scales are folded into the float weights and the clip is applied by clamping them, so the
following solver (``rtn``, added by :func:`~lowbit.quantize.quantize_model`, or ``gptq`` in
``awq,gptq``) rounds the transformed weights, as AWQ's real-quantization path does.

Calibration and cost. AWQ's reference calibrates on pile-val, 128 x 512 tokens; here it takes
whatever ``calib`` is given (the CLI default is C4, 128 x 2048). The statistic ``s_x`` uses every
calibration token. The grid search runs the inspected module ``awq_grid`` (20) times, so it is
evaluated on at most ``awq_tokens`` (4096) tokens per group: evenly spaced whole sequences for the
attention (it mixes tokens), a strided token sample of every sequence for the token-wise modules
(MLP, Linears). The clip search uses ``awq_clip_tokens`` (512) tokens, as the reference does.
Settings (``--opt``): ``awq_grid`` (scale grid), ``awq_clip`` (true), ``awq_tokens``, ``awq_clip_tokens``;
the clip grid is the reference's (20 points, shrinking by at most half).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call
from tqdm.auto import tqdm

from .config import QuantConfig
from .granularity import to_groups, ungroup
from .models import arch_of, blocks as blocks_of
from .quantize import register
from .quantizer import QuantSpec, fake_quantize
from .smooth import float_mode, fold_scales, input_stats, quant_mode, rel_error, scale_groups


def awq_scale(x_mean_abs: Tensor, ratio: float) -> Tensor:
    """``s = s_x^ratio / sqrt(max * min)`` (``s_x^ratio`` clamped to ``>= 1e-4``); ``ratio = 0`` gives ones."""
    s = x_mean_abs.float().pow(ratio).clamp_min(1e-4)
    return s / (s.max() * s.min()).sqrt()


@torch.no_grad()
def search_scale(x_mean_abs: Tensor, weights: Sequence[Tensor], specs: Sequence[QuantSpec | None],
                 loss_fn: Callable[[list[Tensor]], float], grid: int = 20) -> tuple[Tensor, list[float]]:
    """AWQ's scale search for one group (module docstring).

    ``weights``: the group's Linear weights ``(out, in)``; ``specs``: their quantizers (None keeps one in
    float); ``loss_fn(W')`` returns the output error of the module the group feeds when its Linears have
    the weights ``W' = Q(W diag(s)) diag(s)^-1``. Returns the best ``s`` (on the weights' device) and the
    loss of every ratio ``i / grid``.
    """
    dev = weights[0].device
    x = x_mean_abs.to(dev)
    best, best_s, losses = math.inf, None, []
    for i in range(grid):
        s = awq_scale(x, i / grid)
        wq = [w if spec is None else (fake_quantize(w.detach().float() * s, spec) / s).to(w.dtype)
              for w, spec in zip(weights, specs)]
        loss = float(loss_fn(wq))
        losses.append(loss)
        if loss < best:
            best, best_s = loss, s
    if best_s is None:
        raise ValueError(f"AWQ scale search: no finite loss on the grid ({losses[:3]}...); check the calibration data")
    return best_s, losses


def _grouped_input(x: Tensor, g: int, G: int) -> Tensor:
    """``(T, n)`` inputs as ``(T, G, g)``, zero-padded so padded weight positions contribute nothing."""
    pad = G * g - x.shape[1]
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.view(x.shape[0], G, g)


def _group_output_error(xg: Tensor, D: Tensor, chunk: int = 1 << 24) -> Tensor:
    """``err[r, g] = mean_t (sum_k xg[t, g, k] D[r, g, k])^2`` as ``(R, G, 1)``, in chunks of rows."""
    R, G, _ = D.shape
    T = xg.shape[0]
    out = torch.empty(R, G, device=D.device)
    step = max(1, chunk // max(T * G, 1))
    for r0 in range(0, R, step):
        y = torch.einsum("tgk,rgk->rgt", xg, D[r0:r0 + step])
        out[r0:r0 + step] = y.pow(2).mean(-1)
    return out.unsqueeze(-1)


@torch.no_grad()
def search_clip(W: Tensor, x: Tensor, spec: QuantSpec, grid: int = 20, max_shrink: float = 0.5,
                n_tokens: int = 512) -> Tensor:
    """AWQ's clip search (module docstring): per output row and quantization group of ``spec``, the bound
    ``b = max|w| (1 - i/grid)``, ``i < max_shrink * grid``, minimising that group's output MSE on (at most
    ``n_tokens`` strided) rows of ``x`` ``(..., in)``. Returns ``b`` in the grouped layout ``(R, G, 1)``
    (one bound for the whole tensor with per-tensor scales); apply it with :func:`clip_weight`."""
    W = W.detach().float()
    x = x.detach().reshape(-1, x.shape[-1]).float().to(W.device)
    if n_tokens and x.shape[0] > n_tokens:
        x = x[:: x.shape[0] // n_tokens][:n_tokens]
    Wg, lay = to_groups(W, spec.granularity)
    R, G, g = Wg.shape
    xg = _grouped_input(x, g, G)
    amax = Wg.abs().amax(-1, keepdim=True)
    if lay.shared_rows:
        amax = amax.amax((0, 1), keepdim=True).expand(R, G, 1)
    best_err = torch.full((R, G, 1), math.inf, device=W.device)
    best = amax.clone()
    for i in range(max(1, int(max_shrink * grid))):
        b = amax * (1 - i / grid)
        q = fake_quantize(ungroup(torch.maximum(torch.minimum(Wg, b), -b), lay), spec)
        err = _group_output_error(xg, to_groups(q, spec.granularity)[0] - Wg)
        if lay.shared_rows:
            err = err.sum().expand(R, G, 1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, b, best)
    return best


def clip_weight(W: Tensor, bound: Tensor, spec: QuantSpec) -> Tensor:
    """``W`` with every group clamped into ``[-bound, bound]`` (the layout of :func:`search_clip`)."""
    Wg, lay = to_groups(W.detach().float(), spec.granularity)
    return ungroup(torch.maximum(torch.minimum(Wg, bound), -bound), lay).to(W.dtype)


def _flag(v) -> bool:
    return v if isinstance(v, bool) else str(v).strip().lower() in ("1", "true", "yes", "on")


def _first(args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values())))


def _out(y):
    return y[0] if isinstance(y, tuple) else y


def _batched(calls: list[tuple[tuple, dict]]) -> list[tuple[tuple, dict]]:
    """Merge captured calls into one along the batch dimension when they differ only in their hidden states
    (first argument or ``hidden_states=``, same shape); the rest, e.g. the attention mask and position
    embeddings, must be the same objects."""
    def split(a, k):
        if a:
            return a[0], a[1:], k
        rest = dict(k)
        return rest.pop("hidden_states", None), (), rest

    parts = [split(a, k) for a, k in calls]
    h0, a0, k0 = parts[0]
    same = all(h is not None and h.shape == h0.shape and len(a) == len(a0) and all(x is y for x, y in zip(a, a0))
               and k.keys() == k0.keys() and all(k[n] is k0[n] for n in k0) for h, a, k in parts)
    if len(calls) < 2 or not same:
        return calls
    h = torch.cat([p[0] for p in parts])
    return [((h, *a0), k0)] if calls[0][0] else [((), {**k0, "hidden_states": h})]


@register("awq", needs_data=True, kind="transform")
def awq_method(model: nn.Module, cfg: QuantConfig, calib: torch.Tensor | None = None, progress: bool = True) -> None:
    """AWQ block by block on the float model (each transformed block's float output feeds the next). The
    bar shows the block's weight-quantized output error (relative MSE vs float) with RTN and after AWQ."""
    from .blockwise import capture_inputs, for_each_block, run_block

    grid = int(cfg.extra.get("awq_grid", 20))
    clip = _flag(cfg.extra.get("awq_clip", True))
    n_search = int(cfg.extra.get("awq_tokens", 4096))
    n_clip = int(cfg.extra.get("awq_clip_tokens", 512))
    arch = arch_of(model)
    no_clip = set(arch.attn[:2])  # q and k (ArchSpec.attn lists q, k, v, o)
    bar = tqdm(total=len(blocks_of(model)), desc="awq", disable=not progress, unit="block")

    with float_mode(model) as specs:
        hidden, kwargs = capture_inputs(model, list(calib.split(1)))
        nb = len(hidden)
        per_seq = hidden[0].shape[0] * hidden[0].shape[1]
        seqs = sorted(set(torch.linspace(0, nb - 1, max(1, min(nb, n_search // per_seq))).round().long().tolist()))
        tok_step = max(1, per_seq * nb // max(n_search, 1))  # strided token sample of every sequence
        clip_step = max(1, per_seq * nb // max(n_clip, 1))

        def w_spec(m: nn.Module) -> QuantSpec | None:
            return specs[m][0] if m in specs else None

        def awq_block(i: int, block: nn.Module, xs: list[Tensor], kw: dict) -> None:
            groups = [g for g in scale_groups(model, block) if any(w_spec(m) for m in g.linears.values())]
            token_wise = {id(g): isinstance(g.inspect, nn.Linear) or any(n.startswith(g.spec.inspect + ".")
                                                                        for n in arch.mlp) for g in groups}
            seen = {id(g): [] for g in groups}  # inspected module inputs: (args, kwargs)
            clip_x = {id(g): [] for g in groups}
            cur = [0]

            def grab(g):
                def f(mod, args, kwargs):
                    if token_wise[id(g)]:
                        x = _first(args, kwargs)
                        seen[id(g)].append(((x.reshape(-1, x.shape[-1])[::tok_step][None],), {}))
                    elif cur[0] in seqs:
                        seen[id(g)].append((args, kwargs))
                return f

            def grab_x(g):
                def f(mod, args, kwargs):
                    x = _first(args, kwargs)
                    clip_x[id(g)].append(x.reshape(-1, x.shape[-1])[::clip_step])
                return f

            handles = []
            for g in groups:
                handles.append(g.inspect.register_forward_pre_hook(grab(g), with_kwargs=True))
                handles.append(next(iter(g.linears.values())).register_forward_pre_hook(grab_x(g), with_kwargs=True))
            try:
                with input_stats(block, [next(iter(g.linears)) for g in groups]) as stats:
                    for j, x in enumerate(xs):
                        cur[0] = j
                        run_block(block, x, kw)
            finally:
                for h in handles:
                    h.remove()

            x_eval = torch.cat([xs[j] for j in seqs])
            ref = [run_block(block, x_eval, kw)]
            with quant_mode(specs, block):
                err_rtn = rel_error([run_block(block, x_eval, kw)], ref)

            scales = {}
            for g in groups:
                names, mods = list(g.linears), list(g.linears.values())
                pre = g.spec.inspect
                params = [n[len(pre) + 1:] + ".weight" if n != pre else "weight" for n in names]
                inputs = _batched(seen[id(g)]) if not token_wise[id(g)] else [
                    ((torch.cat([a[0] for a, _ in seen[id(g)]], 1),), {})]
                targets = [_out(g.inspect(*a, **k)) for a, k in inputs]

                def loss_fn(wq, g=g, params=params, inputs=inputs, targets=targets):
                    tot, n = 0.0, 0
                    for (a, k), t in zip(inputs, targets):
                        y = _out(functional_call(g.inspect, dict(zip(params, wq)), a, k))
                        tot += float((y.float() - t.float()).pow(2).sum())
                        n += t.numel()
                    return tot / max(n, 1)

                s, _ = search_scale(stats[names[0]].mean_abs, [m.weight for m in mods], [w_spec(m) for m in mods],
                                    loss_fn, grid)
                fold_scales(g.prev, mods, s, arch.norm_offset)
                scales[id(g)] = s
            if clip:
                for g in groups:
                    x = torch.cat(clip_x[id(g)]) / scales[id(g)].to(clip_x[id(g)][0])  # the Linears' new input
                    for n, m in g.linears.items():
                        if n in no_clip or w_spec(m) is None:
                            continue
                        bound = search_clip(m.weight, x, w_spec(m), n_tokens=n_clip)  # the reference's 20 x 0.5
                        with torch.no_grad():
                            m.weight.copy_(clip_weight(m.weight, bound, w_spec(m)))
            with quant_mode(specs, block):
                err = rel_error([run_block(block, x_eval, kw)], ref)
            bar.set_postfix({"rtn_err": f"{err_rtn:.2e}", "awq_err": f"{err:.2e}"})
            bar.update(1)

        for_each_block(model, hidden, kwargs, awq_block, on_restore=lambda i, info: bar.update(1))
    bar.close()


__all__ = ["awq_scale", "search_scale", "search_clip", "clip_weight", "awq_method"]
