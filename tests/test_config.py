"""Names for formats, granularities and specs; dict round trips of specs and QuantConfig."""
from __future__ import annotations

import json

import pytest

from lowbit.config import (QuantConfig, parse_format, parse_granularity, parse_spec, spec_from_dict, spec_to_dict,
                           spec_to_str)
from lowbit.formats import FP4_E2M1, FP6_E2M3, FP6_E3M2, FP8_E4M3, FP8_E5M2, NF4, FloatFormat, IntFormat, PowerOfTwo
from lowbit.granularity import PEG, GGUFBlock, PerChannel, PerGroup, PerTensor, PerToken
from lowbit.quantizer import QuantSpec

FORMATS = {**{f"int{b}": IntFormat(b) for b in range(1, 9)},
           "fp8_e4m3": FloatFormat(4, 3, "fn"), "fp8_e5m2": FloatFormat(5, 2, "ieee"),
           "fp6_e3m2": FloatFormat(3, 2), "fp6_e2m3": FloatFormat(2, 3), "fp4_e2m1": FloatFormat(2, 1),
           "nf4": NF4(), **{f"pow2_{b}": PowerOfTwo(b) for b in range(2, 9)}}
PRESETS = {"mxfp8": FP8_E4M3, "mxfp8_e5m2": FP8_E5M2, "mxfp6": FP6_E3M2, "mxfp6_e2m3": FP6_E2M3, "mxfp4": FP4_E2M1,
           "mxint8": IntFormat(8), **{f"bfp{b}": IntFormat(b) for b in range(2, 9)}}
GRANULARITIES = {"tensor": PerTensor(), "channel": PerChannel(), "g128": PerGroup(128), "g32": PerGroup(32),
                 "g1": PerGroup(1), "gguf": GGUFBlock(256, 32, 6), "gguf256x32s6": GGUFBlock(256, 32, 6),
                 "gguf256x16s4": GGUFBlock(256, 16, 4), "token": PerToken(), "peg6": PEG(6, False),
                 "peg6p": PEG(6, True), "peg1": PEG(1, False)}


@pytest.mark.parametrize("name", FORMATS)
def test_parse_format_every_documented_name(name):
    assert parse_format(name) == FORMATS[name]
    assert parse_format(f"  {name.upper()} ") == FORMATS[name]
    assert parse_format(name).name == name  # the canonical spelling round-trips


@pytest.mark.parametrize("name", ["int", "fp8", "fp4", "e4m3", "nf3", "float16", "mxfp4", "bfp4", "", "int4x"])
def test_parse_format_unknown_lists_known(name):
    with pytest.raises(ValueError) as e:
        parse_format(name)
    msg = str(e.value)
    assert "\n" not in msg
    for known in ("int1..int8", "fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1", "nf4", "pow2_2..pow2_8",
                  "mxfp4", "bfp2..bfp8"):
        assert known in msg, msg


@pytest.mark.parametrize("name", GRANULARITIES)
def test_parse_granularity_every_documented_name(name):
    assert parse_granularity(name) == GRANULARITIES[name]
    assert parse_granularity(name.upper()) == GRANULARITIES[name]


@pytest.mark.parametrize("name", ["row", "group", "g", "g-1", "gguf256", "peg", "pegp", "tok", "channels", "g32x"])
def test_parse_granularity_unknown_lists_known(name):
    with pytest.raises(ValueError) as e:
        parse_granularity(name)
    msg = str(e.value)
    for known in ("tensor", "channel", "g<size>", "gguf", "token", "peg<k>", "peg<k>p"):
        assert known in msg, msg


@pytest.mark.parametrize("name", ["g0", "gguf256x48s6", "gguf256x32s1", "peg0"])
def test_parse_granularity_invalid_numbers(name):
    with pytest.raises(ValueError):
        parse_granularity(name)


@pytest.mark.parametrize("name", PRESETS)
def test_presets_expand_to_block32_e8m0(name):
    s = parse_spec(name)
    assert s == QuantSpec(PRESETS[name], PerGroup(32), symmetric=True, scale="e8m0")
    assert parse_spec(name, scale="e8m0") == s
    for r in ("floor", "ceil", "even", "rceil"):
        assert parse_spec(name, scale_rounding=r).scale_rounding == r
    assert parse_spec(name, "g16").granularity == PerGroup(16)
    with pytest.raises(ValueError, match="e8m0"):
        parse_spec(name, scale="fp16")


def test_mxfp4_with_fp16_scale_rejected():
    with pytest.raises(ValueError) as e:
        parse_spec("mxfp4", scale="fp16")
    assert "fp16" in str(e.value) and "\n" not in str(e.value)


def test_parse_spec_defaults_and_errors():
    s = parse_spec("int4")
    assert s == QuantSpec(IntFormat(4), PerChannel(), symmetric=False, scale="fp16")
    assert parse_spec("int4", "g128", symmetric=True).symmetric
    assert parse_spec("fp4_e2m1").symmetric  # table formats are always absmax-scaled
    assert parse_spec("int4", "g32", symmetric=True, scale="e8m0").scale == "e8m0"
    bad = [dict(fmt="int4", scale="fp32"), dict(fmt="int4", scale_rounding="up"), dict(fmt="int4", rounding="down"),
           dict(fmt="int4", scale="e8m0"),  # asymmetric int with power-of-two scales
           dict(fmt="int1", symmetric=True, scale="e8m0"), dict(fmt="bfp1"), dict(fmt="bfp9"),
           dict(fmt="fp4_e2m1", granularity="gguf"), dict(fmt="int4", granularity="gguf", clip_search=True),
           dict(fmt="int1", granularity="gguf", symmetric=True), dict(fmt="mxfp9"), dict(fmt="int4", granularity="x")]
    for kw in bad:
        with pytest.raises(ValueError):
            parse_spec(**kw)


def _all_specs():
    out = []
    for f in FORMATS:
        for g in ("tensor", "channel", "g64", "token", "peg4p"):
            out.append(parse_spec(f, g, symmetric=True))
            if f.startswith("int"):
                out.append(parse_spec(f, g, clip_search=True))
    for p in PRESETS:
        for r in ("floor", "rceil"):
            out.append(parse_spec(p, scale_rounding=r, rounding="stochastic"))
    out += [parse_spec("int4", "gguf"), parse_spec("int6", "gguf256x16s8", symmetric=True)]
    return out


def test_spec_dict_roundtrip():
    specs = _all_specs()
    assert len(specs) > 150
    for s in specs:
        d = spec_to_dict(s)
        assert json.loads(json.dumps(d)) == d
        assert spec_from_dict(d) == s
        assert isinstance(spec_to_str(s), str) and spec_to_str(s)


def test_spec_to_str_mentions_key_choices():
    s = spec_to_str(parse_spec("mxfp4", scale_rounding="rceil"))
    assert "fp4_e2m1" in s and "g32" in s and "e8m0-rceil" in s
    assert "asym" in spec_to_str(parse_spec("int4", "g128"))
    assert "mse-clip" in spec_to_str(parse_spec("int4", clip_search=True))


def test_quant_config_roundtrip():
    cfgs = [QuantConfig(),
            QuantConfig(weight=parse_spec("int4", "g128"), act=parse_spec("int8", "token", symmetric=True),
                        embed=parse_spec("mxfp4"), head=parse_spec("nf4", "g64"), method="gptq", seed=7,
                        skip=("mlp.down_proj", "self_attn.o_proj"), extra={"damp": 0.01, "order": [1, 2]}),
            QuantConfig(weight=parse_spec("int3", "gguf"), act=parse_spec("int8", "peg6p"), method="qat")]
    for c in cfgs:
        d = c.to_dict()
        d2 = json.loads(json.dumps(d))
        back = QuantConfig.from_dict(d2)
        assert back == c
        assert back.to_dict() == d
        assert isinstance(back.skip, tuple)
    c = cfgs[1]
    desc = c.describe()
    assert desc.startswith("gptq") and "W[" in desc and "A[" in desc and "E[" in desc and "H[" in desc


def test_quant_config_from_partial_dict_defaults():
    c = QuantConfig.from_dict({"weight": spec_to_dict(parse_spec("int4"))})
    assert c.weight == parse_spec("int4") and c.act is None and c.method == "rtn" and c.seed == 0 and c.skip == ()
