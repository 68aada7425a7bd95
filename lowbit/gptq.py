"""GPTQ (Frantar et al. 2022, arXiv 2210.17323): quantize a weight column by column, pushing each
column's rounding error onto the columns not yet quantized, weighted by the inverse Hessian.

Minimises the layer's output error ``||W X - Q X||^2 = tr((W - Q) H (W - Q)^T)`` with ``H = 2 X X^T``
(``X``: the layer inputs, one column per token). With ``U`` the upper Cholesky factor of ``H^-1``:

    for each column i:   q_i = quant(w_i);   e = (w_i - q_i) / U_ii;   W[:, j>i] -= e * U[i, j>i]

done in blocks of ``block_size`` columns with a lazy update of the rest (same result, fewer
passes over W). Options as in the reference code: damping ``percdamp * mean(diag H)``, dead inputs
(``H_ii = 0``) zeroed, ``act_order`` (columns by decreasing ``H_ii``) with static groups (every
group's scale computed from the original W, so groups stay contiguous and the stored layout is the
plain ``PerGroup`` one), and groups formed from the *updated* W otherwise. ``static_groups=True``
without act-order also takes every group's qparams from the original W before the column loop
(llm-compressor's GPTQ always does this; ``--opt gptq_static_groups=true``): the grid is then
RTN's min-max grid, and only the rounding decisions move.

Works for any uniform or table format of lowbit with per-channel or per-group scales.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .config import QuantConfig
from .formats import BCQ
from .granularity import PerChannel, PerGroup
from .models import arch_of, blocks as blocks_of
from .qmodules import QuantLinear
from .quantize import register
from .quantizer import QParams, QuantizedWeight, QuantSpec, _dq_grouped, _q_grouped, compute_qparams, quantize


def accumulate_hessian(H: Tensor | None, n: int, x: Tensor) -> tuple[Tensor, int]:
    """Running ``H = 2/n * sum X^T X`` over batches; ``x`` is ``(m sequences, tokens, in)`` or ``(tokens, in)``."""
    m = x.shape[0] if x.dim() == 3 else 1
    x = x.reshape(-1, x.shape[-1]).double()
    if H is None:
        H = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
    H = H * (n / (n + m))
    n += m
    x = x * (2 / n) ** 0.5
    return H + x.T @ x, n


def _group_params(W: Tensor, spec: QuantSpec) -> QParams:
    """qparams of the columns of ``W`` (one group) in the ``(R, 1, 1)`` layout."""
    return compute_qparams(W, replace(spec, granularity=PerChannel()))


def check_spec(spec: QuantSpec, who: str = "GPTQ") -> None:
    """One-line errors for the specs the column-by-column solvers cannot handle."""
    if not isinstance(spec.granularity, (PerChannel, PerGroup)):
        raise ValueError(f"{who} supports per-channel and per-group scales, not {type(spec.granularity).__name__}")
    if isinstance(spec.fmt, BCQ):
        raise ValueError(f"{who} does not fit BCQ codes (per-group learned levels); use --method bcq, or an int format")
    if spec.rounding != "nearest":
        raise ValueError(f"{who} rounds to nearest; drop stochastic rounding")


def inverse_hessian_factor(W: Tensor, H: Tensor, percdamp: float = 0.01, act_order: bool = False
                           ) -> tuple[Tensor, Tensor, Tensor]:
    """GPTQ's set-up: dead inputs (``H_ii = 0``) zeroed, the column order (``act_order``: decreasing
    ``H_ii``), damping, and ``U`` = the upper Cholesky factor of ``H^-1`` in that order.
    Returns ``(W, perm, U)`` with ``W`` a float copy in the original column order."""
    W = W.detach().clone().float()
    C = W.shape[1]
    dev = W.device
    H = H.detach().clone().double().to(dev)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(torch.diag(H).cpu(), descending=True) if act_order else torch.arange(C)
    pd = perm.to(dev)
    H = H[pd][:, pd]
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(C, dtype=H.dtype, device=dev)
    try:
        L = torch.linalg.cholesky(H)
        U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).float()
    except RuntimeError:
        raise ValueError(f"the Hessian is not positive definite even with percdamp={percdamp}; "
                         "raise percdamp (e.g. 0.1) or use more calibration samples") from None
    return W, perm, U


def gptq(W: Tensor, H: Tensor, spec: QuantSpec, *, block_size: int = 128, percdamp: float = 0.01,
         act_order: bool = False, static_groups: bool | None = None, keep: Tensor | None = None) -> QuantizedWeight:
    """Quantize ``W`` (out, in) given the input Hessian ``H`` (in, in); see the module docstring.

    ``static_groups``: group qparams from the original ``W`` before the loop (True) or when the loop
    reaches each group, from the updated weights (False, refused with ``act_order``); None (default):
    static with ``act_order``, lazy without (the reference code's choices).

    ``keep`` (bool, shape of ``W``) marks weights that stay in fp16 instead (SpQR's outliers): their
    error is only the fp16 rounding, and they are left out of their group's scale statistics. Their
    codes in the result are the rounding of the kept value; the caller stores the values apart."""
    check_spec(spec)
    W, perm, U = inverse_hessian_factor(W, H, percdamp, act_order)
    return _gptq_columns(W, perm, U, spec, block_size, act_order, static_groups, keep)[0]


def _fp16(x: Tensor) -> Tensor:
    return x.clamp(-65504.0, 65504.0).half().float()


def _gptq_columns(W: Tensor, perm: Tensor, U: Tensor, spec: QuantSpec, block_size: int, act_order: bool,
                  static_groups: bool | None, keep: Tensor | None) -> tuple[QuantizedWeight, Tensor]:
    """GPTQ's column loop over ``W`` (original order) visiting columns in ``perm``'s order. Returns the
    quantized weight and the values it chose (fp16 values where ``keep``), in the original order.
    ``static_groups`` as in :func:`gptq` (None: static iff ``act_order``)."""
    gran = spec.granularity
    R, C = W.shape
    dev = W.device
    pd = perm.to(dev)
    gs = gran.size if isinstance(gran, PerGroup) else C
    G = -(-C // gs)
    scale = torch.empty(R, G, 1, device=dev)
    zero = torch.empty(R, G, 1, device=dev) if spec.is_uniform else None
    static = act_order if static_groups is None else static_groups
    if isinstance(gran, PerChannel) or static:
        # from the original W (kept weights left out): groups stay contiguous
        full = compute_qparams(W if keep is None else torch.where(keep, torch.zeros_like(W), W), spec)
        scale, zero = full.scale.clone(), None if full.zero is None else full.zero.clone()
        have = torch.ones(G, dtype=torch.bool)
    else:
        if act_order:
            raise ValueError("act_order with groups needs static_groups=True (contiguous groups)")
        have = torch.zeros(G, dtype=torch.bool)

    W = W[:, pd]
    M = None if keep is None else keep[:, pd]
    qmax = spec.fmt.qmax if spec.is_uniform else None
    Q = torch.zeros_like(W)
    for i1 in range(0, C, block_size):
        i2 = min(i1 + block_size, C)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            g = col // gs
            if not have[g]:  # natural order: the group starts here; fit it on the updated weights
                n = min(gs, C - col)
                rest = torch.cat([W1[:, i:], W[:, i2:]], 1)[:, :n]
                if M is not None:
                    rest = torch.where(M[:, col:col + n], torch.zeros_like(rest), rest)
                qp = _group_params(rest, spec)
                scale[:, g], have[g] = qp.scale[:, 0], True
                if zero is not None:
                    zero[:, g] = qp.zero[:, 0]
            w = W1[:, i]
            if zero is not None:  # uniform grid: the same float ops as _q_grouped/_dq_grouped, fewer kernels
                s_g, z_g = scale[:, g, 0], zero[:, g, 0]
                qcol = s_g * (torch.clamp(torch.round(w / s_g + z_g), 0, qmax) - z_g)
            else:
                qp = QParams(scale[:, g:g + 1], None)
                q, _ = _q_grouped(w.view(R, 1, 1), qp, spec, None)
                qcol = _dq_grouped(q, qp, spec).view(R)
            if M is not None:
                qcol = torch.where(M[:, i1 + i], _fp16(w), qcol)
            Q[:, i1 + i] = qcol
            err = (w - qcol) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    Q = Q[:, torch.argsort(pd)]
    qp = QParams(scale, zero)
    return QuantizedWeight(quantize(Q, qp, spec), qp, spec), Q


def sequential_solve(model: nn.Module, calib: torch.Tensor, solve: Callable[[dict[str, QuantLinear], Tensor], None],
                     desc: str = "gptq", progress: bool = True, attn_cache: bool = True) -> None:
    """The Hessian-based solvers' loop (GPTQ, SpQR): block by block and true-sequentially. Within a
    block, each group of Linears that share an input (``ArchSpec.sequential``) gets one Hessian
    ``H = 2/n sum X^T X`` from inputs produced by the already-quantized parts, then
    ``solve(modules, H)`` rounds and freezes them; the quantized block feeds the next one.

    Each group's inputs come from running the block only up to the group. With ``attn_cache`` the
    attention core (fixed once q/k/v are frozen) is kept from the pass that reaches ``o_proj`` and the
    later passes and the block's output replay ``o_proj(core)`` (:class:`lowbit.blockwise.AttentionCache`):
    the same inputs and Hessians bit for bit, about one block forward per block fewer."""
    from contextlib import nullcontext

    from .blockwise import AttentionCache, capture_inputs, for_each_block, inputs_reaching, run_block

    arch = arch_of(model)
    hidden, kwargs = capture_inputs(model, list(calib.split(1)))
    bar = tqdm(total=len(blocks_of(model)), desc=desc, disable=not progress, unit="block")
    out_proj = arch.attn[-1]

    def quantize_block(i: int, block: nn.Module, xs: list[Tensor], kw: dict) -> dict | None:
        cache = AttentionCache(block, out_proj) if attn_cache else None
        for group in arch.sequential:
            mods = {n: block.get_submodule(n) for n in group}
            mods = {n: m for n, m in mods.items() if isinstance(m, QuantLinear) and m.w_spec is not None
                    and not m.frozen}
            if not mods:
                continue
            acc = [None, 0]  # the Linears of one group read the same input: one Hessian

            def add(x: Tensor) -> None:
                acc[0], acc[1] = accumulate_hessian(acc[0], acc[1], x)

            # the block runs only up to the group (the rest cannot change its input)
            stage = nullcontext()
            if cache is not None:
                stage = cache.record() if out_proj in group else cache.replay() if cache.ready(len(xs)) else stage
            with stage:
                inputs_reaching(block, next(iter(mods.values())), xs, kw, add)
            solve(mods, acc[0])
        if cache is None or not cache.ready(len(xs)):
            return None
        with cache.replay():
            return {"outputs": [run_block(block, x, kw) for x in xs]}

    def report(i: int, err: float, seconds: float) -> None:
        bar.set_postfix(block_err=f"{err:.2e}", s=f"{seconds:.1f}")
        bar.update(1)

    for_each_block(model, hidden, kwargs, quantize_block, report=report)
    bar.close()


@register("gptq", needs_data=True)
def gptq_method(model: nn.Module, cfg: QuantConfig, calib: torch.Tensor | None = None, progress: bool = True) -> None:
    """GPTQ on every quantized Linear of the decoder blocks (:func:`sequential_solve`).

    Settings (``cfg.extra``): ``percdamp`` (0.01), ``act_order`` (True: columns by decreasing Hessian
    diagonal with static groups, the reference README's recommended setting; without it GPTQ can lose
    to RTN on Llama-family models), ``block_size`` (128), ``gptq_static_groups`` (a boolean; default:
    static with act-order, lazy without; true without act-order = llm-compressor's static groups),
    ``attn_cache`` (True, :func:`attn_cache_option`)."""
    opts = options(cfg)

    def solve(mods: dict[str, QuantLinear], H: Tensor) -> None:
        for names, qws in _solve_shared_input(mods, H, opts):
            for n, q in zip(names, qws):
                mods[n].freeze(q)

    sequential_solve(model, calib, solve, "gptq", progress, attn_cache=attn_cache_option(cfg))


def attn_cache_option(cfg: QuantConfig) -> bool:
    """``attn_cache`` (true): keep the attention core between the sequential passes (:func:`sequential_solve`);
    false saves its memory (one hidden-state tensor per calibration sample) at the cost of speed."""
    v = cfg.extra.get("attn_cache", True)
    if not isinstance(v, bool):
        raise ValueError(f"attn_cache must be true or false, got {v!r}")
    return v


def options(cfg: QuantConfig) -> dict:
    """The keyword arguments of :func:`gptq` given by ``cfg.extra``, checked (one-line ValueErrors)."""
    opts = {"act_order": True} | {k: cfg.extra[k] for k in ("percdamp", "act_order", "block_size") if k in cfg.extra}
    if "gptq_static_groups" in cfg.extra:
        sg = cfg.extra["gptq_static_groups"]
        if not isinstance(sg, bool):
            raise ValueError(f"gptq_static_groups must be true or false, got {sg!r}")
        if opts["act_order"] and not sg:
            raise ValueError("gptq_static_groups=false needs act_order off (act-order keeps groups contiguous "
                             "only with static groups)")
        opts["static_groups"] = sg
    return opts


def _split_rows(qw: QuantizedWeight, sizes: list[int]) -> list[QuantizedWeight]:
    """Cut a quantized weight (per-channel / per-group layout) into row blocks."""
    codes = qw.codes.split(sizes)
    scales = qw.qparams.scale.split(sizes)
    zeros = qw.qparams.zero.split(sizes) if qw.qparams.zero is not None else [None] * len(sizes)
    return [QuantizedWeight(c, QParams(s, z), qw.spec) for c, s, z in zip(codes, scales, zeros)]


def _solve_shared_input(mods: dict[str, QuantLinear], H: torch.Tensor, opts: dict):
    """Linears that read the same input (q/k/v, gate/up) share one Hessian. GPTQ treats rows
    independently given H (the column order and every update are per row), so stacking their
    weights and solving once gives the same codes as solving each, with one column loop."""
    specs = {m.w_spec for m in mods.values()}
    if len(specs) == 1:
        names = list(mods)
        qw = gptq(torch.cat([mods[n].weight.detach() for n in names]), H, specs.pop(), **opts)
        yield names, _split_rows(qw, [mods[n].weight.shape[0] for n in names])
        return
    for n, m in mods.items():
        yield [n], [gptq(m.weight, H, m.w_spec, **opts)]
