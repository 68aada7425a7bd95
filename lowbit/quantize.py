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
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import QuantConfig
from .formats import BCQ
from .models import arch_of, get_module, set_module, tied_embeddings
from .qmodules import QuantEmbedding, QuantLinear, quant_modules, replace_modules

log = logging.getLogger(__name__)

Algorithm = Callable[..., None]
ALGORITHMS: dict[str, Algorithm] = {}
# methods that live in their own module register themselves when it is imported (on first use)
METHOD_MODULES = {"gptq": "gptq", "awq": "awq", "smoothquant": "smoothquant", "quarot": "quarot", "hqq": "hqq",
                  "omniquant": "omniquant", "spqr": "spqr", "bcq": "bcq",
                  "dfqat": "dfqat", "mixed": "mixed"}


def register(name: str, *, needs_data: bool = False, kind: str = "solver") -> Callable[[Algorithm], Algorithm]:
    """Register a method. ``kind``: "solver" (rounds weights and freezes them) or "transform" (an
    equivalence transform of the float model, e.g. smoothing or rotation, run before a solver).
    ``needs_data``: the method uses calibration batches."""
    def deco(fn: Algorithm) -> Algorithm:
        fn.needs_data, fn.kind = needs_data, kind
        ALGORITHMS[name] = fn
        return fn

    return deco


def recipe_steps(method: str) -> list[str]:
    """``"quarot,gptq"`` -> ``["quarot", "gptq"]``; a one-line error names unknown steps."""
    steps = [s.strip().lower() for s in method.split(",") if s.strip()]
    if not steps:
        raise ValueError("empty method: give a method name such as rtn or gptq, or a recipe such as quarot,gptq")
    for s in steps:
        get_algorithm(s)
    solvers = [s for s in steps if get_algorithm(s).kind == "solver"]
    if len(solvers) > 1:
        raise ValueError(f"recipe {method!r} has {len(solvers)} rounding solvers ({', '.join(solvers)}); keep one, "
                         "last (transforms first, e.g. quarot,gptq)")
    if solvers and steps[-1] != solvers[0]:
        raise ValueError(f"recipe {method!r}: the solver {solvers[0]} must come last (transforms first)")
    return steps


def get_algorithm(name: str) -> Algorithm:
    if name not in ALGORITHMS and name in METHOD_MODULES:
        import importlib

        importlib.import_module(f"{__package__}.{METHOD_MODULES[name]}")
    if name not in ALGORITHMS:
        known = sorted(set(ALGORITHMS) | set(METHOD_MODULES))
        raise ValueError(f"unknown method {name!r}; available: {', '.join(known)} (or a recipe such as quarot,gptq)")
    return ALGORITHMS[name]


def needs_calibration(method: str) -> bool:
    """Whether any step of the recipe uses calibration data."""
    return any(get_algorithm(s).needs_data for s in recipe_steps(method))


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


def kv_linears(model: nn.Module) -> list[str]:
    """Full names of the key and value projections of every decoder block (``ArchSpec.kv``)."""
    arch = arch_of(model)
    return [f"{arch.layers}.{i}.{rel}" for i in range(len(get_module(model, arch.layers))) for rel in arch.kv]


def _check_kv(model: nn.Module, spec) -> None:
    """A KV-cache spec must be causal: scales per token (``token``) or per token and run of channels
    (``g<size>``, e.g. the head width); a scale shared across tokens would let a token see later ones."""
    from .granularity import PerGroup, PerToken, check_fits

    if not isinstance(spec.granularity, (PerToken, PerGroup)):
        from .config import granularity_to_str

        raise ValueError(f"KV-cache granularity {granularity_to_str(spec.granularity)} is not per token; use token, "
                         "head or g<size> (one scale per token, or per token and group of channels)")
    if isinstance(spec.fmt, BCQ):
        raise ValueError("BCQ formats fit their levels iteratively and are for weights only; give the KV cache an "
                         "int, float or MX format")
    names = kv_linears(model)
    if not names:
        raise ValueError("this architecture names no key/value projections (ArchSpec.kv)")
    for name in names:
        m = get_module(model, name)
        if not isinstance(m, nn.Linear):
            raise ValueError(f"{name} is not a Linear layer; cannot quantize its output as the KV cache")
        try:
            check_fits(spec.granularity, (1, m.out_features))
        except ValueError as e:
            raise ValueError(f"KV cache ({name}): {e}") from None


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

    recipe_steps(cfg.method)
    if cfg.weight is None and cfg.act is None and cfg.embed is None and cfg.head is None and cfg.kv is None:
        raise ValueError("nothing to quantize: give a weight, activation, KV-cache, embedding or head spec")
    if cfg.kv is not None:
        _check_kv(model, cfg.kv)
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
    a_clip = cfg.extra.get("a_clip", 1.0)
    if not isinstance(a_clip, (int, float)) or not 0 < a_clip <= 1:
        raise ValueError(f"a_clip must be a number in (0, 1], got {a_clip!r}")
    if a_clip != 1.0 and (cfg.act is None or cfg.act.scale == "e8m0"):
        raise ValueError("a_clip shrinks activation ranges: it needs --a-format with fp16 scales")
    arch = arch_of(model)
    if tied_embeddings(model) and cfg.embed and cfg.head and cfg.embed != cfg.head:
        raise ValueError("the embedding and the head are tied (one tensor): give them the same spec")
    for spec, path in ((cfg.embed, arch.embed), (cfg.head, arch.head)):
        if spec is not None:
            check_fits(spec.granularity, get_module(model, path).weight.shape)


def quantize_model(model: nn.Module, cfg: QuantConfig, calib: torch.Tensor | None = None,
                   progress: bool = True, ckpt: str | Path | None = None) -> nn.Module:
    """Quantize ``model`` in place according to ``cfg`` and return it.

    ``cfg.method`` is one method or a recipe (``"quarot,gptq"``, ``"awq,rtn"``): transforms run in
    order on the float weights, then the solver rounds them; anything a recipe leaves unrounded is
    rounded to nearest. ``calib`` (token ids, ``(n, seqlen)``) goes to the steps that need data.
    Methods work on the device the model is on. The config is attached as ``model.lowbit_config``
    so that :func:`lowbit.export.save_quantized` can write it beside the weights.

    ``ckpt``: a folder where the block-by-block steps (GPTQ, AWQ, SmoothQuant, OmniQuant, SpQR) save each
    finished block (:mod:`lowbit.blockckpt`); the same call after a killed run continues where it stopped
    and says so in ``model.ptq_resume``. (dfqat and mixed checkpoint with ``extra["dfqat_ckpt"]``.)
    """
    validate_config(model, cfg)
    steps = recipe_steps(cfg.method)
    if calib is None and needs_calibration(cfg.method) and not cfg.extra.get("dfqat_data"):
        need = [s for s in steps if get_algorithm(s).needs_data]
        raise ValueError(f"{', '.join(need)} needs calibration data: pass --calib c4 (or a text file, or 'self' "
                         "for text the model generates)")
    for folder, what in ((ckpt, "--ckpt"), (cfg.extra.get("dfqat_ckpt"), "dfqat_ckpt")):
        if folder:  # a bad folder fails now, not after the first block's work
            from .blockckpt import check_folder

            check_folder(folder, what)
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    if cfg.weight is not None or cfg.act is not None:
        replace_modules(model, lambda m, n: QuantLinear.from_linear(m, cfg.weight, cfg.act),
                        block_linear_filter(model, cfg.skip))
        for m in quant_modules(model).values():
            if isinstance(m, QuantLinear) and m.a_spec is not None:
                m.a_clip = float(cfg.extra.get("a_clip", 1.0))  # activation range ratio (QuaRot's a_clip_ratio)
    if cfg.kv is not None:  # KV cache: an output quantizer on every key/value projection (float ones get wrapped)
        for name in kv_linears(model):
            m = get_module(model, name)
            if not isinstance(m, QuantLinear):
                m = QuantLinear.from_linear(m, None)
                set_module(model, name, m)
            m.out_spec = cfg.kv
    key_of = None
    if ckpt is not None:
        from .blockckpt import run_key
        from .datafree import model_fingerprint

        d = cfg.to_dict()
        d["extra"] = {k: v for k, v in d["extra"].items() if not k.endswith("_ckpt")}
        fp = model_fingerprint(model)  # the model as it enters the first step: float weights, module layout
        key_of = lambda k, step: run_key(d, fp, calib, f"{k}-{step}")  # noqa: E731
    resumed = []
    for k, step in enumerate(steps):
        if key_of is None:
            get_algorithm(step)(model, cfg, calib=calib, progress=progress)
            continue
        from .blockckpt import BlockCheckpoint, active

        with active(BlockCheckpoint(Path(ckpt) / f"{k}-{step}", key_of(k, step))) as ck:
            get_algorithm(step)(model, cfg, calib=calib, progress=progress)
        if ck.restored:
            done = ck.meta["blocks"][:ck.restored]
            # a block's whole wall time; checkpoints written before it was recorded hold only the time of the
            # method's own work on the block (a lower bound), said in the record
            resumed.append({"step": step, "blocks_restored": ck.restored,
                            "seconds_restored": sum(b.get("wall_s", b.get("seconds", 0.0)) for b in done),
                            "seconds_exact": all("wall_s" in b for b in done)})
            log.info("%s: %d blocks restored from %s", step, ck.restored, ck.folder)
    if resumed:
        model.ptq_resume = resumed
    if steps[-1] != "rtn":
        rtn(model, cfg, progress=False)  # whatever the recipe left unrounded (a no-op after a solver)
    _quantize_embeddings(model, cfg)
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
