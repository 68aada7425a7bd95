"""The quantized modules and the one model-surgery helper.

``QuantLinear`` serves simulation, PTQ results and QAT alike. It keeps the float ``weight``
Parameter (shared with the original Linear) and a weight spec; optionally an activation spec
applied to its input (e.g. int8 per token). Two states:

* *live* (QAT, simulation): every forward fake-quantizes ``weight`` (min-max qparams recomputed,
  or the frozen ones if set), with the straight-through gradient;
* *frozen* (after PTQ): ``weight`` holds the dequantized values and the qparams are buffers, so
  the forward is a plain matmul. Quantizing a frozen weight again returns the same codes, which is
  how :mod:`lowbit.export` recovers them.

``QuantEmbedding`` does the same for token embeddings (one scale set per vocabulary row with
``PerChannel``); with tied embeddings the embedding and the head share one Parameter and one
set of qparams.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .quantizer import QParams, QuantizedWeight, QuantSpec, compute_qparams, fake_quantize, quantize_weight

_QP_FIELDS = ("scale", "zero", "super_scale", "super_min")


class _QuantWeightMixin:
    """Frozen-qparams bookkeeping shared by QuantLinear and QuantEmbedding."""

    w_spec: QuantSpec
    frozen: bool

    def _init_quant(self, w_spec: QuantSpec) -> None:
        self.w_spec = w_spec
        self.frozen = False
        for f in _QP_FIELDS:
            self.register_buffer(f"w_{f}", None)

    @property
    def qparams(self) -> QParams | None:
        if self.w_scale is None:
            return None
        return QParams(self.w_scale, self.w_zero, None, self.w_super_scale, self.w_super_min)

    def set_qparams(self, qp: QParams | None) -> None:
        for f in _QP_FIELDS:
            setattr(self, f"w_{f}", None if qp is None else getattr(qp, f))

    def freeze(self, qw: QuantizedWeight | None = None) -> QuantizedWeight:
        """Store the quantized weight (round-to-nearest if ``qw`` is None) and stop re-quantizing."""
        if qw is None:
            qw = quantize_weight(self.weight.detach(), self.w_spec)
        with torch.no_grad():
            self.weight.copy_(qw.dequantize(self.weight.dtype).to(self.weight.device))
        self.set_qparams(qw.qparams.to(self.weight.device))
        self.frozen = True
        return qw

    def quantized_weight(self) -> Tensor:
        if self.frozen or self.w_spec is None:  # no weight spec: activation-only quantization
            return self.weight
        return fake_quantize(self.weight, self.w_spec, self.qparams)


class QuantLinear(_QuantWeightMixin, nn.Linear):
    """``nn.Linear`` with a quantized weight and an optional input (activation) quantizer."""

    def __init__(self, in_features: int, out_features: int, bias: bool, w_spec: QuantSpec,
                 a_spec: QuantSpec | None = None, device=None, dtype=None):
        nn.Linear.__init__(self, in_features, out_features, bias, device=device, dtype=dtype)
        self._init_quant(w_spec)
        self.a_spec = a_spec

    @classmethod
    def from_linear(cls, lin: nn.Linear, w_spec: QuantSpec, a_spec: QuantSpec | None = None) -> "QuantLinear":
        """Wrap ``lin``; the new module shares its weight and bias Parameters."""
        with torch.device("meta"):
            q = cls(lin.in_features, lin.out_features, lin.bias is not None, w_spec, a_spec)
        q.weight = lin.weight
        q.bias = lin.bias
        return q

    def to_linear(self) -> nn.Linear:
        with torch.device("meta"):
            lin = nn.Linear(self.in_features, self.out_features, self.bias is not None)
        lin.weight, lin.bias = self.weight, self.bias
        return lin

    def forward(self, x: Tensor) -> Tensor:
        if self.a_spec is not None:
            x = fake_quantize(x, self.a_spec)
        return F.linear(x, self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        a = f", act={self.a_spec.describe()}" if self.a_spec else ""
        w = self.w_spec.describe() if self.w_spec else "float"
        return f"{self.in_features}, {self.out_features}, w={w}{a}, frozen={self.frozen}"


class QuantEmbedding(_QuantWeightMixin, nn.Embedding):
    """``nn.Embedding`` whose table is quantized (e.g. per vocabulary row)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, w_spec: QuantSpec, padding_idx=None,
                 device=None, dtype=None):
        nn.Embedding.__init__(self, num_embeddings, embedding_dim, padding_idx, device=device, dtype=dtype)
        self._init_quant(w_spec)

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, w_spec: QuantSpec) -> "QuantEmbedding":
        with torch.device("meta"):
            q = cls(emb.num_embeddings, emb.embedding_dim, w_spec, emb.padding_idx)
        q.weight = emb.weight
        # keep subclass behaviour such as Gemma's scaled embeddings
        q.embed_scale = getattr(emb, "embed_scale", None)
        q._orig_cls = type(emb)
        return q

    def forward(self, ids: Tensor) -> Tensor:
        out = F.embedding(ids, self.quantized_weight(), self.padding_idx)
        if self.embed_scale is not None:
            out = out * self.embed_scale.to(out)  # a plain attribute: follow the output's device and dtype
        return out

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, w={self.w_spec.describe()}, frozen={self.frozen}"


def replace_modules(model: nn.Module, fn: Callable[[nn.Module, str], nn.Module],
                    filter_fn: Callable[[nn.Module, str], bool]) -> list[str]:
    """Replace every submodule for which ``filter_fn(module, name)`` holds by ``fn(module, name)``.

    The only place where lowbit swaps modules in a model. Returns the replaced names.
    """
    targets = [(n, m) for n, m in model.named_modules() if n and filter_fn(m, n)]
    for name, mod in targets:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, fn(mod, name))
    return [n for n, _ in targets]


def quant_modules(model: nn.Module) -> dict[str, QuantLinear | QuantEmbedding]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantEmbedding))}


__all__ = ["QuantLinear", "QuantEmbedding", "replace_modules", "quant_modules", "compute_qparams"]
