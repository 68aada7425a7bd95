"""lowbit: data-free quantization-aware training and PTQ baselines for Hugging Face causal LMs."""
__version__ = "0.1.0"

from .config import QuantConfig, parse_spec  # noqa: E402
from .formats import FP4_E2M1, FP6_E2M3, FP6_E3M2, FP8_E4M3, FP8_E5M2, NF4, FloatFormat, IntFormat, PowerOfTwo  # noqa: E402
from .granularity import PEG, GGUFBlock, PerChannel, PerGroup, PerTensor, PerToken  # noqa: E402
from .quantizer import (QParams, QuantizedWeight, QuantSpec, compute_qparams, dequantize, fake_quantize,  # noqa: E402
                        quantize, quantize_weight, storage_bits)

__all__ = [
    "__version__", "QuantConfig", "parse_spec", "QuantSpec", "QParams", "QuantizedWeight", "compute_qparams",
    "quantize", "dequantize", "fake_quantize", "quantize_weight", "storage_bits",
    "IntFormat", "FloatFormat", "NF4", "PowerOfTwo", "FP8_E4M3", "FP8_E5M2", "FP6_E3M2", "FP6_E2M3", "FP4_E2M1",
    "PerTensor", "PerChannel", "PerGroup", "GGUFBlock", "PerToken", "PEG",
    "load_model", "quantize_model", "evaluate", "size_report", "save_quantized", "load_quantized",
    "export_gguf",
]


def __getattr__(name):  # heavy entry points import transformers lazily
    if name == "load_model":
        from .models import load_model
        return load_model
    if name == "quantize_model":
        from .quantize import quantize_model
        return quantize_model
    if name == "evaluate":
        from .eval import evaluate
        return evaluate
    if name == "size_report":
        from .size import size_report
        return size_report
    if name in ("save_quantized", "load_quantized"):
        from . import export
        return getattr(export, name)
    if name == "export_gguf":
        from .gguf_export import export_gguf
        return export_gguf
    raise AttributeError(name)
