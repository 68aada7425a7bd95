"""Saving and loading quantized models: safetensors + ``quant_config.json`` beside the HF config.

Layout of an output folder::

    config.json            the transformers model config (architecture, sizes)
    quant_config.json      lowbit version, the QuantConfig, one entry per quantized module
    model.safetensors      packed codes and compact qparams of quantized modules, other tensors in fp16
    tokenizer files        whatever the tokenizer needs to load again

For a quantized module ``m``: ``m.qweight`` holds the codes bit-packed at the format's width
(:mod:`lowbit.packing`), and ``m.scale`` / ``m.scale_e8m0`` / ``m.zero`` (packed b-bit integers, or fp16
when fractional and for BCQ's offsets; BCQ's ``m.scale`` holds its q fp16 alphas per group) / ``m.super_scale`` ...
the scales in their stored form (:func:`lowbit.quantizer.qparams_to_tensors`); a SpQR sparse part is the
buffers ``m.w_outlier_idx`` (int32) and ``m.w_outlier_val`` (fp16) (the dense codes at those positions
are the rounding of the outlier values, recovered like the others); a per-row mixed-precision Linear
(:mod:`lowbit.mixed`) stores ``m.bitmap``, ``m.col_keep`` and per width ``b`` ``m.qweight_b{b}``,
``m.scale_b{b}``, ``m.zero_b{b}`` (:func:`lowbit.mixed.pack_mixed`). So the file size
matches :func:`lowbit.size.size_report` up to byte padding (plus QuaRot's online rotation factors, the fp32
buffers ``m.in_rot``, named with their kind in the module's ``in_rot`` entry) and the safetensors header. Loading
reads only the JSON and the tensors (no pickle) and is bit-exact for the quantized weights; the
other tensors are exact when saved with ``float_dtype=torch.float32``. Activation and KV-cache quantizers are
dynamic (min-max per token or group, computed in the forward): only their specs are stored, as the module
entry's ``act`` and ``out`` (the output quantizer of a key/value projection).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .config import QuantConfig, spec_from_dict, spec_to_dict
from .models import arch_of
from .packing import pack_bits, unpack_bits
from .qmodules import QuantEmbedding, QuantLinear, quant_modules
from .quantizer import compute_qparams, dequantize, qparams_from_tensors, qparams_to_tensors, quantize
from .tokenizer import HFTokenizer, SPTokenizer, Tokenizer, load_tokenizer

FORMAT_VERSION = 1
_QP_BUFFERS = ("w_scale", "w_zero", "w_super_scale", "w_super_min", "w_bits", "w_col_keep")


def save_quantized(model: nn.Module, out: str | Path, tokenizer: Tokenizer | None = None,
                   float_dtype: torch.dtype = torch.float16, extra: dict | None = None) -> Path:
    """Write ``model`` (quantized by :func:`lowbit.quantize.quantize_model`) to the folder ``out``."""
    cfg: QuantConfig | None = getattr(model, "lowbit_config", None)
    if cfg is None:
        raise ValueError("this model was not quantized by lowbit (no lowbit_config); run quantize_model first")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, dict] = {}
    done: dict[int, str] = {}  # id(weight) -> module name, for tied weights
    for name, m in quant_modules(model).items():
        entry = {"kind": "embedding" if isinstance(m, QuantEmbedding) else "linear", "shape": list(m.weight.shape),
                 "spec": None if m.w_spec is None else spec_to_dict(m.w_spec),
                 "act": spec_to_dict(m.a_spec) if getattr(m, "a_spec", None) else None}
        if getattr(m, "a_clip", 1.0) != 1.0:
            entry["a_clip"] = m.a_clip
        if getattr(m, "out_spec", None) is not None:  # output quantizer (KV cache): dynamic, nothing stored
            entry["out"] = spec_to_dict(m.out_spec)
        if getattr(m, "in_rot", None) is not None:  # online input rotation: the factor is the buffer in_rot
            entry["in_rot"] = m.in_rot_inner
        if id(m.weight) in done:
            entry["tied_to"] = done[id(m.weight)]
        elif getattr(m, "w_bits", None) is not None:  # per-row mixed precision (lowbit.mixed)
            from .mixed import group_of, pack_mixed

            ck = None if m.w_col_keep is None else m.w_col_keep.cpu()
            for k, t in pack_mixed(m.weight.detach().cpu(), m.qparams.to("cpu"), m.w_bits.cpu(), ck,
                                   m.w_bit_choices, group_of(m.w_spec)).items():
                tensors[f"{name}.{k}"] = t.contiguous()
            entry["mixed"] = {"choices": list(m.w_bit_choices), "col_pruned": ck is not None}
            done[id(m.weight)] = name
        elif m.w_spec is not None:
            w = m.weight.detach().float().cpu()
            qp = m.qparams.to("cpu") if m.qparams is not None else compute_qparams(w, m.w_spec)
            codes = quantize(w, qp, m.w_spec)
            tensors[f"{name}.qweight"] = pack_bits(codes, m.w_spec.bits)
            for k, t in qparams_to_tensors(qp, m.w_spec).items():
                tensors[f"{name}.{k}"] = t.contiguous()
            done[id(m.weight)] = name
        modules[name] = entry
    quant_weight_ids = set(done)
    for name, p in model.named_parameters():
        if id(p) not in quant_weight_ids:
            tensors[name] = p.detach().cpu().to(float_dtype if p.is_floating_point() else p.dtype).contiguous()
    for name, b in model.named_buffers():
        short = name.rsplit(".", 1)[-1]
        if short in _QP_BUFFERS or b is None:
            continue
        mod = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        if short in getattr(mod, "_non_persistent_buffers_set", set()):
            continue
        tensors[name] = b.detach().cpu().contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "lowbit", "version": str(FORMAT_VERSION)})
    model.config.save_pretrained(str(out))
    meta = {"format_version": FORMAT_VERSION, "lowbit_version": __version__, "config": cfg.to_dict(),
            "modules": modules, "float_dtype": str(float_dtype).replace("torch.", ""), **(extra or {})}
    (out / "quant_config.json").write_text(json.dumps(meta, indent=1) + "\n")
    if isinstance(tokenizer, HFTokenizer):
        tokenizer.tok.save_pretrained(str(out))
    elif isinstance(tokenizer, SPTokenizer):
        shutil.copyfile(tokenizer.path, out / "tokenizer.model")
    return out


def load_quantized(path: str | Path, tokenizer: str | Path | None = None) -> tuple[nn.Module, Tokenizer]:
    """Load a folder written by :func:`save_quantized`: the same modules, bit-exact quantized weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    qc_path = path / "quant_config.json"
    if not qc_path.is_file():
        raise FileNotFoundError(f"{path} has no quant_config.json: not a lowbit model folder")
    try:
        meta = json.loads(qc_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{qc_path} is not valid JSON ({e.msg} at line {e.lineno}); re-export the model") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{qc_path} has format_version {meta.get('format_version')}, this lowbit reads "
                         f"{FORMAT_VERSION}; re-export with this version")
    try:
        tensors = load_file(str(path / "model.safetensors"))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path / 'model.safetensors'} is corrupt or unreadable ({str(e).splitlines()[0]}); "
                         "re-export the model") from None
    config = AutoConfig.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # random init, overwritten below
    arch_of(model)
    for name, entry in meta["modules"].items():
        old = model.get_submodule(name)
        spec = None if entry["spec"] is None else spec_from_dict(entry["spec"])
        act = None if entry["act"] is None else spec_from_dict(entry["act"])
        new = QuantEmbedding.from_embedding(old, spec) if entry["kind"] == "embedding" else \
            QuantLinear.from_linear(old, spec, act)
        if entry.get("in_rot"):
            new.set_input_transform(tensors[f"{name}.in_rot"], entry["in_rot"])
        if "a_clip" in entry:
            new.a_clip = entry["a_clip"]
        if entry.get("out"):
            new.out_spec = spec_from_dict(entry["out"])
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
    state = {}
    for name, entry in meta["modules"].items():
        m = model.get_submodule(name)
        if m.w_spec is None:
            continue
        src = entry.get("tied_to", name)
        shape = tuple(entry["shape"])
        mixed_entry = meta["modules"].get(src, entry)
        if "mixed" in mixed_entry:  # per-row mixed precision (lowbit.mixed); a tied head reads its source's
            from .mixed import group_of, unpack_mixed

            entry = mixed_entry

            sub = {k[len(src) + 1:]: v for k, v in tensors.items() if k.startswith(src + ".")}
            try:
                w, qp, bits, col_keep = unpack_mixed(sub, shape, entry["mixed"]["choices"], entry["mixed"]["col_pruned"],
                                                     group_of(m.w_spec))
            except (KeyError, RuntimeError) as e:
                raise ValueError(f"{path / 'model.safetensors'}: the mixed-precision tensors of {src} are missing or "
                                 f"truncated ({e}); re-export the model") from None
            with torch.no_grad():
                m.weight.copy_(w)
            m.set_qparams(qp)
            m.w_bits, m.w_col_keep, m.w_bit_choices = bits, col_keep, list(entry["mixed"]["choices"])
            m.frozen = True
            continue
        qt = {k[len(src) + 1:]: v for k, v in tensors.items() if k.startswith(src + ".") and k != f"{src}.qweight"
              and k[len(src) + 1:] in ("scale", "scale_e8m0", "zero", "super_scale", "sub_scale", "super_min", "sub_min")}
        if f"{src}.qweight" not in tensors:
            raise ValueError(f"{path / 'model.safetensors'} lacks {src}.qweight; the file does not match quant_config.json")
        qp = qparams_from_tensors(qt, m.w_spec, shape)
        n = 1
        for s in shape:
            n *= s
        codes = unpack_bits(tensors[f"{src}.qweight"], m.w_spec.bits, n).view(shape)
        with torch.no_grad():
            m.weight.copy_(dequantize(codes, qp, m.w_spec))
        m.set_qparams(qp)
        m.frozen = True
        if f"{name}.w_outlier_idx" in tensors:  # SpQR sparse part: fp16 values written over the dense weight
            m.set_outliers(tensors[f"{name}.w_outlier_idx"], tensors[f"{name}.w_outlier_val"])
    quantized = {id(m.weight) for m in quant_modules(model).values() if m.w_spec is not None}
    for name, p in model.named_parameters():
        if id(p) in quantized:
            continue
        if name not in tensors:
            raise ValueError(f"{path / 'model.safetensors'} lacks tensor {name}; re-export the model")
        state[name] = tensors[name].float() if tensors[name].is_floating_point() else tensors[name]
    for name, b in model.named_buffers():
        if name in tensors:
            state[name] = tensors[name]
    model.load_state_dict(state, strict=False)
    model.lowbit_config = QuantConfig.from_dict(meta["config"])
    model.eval()
    if tokenizer is None and not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model",
                                                                      "tokenizer_config.json")):
        raise FileNotFoundError(f"{path} holds no tokenizer; pass --tokenizer (or save with a tokenizer)")
    tok = load_tokenizer(tokenizer or path)
    return model, tok
