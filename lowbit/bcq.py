"""BCQ, binary-coding quantization (Xu et al. 2018, arXiv 1802.00150; LUT-GEMM, arXiv 2206.09557;
METHODS.md 2.6): data-free.

Every group ``g`` of input columns of a row is a sum of ``q`` scaled sign planes plus an offset::

    w ~ sum_{i=1..q} alpha_{i,g} b_i + z_g,        b_i in {-1, +1}

so a weight costs ``q`` bits (its signs, packed into one code: bit ``i`` = ``(b_i + 1) / 2``) and a
group ``q`` fp16 alphas and one fp16 offset: ``q + 16 (q + 1) / g`` bits per weight. Unlike a uniform
grid, the ``2^q`` levels of a group are free. The fit (:func:`lowbit.quantizer.bcq_fit`) runs from
three starts: the greedy residual init of METHODS.md 2.6 (``b_i = sign r``, ``alpha_i = mean |r|``,
``r -= alpha_i b_i``) around the group's mean and around its mid-range, and the min-max uniform grid
(which BCQ with an offset represents exactly); from each it alternates, ``iters`` times,

    (alpha, z) = least squares given B;      B = signs of each weight's nearest level given (alpha, z)

and each group keeps its best run: never worse than its greedy start, nor than the min-max uniform
grid with a fractional offset. The alternation is a local search (a nearest-level assignment and a
least-squares fit, like Lloyd's k-means): it can stop at a local minimum.

The format is part of the spec (``bcq1`` .. ``bcq4``), so RTN of a ``bcq`` spec runs the same fit
(10 rounds); this method adds the ``bcq_iters`` setting (``--opt bcq_iters=10``).

Use ``--method bcq --w-format bcq3 --w-granularity g128``. ``--w-format int3`` is refused rather than
silently converted: the recorded config must say what is stored.
"""
from __future__ import annotations

from torch import Tensor, nn
from tqdm.auto import tqdm

from .config import QuantConfig
from .formats import BCQ, IntFormat
from .granularity import to_groups
from .qmodules import QuantLinear, quant_modules
from .quantize import register
from .quantizer import QParams, QuantizedWeight, QuantSpec, _check_input, bcq_fit, quantize


def bcq(W: Tensor, spec: QuantSpec, iters: int = 10) -> QuantizedWeight:
    """Fit BCQ planes to ``W`` (out, in) with ``iters`` alternating rounds; see the module docstring."""
    if not isinstance(spec.fmt, BCQ):
        raise ValueError(f"bcq needs a BCQ weight format (bcq1..bcq4), got {spec.describe()}")
    W = W.detach().float()
    _check_input(W, spec)
    xg, lay = to_groups(W, spec.granularity)
    alpha, z, _ = bcq_fit(xg, lay.mask(W.device), spec.bits, iters)
    qp = QParams(alpha, z)
    return QuantizedWeight(quantize(W, qp, spec), qp, spec)


@register("bcq", needs_data=False, kind="solver")
def bcq_method(model: nn.Module, cfg: QuantConfig, calib=None, progress: bool = True) -> None:
    """BCQ on every quantized Linear not yet frozen, on the device its weight is on (no data)."""
    fmt = cfg.weight.fmt if cfg.weight is not None else None
    if fmt is not None and not isinstance(fmt, BCQ):
        hint = f"--w-format bcq{fmt.bits}" if isinstance(fmt, IntFormat) and fmt.bits <= 4 else "--w-format bcq1..bcq4"
        raise ValueError(f"--method bcq stores binary codes, not {fmt.name}: pass {hint}")
    iters = int(cfg.extra.get("bcq_iters", 10))
    mods = [m for m in quant_modules(model).values()
            if isinstance(m, QuantLinear) and not m.frozen and m.w_spec is not None]
    for m in tqdm(mods, desc="bcq", disable=not progress, unit="layer"):
        m.freeze(bcq(m.weight, m.w_spec, iters))
