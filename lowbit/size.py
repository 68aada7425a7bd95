"""Exact storage accounting: bits per parameter, by part of the model.

Quantized tensors count their codes, scales, zero-points and any second-level scale metadata
(:func:`lowbit.quantizer.storage_bits`; per-row mixed precision: :func:`lowbit.mixed.mixed_storage_bits`), plus a SpQR sparse part if any (48 bits per outlier: int32
index, fp16 value); every other tensor counts ``float_bits`` per value (16 by
default: unquantized tensors are shipped in fp16, as GPTQ/AWQ papers count them, and
``lowbit quantize --out`` writes them so). Tied embeddings are one tensor and counted once, under
"embeddings". Parts: ``embeddings``, ``attention``, ``ffn``, ``norms`` (everything else inside the
decoder blocks), ``head`` and ``other`` (final norm, ...).
"""
from __future__ import annotations

from torch import nn

from .models import arch_of
from .qmodules import QuantEmbedding, QuantLinear
from .quantizer import storage_bits

PARTS = ("embeddings", "attention", "ffn", "norms", "head", "other")


def _part(name: str, arch) -> str:
    mod = name.rsplit(".", 1)[0]
    if mod == arch.embed or mod in arch.extra_embeds:
        return "embeddings"
    if mod == arch.head:
        return "head"
    if name.startswith(arch.layers + "."):
        rel = mod[len(arch.layers) + 1:].split(".", 1)[-1]  # drop the block index
        if rel in arch.attn:
            return "attention"
        if rel in arch.mlp:
            return "ffn"
        return "norms"
    return "other"


def size_report(model: nn.Module, float_bits: int = 16) -> dict:
    """Parameters and stored bits per part, plus bits/param for the decoder blocks and the whole model."""
    arch = arch_of(model)
    parts = {p: {"params": 0, "bits": 0, "quantized_params": 0} for p in PARTS}
    for name, p in model.named_parameters():  # unique Parameters: a tied head appears once
        modname, _, pname = name.rpartition(".")
        mod = model.get_submodule(modname)
        part = _part(name, arch)
        n = p.numel()
        spec = getattr(mod, "w_spec", None) if pname == "weight" else None
        if isinstance(mod, (QuantLinear, QuantEmbedding)) and pname == "weight" and getattr(mod, "w_bits", None) is not None:
            from .mixed import group_of, index_bits, mixed_storage_bits  # per-row widths (lowbit.mixed)

            bits = mixed_storage_bits(mod.w_bits, mod.w_col_keep, tuple(p.shape), index_bits(mod.w_bit_choices),
                                      group_of(mod.w_spec))["total"]
            parts[part]["quantized_params"] += n
        elif isinstance(mod, (QuantLinear, QuantEmbedding)) and spec is not None:
            bits = storage_bits(tuple(p.shape), spec)["total"]
            parts[part]["quantized_params"] += n
            for t in (getattr(mod, "w_outlier_idx", None), getattr(mod, "w_outlier_val", None)):
                if t is not None:  # SpQR sparse part, as stored: int32 index + fp16 value per outlier
                    bits += t.numel() * t.element_size() * 8
        else:
            bits = n * float_bits
        parts[part]["params"] += n
        parts[part]["bits"] += bits
    for v in parts.values():
        v["bits_per_param"] = v["bits"] / v["params"] if v["params"] else 0.0
    block = [parts[p] for p in ("attention", "ffn", "norms")]
    bp, bb = sum(v["params"] for v in block), sum(v["bits"] for v in block)
    mp, mb = sum(v["params"] for v in parts.values()), sum(v["bits"] for v in parts.values())
    return {
        "parts": parts,
        "blocks_params": bp, "blocks_bits": bb, "blocks_bits_per_param": bb / bp if bp else 0.0,
        "model_params": mp, "model_bits": mb, "model_bits_per_param": mb / mp if mp else 0.0,
        "model_megabytes": mb / 8 / 2**20, "float_bits": float_bits,
    }


def format_size_report(rep: dict) -> str:
    """A small fixed-width table of a :func:`size_report`."""
    lines = [f"{'part':<11} {'params':>12} {'quantized':>12} {'bits/param':>10} {'MiB':>9}"]
    for p, v in rep["parts"].items():
        if v["params"]:
            lines.append(f"{p:<11} {v['params']:>12,} {v['quantized_params']:>12,} {v['bits_per_param']:>10.3f} "
                         f"{v['bits'] / 8 / 2**20:>9.2f}")
    lines.append(f"{'blocks':<11} {rep['blocks_params']:>12,} {'':>12} {rep['blocks_bits_per_param']:>10.3f} "
                 f"{rep['blocks_bits'] / 8 / 2**20:>9.2f}")
    lines.append(f"{'model':<11} {rep['model_params']:>12,} {'':>12} {rep['model_bits_per_param']:>10.3f} "
                 f"{rep['model_megabytes']:>9.2f}")
    return "\n".join(lines)
