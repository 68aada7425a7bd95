"""``quantize_model``: the one public verb that turns a float model into a quantized one.

It swaps the target modules for :class:`~lowbit.qmodules.QuantLinear` /
:class:`~lowbit.qmodules.QuantEmbedding` (every Linear inside the decoder blocks by default;
embeddings and head on request) and then runs the method named in the config. Methods are
registered in ``ALGORITHMS`` by name; a typo lists the valid names.

Round-to-nearest (``rtn``) needs no data: each weight is quantized on its own grid
(:func:`lowbit.quantizer.quantize_weight`, min-max or MSE-clipped).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import QuantConfig
from .models import arch_of, blocks as blocks_of, get_module, set_module, tied_embeddings
from .qmodules import QuantEmbedding, QuantLinear, quant_modules, replace_modules

log = logging.getLogger(__name__)

Algorithm = Callable[..., None]
ALGORITHMS: dict[str, Algorithm] = {}


def register(name: str) -> Callable[[Algorithm], Algorithm]:
    def deco(fn: Algorithm) -> Algorithm:
        ALGORITHMS[name] = fn
        return fn

    return deco


def block_linear_filter(model: nn.Module, skip: tuple[str, ...] = ()) -> Callable[[nn.Module, str], bool]:
    """Selects the Linears inside the decoder blocks, except names (relative to a block) in ``skip``."""
    arch = arch_of(model)
    prefix = arch.layers + "."

    def filt(m: nn.Module, name: str) -> bool:
        if not isinstance(m, nn.Linear) or isinstance(m, QuantLinear) or not name.startswith(prefix):
            return False
        rel = name[len(prefix):].split(".", 1)[-1]
        return rel not in skip

    return filt


def _quantize_embeddings(model: nn.Module, cfg: QuantConfig) -> None:
    """Embedding and head. Tied weights are one tensor: one spec, one set of qparams."""
    arch = arch_of(model)
    if cfg.embed is None and cfg.head is None:
        return
    if tied_embeddings(model):
        if cfg.embed and cfg.head and cfg.embed != cfg.head:
            raise ValueError("the embedding and the head are tied (one tensor): give them the same spec")
        spec = cfg.embed or cfg.head
        emb = QuantEmbedding.from_embedding(get_module(model, arch.embed), spec)
        set_module(model, arch.embed, emb)
        emb.freeze()
        head = QuantLinear.from_linear(get_module(model, arch.head), spec)
        head.set_qparams(emb.qparams)
        head.frozen = True
        set_module(model, arch.head, head)
        return
    if cfg.embed is not None:
        emb = QuantEmbedding.from_embedding(get_module(model, arch.embed), cfg.embed)
        set_module(model, arch.embed, emb)
        emb.freeze()
    if cfg.head is not None:
        head = QuantLinear.from_linear(get_module(model, arch.head), cfg.head)
        set_module(model, arch.head, head)
        head.freeze()


def validate_config(model: nn.Module, cfg: QuantConfig) -> None:
    """Check that ``cfg`` fits ``model``'s shapes before any work is done (one-line ValueErrors)."""
    from .granularity import check_fits

    if cfg.method not in ALGORITHMS:
        raise ValueError(f"unknown method {cfg.method!r}; available: {', '.join(sorted(ALGORITHMS))}")
    if cfg.weight is None and cfg.act is None and cfg.embed is None and cfg.head is None:
        raise ValueError("nothing to quantize: give a weight, activation, embedding or head spec")
    filt = block_linear_filter(model, cfg.skip)
    targets = [(n, m) for n, m in model.named_modules() if filt(m, n)]
    if (cfg.weight is not None or cfg.act is not None) and not targets:
        raise ValueError("no Linear layer found inside the decoder blocks to quantize")
    for name, m in targets:
        if cfg.weight is not None:
            try:
                check_fits(cfg.weight.granularity, m.weight.shape)
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
        if cfg.act is not None:
            check_fits(cfg.act.granularity, (1, m.in_features))
    arch = arch_of(model)
    if tied_embeddings(model) and cfg.embed and cfg.head and cfg.embed != cfg.head:
        raise ValueError("the embedding and the head are tied (one tensor): give them the same spec")
    for spec, path in ((cfg.embed, arch.embed), (cfg.head, arch.head)):
        if spec is not None:
            check_fits(spec.granularity, get_module(model, path).weight.shape)


def quantize_model(model: nn.Module, cfg: QuantConfig, calib: torch.Tensor | None = None,
                   progress: bool = True) -> nn.Module:
    """Quantize ``model`` in place according to ``cfg`` and return it.

    ``calib`` (token ids, ``(n, seqlen)``) is passed to methods that need data; RTN ignores it.
    The config is attached as ``model.lowbit_config`` so that :func:`lowbit.export.save_quantized`
    can write it beside the weights.
    """
    validate_config(model, cfg)
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    if cfg.weight is not None or cfg.act is not None:
        replace_modules(model, lambda m, n: QuantLinear.from_linear(m, cfg.weight, cfg.act),
                        block_linear_filter(model, cfg.skip))
    _quantize_embeddings(model, cfg)
    ALGORITHMS[cfg.method](model, cfg, calib=calib, progress=progress)
    model.lowbit_config = cfg
    log.info("quantized with %s in %.1fs", cfg.describe(), time.time() - t0)
    return model


@register("rtn")
def rtn(model: nn.Module, cfg: QuantConfig, calib=None, progress: bool = True) -> None:
    """Round-to-nearest every quantized Linear on its own grid (no data)."""
    mods = [m for m in quant_modules(model).values()
            if isinstance(m, QuantLinear) and not m.frozen and m.w_spec is not None]
    for m in tqdm(mods, desc="rtn", disable=not progress, unit="layer"):
        m.freeze()


@register("gptq")
def gptq_method(model: nn.Module, cfg: QuantConfig, calib: torch.Tensor | None = None, progress: bool = True) -> None:
    """GPTQ, block by block and true-sequentially: within a block, each group of Linears that share an
    input (ArchSpec.sequential) gets its Hessian from inputs produced by the already-quantized parts."""
    from .blockwise import capture_inputs, for_each_block, run_block
    from .gptq import accumulate_hessian, gptq

    if calib is None:
        raise ValueError("gptq needs calibration data: pass --calib c4 (or a text file)")
    arch = arch_of(model)
    opts = {k: cfg.extra[k] for k in ("percdamp", "act_order", "block_size") if k in cfg.extra}
    hidden, kwargs = capture_inputs(model, list(calib.split(1)))
    bar = tqdm(total=len(blocks_of(model)), desc="gptq", disable=not progress, unit="block")

    def quantize_block(i: int, block: nn.Module, xs: list[torch.Tensor], kw: dict) -> None:
        for group in arch.sequential:
            mods = {n: block.get_submodule(n) for n in group}
            mods = {n: m for n, m in mods.items() if isinstance(m, QuantLinear) and m.w_spec is not None
                    and not m.frozen}
            if not mods:
                continue
            acc = {n: [None, 0] for n in mods}

            def hook(name):
                def f(mod, inp, out):
                    acc[name][0], acc[name][1] = accumulate_hessian(acc[name][0], acc[name][1], inp[0].detach())
                return f

            handles = [m.register_forward_hook(hook(n)) for n, m in mods.items()]
            with torch.no_grad():
                for x in xs:
                    run_block(block, x, kw)
            for h in handles:
                h.remove()
            for n, m in mods.items():
                m.freeze(gptq(m.weight, acc[n][0], m.w_spec, **opts))
        bar.update(1)

    for_each_block(model, hidden, kwargs, quantize_block)
    bar.close()
