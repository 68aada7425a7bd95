"""Names on the command line and in JSON for formats, granularities and whole quantization configs.

One spelling per concept:

* formats: ``int1`` .. ``int8``, ``fp8_e4m3``, ``fp8_e5m2``, ``fp6_e3m2``, ``fp6_e2m3``, ``fp4_e2m1``,
  ``nf4``, ``pow2_<b>``; and the block-scaled presets ``mxfp8`` (E4M3), ``mxfp8_e5m2``, ``mxfp6``
  (E3M2), ``mxfp6_e2m3``, ``mxfp4``, ``mxint8`` (block 32, E8M0 scale, OCP MX v1.0) and ``bfp<b>``
  (block floating point: b-bit integer mantissas, one shared power-of-two exponent per group);
  ``bcq1`` .. ``bcq4`` (binary-coding quantization: q sign planes, q fp16 scales + an fp16 offset per group).
* granularities: ``tensor``, ``channel``, ``g<size>`` (e.g. ``g128``), ``gguf`` or
  ``gguf<super>x<sub>s<bits>`` (``gguf256x32s6`` is the default, Q4_K-like), ``token``,
  ``peg<k>`` and ``peg<k>p`` (PEG with the range-sorted permutation).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from .formats import (BCQ, FP4_E2M1, FP6_E2M3, FP6_E3M2, FP8_E4M3, FP8_E5M2, NF4, Format, IntFormat,
                      PowerOfTwo)
from .granularity import PEG, GGUFBlock, Granularity, PerChannel, PerGroup, PerTensor, PerToken
from .quantizer import QuantSpec

_FLOATS = {"fp8_e4m3": FP8_E4M3, "fp8_e5m2": FP8_E5M2, "fp6_e3m2": FP6_E3M2, "fp6_e2m3": FP6_E2M3, "fp4_e2m1": FP4_E2M1}
MX_PRESETS: dict[str, Format] = {
    "mxfp8": FP8_E4M3, "mxfp8_e5m2": FP8_E5M2, "mxfp6": FP6_E3M2, "mxfp6_e2m3": FP6_E2M3,
    "mxfp4": FP4_E2M1, "mxint8": IntFormat(8),
}
FORMAT_NAMES = ["int1..int8", *_FLOATS, "nf4", "pow2_2..pow2_8", *MX_PRESETS, "bfp2..bfp8", "bcq1..bcq4"]
GRANULARITY_NAMES = ["tensor", "channel", "g<size>", "gguf", "gguf<super>x<sub>s<bits>", "token", "peg<k>", "peg<k>p"]


def parse_format(name: str) -> Format:
    """A plain element format from its name (not the MX/BFP presets: see :func:`parse_spec`)."""
    n = name.strip().lower()
    if m := re.fullmatch(r"int(\d+)", n):
        return IntFormat(int(m.group(1)))
    if n in _FLOATS:
        return _FLOATS[n]
    if n == "nf4":
        return NF4()
    if m := re.fullmatch(r"pow2_(\d+)", n):
        return PowerOfTwo(int(m.group(1)))
    if m := re.fullmatch(r"bcq(\d+)", n):
        return BCQ(int(m.group(1)))
    raise ValueError(f"unknown format {name!r}; known formats: {', '.join(FORMAT_NAMES)}")


def parse_granularity(name: str) -> Granularity:
    n = name.strip().lower()
    if n == "tensor":
        return PerTensor()
    if n == "channel":
        return PerChannel()
    if n == "token":
        return PerToken()
    if m := re.fullmatch(r"g(\d+)", n):
        return PerGroup(int(m.group(1)))
    if n == "gguf":
        return GGUFBlock()
    if m := re.fullmatch(r"gguf(\d+)x(\d+)s(\d+)", n):
        return GGUFBlock(int(m.group(1)), int(m.group(2)), int(m.group(3)))
    if m := re.fullmatch(r"peg(\d+)(p?)", n):
        return PEG(int(m.group(1)), bool(m.group(2)))
    raise ValueError(f"unknown granularity {name!r}; known: {', '.join(GRANULARITY_NAMES)}")


def granularity_to_str(g: Granularity) -> str:
    if isinstance(g, PerTensor):
        return "tensor"
    if isinstance(g, PerChannel):
        return "channel"
    if isinstance(g, PerToken):
        return "token"
    if isinstance(g, PerGroup):
        return f"g{g.size}"
    if isinstance(g, GGUFBlock):
        return f"gguf{g.super_block}x{g.sub_block}s{g.scale_bits}"
    return f"peg{g.groups}{'p' if g.permute else ''}"


def format_to_str(f: Format) -> str:
    return f.name


def parse_spec(fmt: str, granularity: str | None = None, *, symmetric: bool = False, scale: str | None = None,
               scale_rounding: str = "floor", rounding: str = "nearest", clip_search: bool = False,
               zero_point: str = "int") -> QuantSpec:
    """Build a :class:`QuantSpec` from CLI-style names; MX/BFP presets fill in block and scale."""
    n = fmt.strip().lower()
    if n in MX_PRESETS or (m := re.fullmatch(r"bfp(\d+)", n)):
        elem = MX_PRESETS[n] if n in MX_PRESETS else IntFormat(int(m.group(1)))
        gran = parse_granularity(granularity) if granularity else PerGroup(32)
        if scale not in (None, "e8m0"):
            raise ValueError(f"{fmt} uses shared power-of-two (e8m0) scales; drop --scale {scale}")
        return QuantSpec(elem, gran, symmetric=True, scale="e8m0", scale_rounding=scale_rounding,
                         rounding=rounding, clip_search=clip_search, zero_point=zero_point)
    gran = parse_granularity(granularity) if granularity else PerChannel()
    return QuantSpec(parse_format(n), gran, symmetric=symmetric, scale=scale or "fp16",
                     scale_rounding=scale_rounding, rounding=rounding, clip_search=clip_search,
                     zero_point=zero_point)


def spec_to_str(s: QuantSpec) -> str:
    parts = [format_to_str(s.fmt), granularity_to_str(s.granularity)]
    if isinstance(s.fmt, IntFormat):
        parts.append("sym" if s.symmetric else "asym")
    if s.scale != "fp16":
        parts.append(f"{s.scale}-{s.scale_rounding}")
    if s.zero_point != "int":
        parts.append("fp16-zero")
    if s.clip_search:
        parts.append("mse-clip")
    if s.rounding != "nearest":
        parts.append(s.rounding)
    return " ".join(parts)


def spec_to_dict(s: QuantSpec) -> dict:
    return {"format": format_to_str(s.fmt), "granularity": granularity_to_str(s.granularity),
            "symmetric": s.symmetric, "scale": s.scale, "scale_rounding": s.scale_rounding,
            "rounding": s.rounding, "clip_search": s.clip_search, "zero_point": s.zero_point}


def spec_from_dict(d: dict) -> QuantSpec:
    return QuantSpec(parse_format(d["format"]), parse_granularity(d["granularity"]), symmetric=d["symmetric"],
                     scale=d["scale"], scale_rounding=d["scale_rounding"], rounding=d["rounding"],
                     clip_search=d["clip_search"], zero_point=d.get("zero_point", "int"))


@dataclass
class QuantConfig:
    """What to quantize and how. ``weight`` applies to every Linear inside the decoder blocks;
    ``embed``/``head`` to the token embedding and the output head (None keeps them in float);
    ``act`` quantizes the inputs of the decoder-block Linears (e.g. int8 per token); ``kv`` the outputs
    of the key and value projections (``ArchSpec.kv``), i.e. what the KV cache stores (e.g. int4 per
    token, or ``g<head_dim>``: per token and head), with dynamic min-max scales."""

    weight: QuantSpec | None = None
    act: QuantSpec | None = None
    embed: QuantSpec | None = None
    head: QuantSpec | None = None
    method: str = "rtn"
    seed: int = 0
    skip: tuple[str, ...] = ()  # names (relative to a block, e.g. "mlp.down_proj") kept in float
    extra: dict = field(default_factory=dict)  # method-specific settings, recorded verbatim
    kv: QuantSpec | None = None  # KV cache: outputs of the key/value projections (per token or g<size>)

    def to_dict(self) -> dict:
        sd = lambda s: None if s is None else spec_to_dict(s)  # noqa: E731
        return {"weight": sd(self.weight), "act": sd(self.act), "embed": sd(self.embed), "head": sd(self.head),
                "method": self.method, "seed": self.seed, "skip": list(self.skip), "extra": dict(self.extra),
                "kv": sd(self.kv)}

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        sf = lambda x: None if x is None else spec_from_dict(x)  # noqa: E731
        return cls(weight=sf(d.get("weight")), act=sf(d.get("act")), embed=sf(d.get("embed")),
                   head=sf(d.get("head")), method=d.get("method", "rtn"), seed=d.get("seed", 0),
                   skip=tuple(d.get("skip", ())), extra=dict(d.get("extra", {})), kv=sf(d.get("kv")))

    def describe(self) -> str:
        bits = []
        if self.weight:
            bits.append(f"W[{spec_to_str(self.weight)}]")
        if self.act:
            bits.append(f"A[{spec_to_str(self.act)}]")
        if self.kv:
            bits.append(f"KV[{spec_to_str(self.kv)}]")
        if self.embed:
            bits.append(f"E[{spec_to_str(self.embed)}]")
        if self.head:
            bits.append(f"H[{spec_to_str(self.head)}]")
        return f"{self.method} " + " ".join(bits)


__all__ = ["parse_format", "parse_granularity", "parse_spec", "spec_to_str", "spec_to_dict", "spec_from_dict",
           "QuantConfig", "asdict"]
