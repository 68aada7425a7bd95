"""QuaRot (Ashkboos et al. 2024, arXiv 2404.00456): rotate the float model so that its activations
lose their outliers, then quantize it (``--method quarot,rtn`` / ``quarot,gptq``, any W/A config).

Notation: PyTorch Linears compute ``y = x W^T + b`` on row vectors ``x``; every rotation here is an
orthogonal matrix (``R R^T = I``), so ``x W^T = (x R)(W R)^T``: rotating a Linear's input by ``R``
and its weight's columns by the same ``R`` changes nothing. The steps, in order:

1. :func:`fuse_norms`: an RMSNorm ``n(x) = g * x / rms(x)`` is folded into the Linears that read it,
   ``W <- W diag(g)``, and ``g <- 1`` (input_layernorm -> q, k, v; post_attention_layernorm -> gate,
   up; the final norm -> lm_head).
2. :func:`rotate_model`: a random Hadamard ``Q`` (d x d) on the residual stream ``h <- h Q``:
   ``E <- E Q`` (embedding rows), ``W_in <- W_in Q`` (q, k, v, gate, up, lm_head),
   ``W_out <- Q^T W_out`` and ``b_out <- b_out Q`` (o_proj, down_proj). A weightless RMSNorm commutes
   with ``Q`` (``rms(x Q) = rms(x)``), which is why the norms are fused first. **Fused** (offline).
3. :func:`rotate_ffn_online`: down_proj's input ``u`` (width f) is rotated **online**,
   ``u <- u H_f`` (the Hadamard rotation of :mod:`lowbit.hadamard`: a fast transform for the
   power-of-two part, a small dense factor for the rest), inside the QuantLinear *before* its
   activation quantizer; offline ``W_down <- W_down H_f``.
4. :func:`rotate_vo`: a per-head Hadamard ``H_h`` (head_dim) **fused** into v_proj's output rows,
   ``W_v[k] <- H_h^T W_v[k]`` (``b_v[k] <- b_v[k] H_h``) for every KV head ``k``, and into o_proj's input
   columns, ``W_o[:, i] <- W_o[:, i] H_h`` for every query head ``i``. Exact with GQA: query head ``i``
   outputs ``sum_t a_t v_{k(i),t}``, linear in its KV head's values, so rotating every KV head by the
   same ``H_h`` rotates every query head's output by ``H_h``. Optionally (``quarot_online_o``, on by
   default, as the paper's W4A4) a Hadamard **across heads** is applied **online** to o_proj's input,
   ``o <- o (H_nh (x) I_h)``, with ``W_o <- W_o (H_nh (x) I_h)``; together with the fused part o_proj
   sees its input rotated by ``H_nh (x) H_h``.

``Q``, the per-head ``H_h`` and the weight side of every online rotation live in the weights; the online
ones are QuantLinear input transforms (the small factor in buffer ``in_rot``, saved by
:mod:`lowbit.export`) run as forward pre-hooks, so GPTQ's Hessian is taken on the rotated input.

Not done: the paper's online Hadamard on Q and K after RoPE, which only serves KV-cache
quantization of post-RoPE keys (lowbit's KV quantizer, ``cfg.kv``, works on the k_proj/v_proj outputs,
before RoPE; the values it quantizes are rotated per head by the V/O rotation above). Activation quantization (``cfg.act``, e.g. int4
per token, symmetric) is done by each QuantLinear on its (rotated) input; ``cfg.extra["a_clip"]`` (the
paper's ``a_clip_ratio``, about 0.9) shrinks those ranges (scale * a_clip); :func:`lowbit.quantize.quantize_model`
applies it to every method.

**Tied embeddings**: folding the final norm into the head makes it differ from the embedding, so the
head is untied (its own Parameter, ``config.tie_word_embeddings = False``, logged). The size report
then counts the head separately from the embedding: that is what a rotated model really stores. In a
recipe, an embedding (or head) spec given for the tied tensor applies to both after untying.

Only Llama-layout pre-norm RMSNorm models are supported (:data:`SUPPORTED`): Gemma 2/3 have norms
after attention and FFN outputs and ``(1 + w)`` norm weights, OPT has LayerNorm (mean subtraction);
they get a one-line ValueError.
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from .config import QuantConfig
from .hadamard import kron_transform, random_signs, rotation_factor, rotation_matrix
from .models import arch_of, blocks, get_module, tied_embeddings
from .qmodules import QuantLinear
from .quantize import register

log = logging.getLogger(__name__)

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
_NORM_READERS = (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                 ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")))
_WRITERS = ("self_attn.o_proj", "mlp.down_proj")


def check_supported(model: nn.Module) -> None:
    """One-line ValueError unless ``model`` is a Llama-layout pre-norm RMSNorm model."""
    arch_of(model)
    names = list(getattr(model.config, "architectures", None) or []) + [type(model).__name__]
    if not any(n in SUPPORTED for n in names):
        raise ValueError(f"QuaRot cannot rotate {names[0]} exactly (norms after the attention/FFN outputs, "
                         f"LayerNorm or (1+w) norm weights); supported: {', '.join(SUPPORTED)}")


def _update(w: Tensor, new: Tensor) -> None:
    with torch.no_grad():
        w.copy_(new.to(w.dtype))


def _norms(model: nn.Module) -> list[nn.Module]:
    arch = arch_of(model)
    out = [getattr(b, n) for b in blocks(model) for n, _ in _NORM_READERS]
    return out + [get_module(model, arch.final_norm)]


def untie_head(model: nn.Module) -> bool:
    """Give a head tied to the embedding its own Parameter (a copy); True if it was tied."""
    arch = arch_of(model)
    head, emb = get_module(model, arch.head), get_module(model, arch.embed)
    if head.weight is not emb.weight:
        return False
    head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=emb.weight.requires_grad)
    model.config.tie_word_embeddings = False
    log.info("QuaRot: the head is untied from the embedding (the final norm is folded into it only); "
             "it is stored and counted separately from now on")
    return True


@torch.no_grad()
def fuse_norms(model: nn.Module) -> None:
    """Fold every RMSNorm weight ``g`` into the Linears reading its output and set ``g = 1``.

    ``Linear(g * x / rms(x)) = (x / rms(x)) (W diag(g))^T + b``, so ``W <- W diag(g)`` (each input
    column ``j`` scaled by ``g_j``); biases are unchanged. input_layernorm -> q, k, v;
    post_attention_layernorm -> gate, up; the final norm -> lm_head. A head tied to the embedding is
    untied first (:func:`untie_head`): afterwards the head and the embedding are two tensors, and the
    size report counts the head on its own, which is the truth for a QuaRot model.
    """
    check_supported(model)
    arch = arch_of(model)
    for block in blocks(model):
        for norm_name, readers in _NORM_READERS:
            norm = getattr(block, norm_name)
            g = norm.weight.detach().double()
            for r in readers:
                w = block.get_submodule(r).weight
                _update(w, w.double() * g.to(w.device)[None, :])
            norm.weight.fill_(1.0)
    untie_head(model)
    norm = get_module(model, arch.final_norm)
    head = get_module(model, arch.head)
    _update(head.weight, head.weight.double() * norm.weight.detach().double().to(head.weight.device)[None, :])
    norm.weight.fill_(1.0)


@torch.no_grad()
def rotate_model(model: nn.Module, seed: int = 0) -> None:
    """Rotate the residual stream by the random Hadamard ``Q = diag(s) H_d / sqrt(d)`` of
    :func:`lowbit.hadamard.random_hadamard` (``seed``).

    Every hidden state becomes ``h Q``: ``E <- E Q``; Linears reading the residual (after a now
    weightless RMSNorm, ``rms(h Q) = rms(h)``): ``W <- W Q``; Linears writing it: ``W <- Q^T W``,
    ``b <- b Q``; the head ``W_head <- W_head Q``. Needs :func:`fuse_norms` first (unit norm weights).
    ``x Q`` is computed as the fast transform of ``x * s`` (float64), never as a dense product.
    """
    check_supported(model)
    if any(not bool((n.weight == 1).all()) for n in _norms(model)):
        raise ValueError("rotate_model needs unit RMSNorm weights: call fuse_norms(model) first")
    arch = arch_of(model)
    emb, head = get_module(model, arch.embed), get_module(model, arch.head)
    if head.weight is emb.weight:
        untie_head(model)
    d = emb.weight.shape[1]
    s, K = random_signs(d, seed), rotation_factor(d, seed)[0]

    def right(x: Tensor) -> Tensor:  # x Q for rows x (float64)
        return kron_transform(x.double() * s.to(x.device), K.to(x.device))

    def rot_in(w: Tensor) -> None:  # rows of w live in the residual space: w <- w Q
        _update(w, right(w))

    rot_in(emb.weight)
    rot_in(head.weight)
    for block in blocks(model):
        for _, readers in _NORM_READERS:
            for r in readers:
                rot_in(block.get_submodule(r).weight)
        for wname in _WRITERS:
            lin = block.get_submodule(wname)
            _update(lin.weight, right(lin.weight.T).T)  # Q^T W = (W^T Q)^T
            if lin.bias is not None:
                _update(lin.bias, right(lin.bias[None])[0])


def _as_quant_linear(block: nn.Module, name: str) -> QuantLinear:
    """The QuantLinear at ``name`` (a float Linear, e.g. one in ``cfg.skip``, is wrapped unquantized so
    that it can carry an online rotation)."""
    lin = block.get_submodule(name)
    if not isinstance(lin, QuantLinear):
        lin = QuantLinear.from_linear(lin, None, None)
        parent, _, attr = name.rpartition(".")
        setattr(block.get_submodule(parent), attr, lin)
    return lin


@torch.no_grad()
def rotate_ffn_online(model: nn.Module, seed: int = 0) -> None:
    """Online Hadamard before down_proj: its input ``u`` becomes ``u H_f`` inside the module (before
    the activation quantizer) and ``W_down <- W_down H_f``, so ``(u H_f)(W_down H_f)^T = u W_down^T``.

    ``H_f = K (x) H_p / sqrt(p)`` (:func:`lowbit.hadamard.rotation_factor`): for f = 1536,
    ``K`` is Paley's 12 x 12 and ``p`` = 128; for f = 172 (no construction here) ``K`` is a seeded random
    orthogonal 172 x 172 matrix and ``p`` = 1. Only ``K`` is stored (buffer ``in_rot``).
    """
    check_supported(model)
    for block in blocks(model):
        down = _as_quant_linear(block, "mlp.down_proj")
        K, _ = rotation_factor(down.in_features, seed)
        w = down.weight
        _update(w, kron_transform(w.double(), K.to(w.device), "hadamard"))  # rows: w <- w H_f
        down.set_input_transform(K, "hadamard")


@torch.no_grad()
def rotate_vo(model: nn.Module, online_heads: bool = True, seed: int = 0) -> None:
    """Per-head Hadamard ``H_h`` fused into the V/O path, and (``online_heads``) an online rotation
    across heads at o_proj's input.

    Fused: ``W_v[k] <- H_h^T W_v[k]``, ``b_v[k] <- b_v[k] H_h`` (rows of KV head ``k``) and
    ``W_o[:, i] <- W_o[:, i] H_h`` (columns of query head ``i``): attention is linear in V per head,
    and with GQA all the query heads of a KV head see the same ``H_h``, so this is exact.
    Online: o_proj's input ``o <- o (H_nh (x) I_h)`` and ``W_o <- W_o (H_nh (x) I_h)`` (``H_nh`` the
    Hadamard rotation across the ``nh`` query heads, a seeded random orthogonal one when ``nh`` has no
    Hadamard matrix, e.g. 9).
    """
    check_supported(model)
    nq = model.config.num_attention_heads
    for block in blocks(model):
        v = block.get_submodule("self_attn.v_proj")
        o = block.get_submodule("self_attn.o_proj")
        hd = o.in_features // nq
        if o.in_features != nq * hd or v.out_features % hd:
            raise ValueError(f"o_proj ({o.in_features} inputs) does not split into {nq} heads")
        H = rotation_matrix(hd, seed).to(v.weight.device)
        nkv = v.out_features // hd
        wv = v.weight.double().view(nkv, hd, -1)
        _update(v.weight, (H.T @ wv).reshape(v.weight.shape))
        if v.bias is not None:
            _update(v.bias, (v.bias.double().view(nkv, hd) @ H).reshape(-1))
        wo = o.weight.double().view(o.out_features, nq, hd)
        _update(o.weight, (wo @ H.to(o.weight.device)).reshape(o.weight.shape))
        if online_heads and nq > 1:
            o = _as_quant_linear(block, "self_attn.o_proj")
            K = rotation_matrix(nq, seed)
            _update(o.weight, kron_transform(o.weight.double(), K.to(o.weight.device), "identity"))
            o.set_input_transform(K, "identity")


@register("quarot", kind="transform")
def quarot(model: nn.Module, cfg: QuantConfig, calib=None, progress: bool = True) -> None:
    """QuaRot as a recipe step: :func:`fuse_norms`, :func:`rotate_model`, :func:`rotate_ffn_online`,
    :func:`rotate_vo` on the float weights; a solver (rtn, gptq) follows. ``cfg.extra``:
    ``quarot_seed`` (default ``cfg.seed``), ``quarot_online_o`` (online rotation across heads at
    o_proj's input, default True), ``a_clip`` (activation range ratio, default 1.0, applied by ``quantize_model``). With tied embeddings
    and one of ``cfg.embed`` / ``cfg.head`` given, the untied head and the embedding both get that spec
    (``cfg`` is updated so that the saved config says so)."""
    check_supported(model)
    seed = int(cfg.extra.get("quarot_seed", cfg.seed))
    if tied_embeddings(model) and (cfg.embed is None) != (cfg.head is None):
        # the tied tensor had one spec; once untied, the head keeps it (recorded in the config)
        cfg.embed = cfg.head = cfg.embed or cfg.head
        log.info("QuaRot: the untied head is quantized with the embedding's spec (%s)", cfg.embed.describe())
    fuse_norms(model)
    rotate_model(model, seed)
    rotate_ffn_online(model, seed)
    rotate_vo(model, bool(cfg.extra.get("quarot_online_o", True)), seed)
    log.info("QuaRot: norms fused, residual rotated (seed %d), online Hadamard at down_proj%s", seed,
             " and across heads at o_proj" if cfg.extra.get("quarot_online_o", True) else "")


__all__ = ["SUPPORTED", "check_supported", "untie_head", "fuse_norms", "rotate_model", "rotate_ffn_online",
           "rotate_vo", "quarot"]
