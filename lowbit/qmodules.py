"""The quantized modules and the one model-surgery helper.

``QuantLinear`` serves simulation, PTQ results and QAT alike. It keeps the float ``weight``
Parameter (shared with the original Linear) and a weight spec; optionally an activation spec
applied to its input (e.g. int8 per token) and an output spec applied to its result (``out_spec``:
the KV-cache quantizer on the key and value projections, e.g. int4 per token; dynamic min-max
qparams, straight-through gradient). Two states:

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

from .hadamard import kron_transform
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
        # per-row mixed precision (lowbit.mixed): width per row (uint8, 0 = pruned row), kept input columns
        # (bool, None = all) and the allowed widths; ``weight`` holds the dequantized values, zeros where pruned
        self.register_buffer("w_bits", None)
        self.register_buffer("w_col_keep", None)
        self.w_bit_choices: list[int] | None = None

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
        learner = getattr(self, "learner", None)  # a learnable quantizer (lowbit.learnable), QAT
        if learner is not None:
            return learner(self.weight)
        return fake_quantize(self.weight, self.w_spec, self.qparams)


class QuantLinear(_QuantWeightMixin, nn.Linear):
    """``nn.Linear`` with a quantized weight and an optional input (activation) quantizer."""

    def __init__(self, in_features: int, out_features: int, bias: bool, w_spec: QuantSpec,
                 a_spec: QuantSpec | None = None, device=None, dtype=None):
        nn.Linear.__init__(self, in_features, out_features, bias, device=device, dtype=dtype)
        self._init_quant(w_spec)
        self.a_spec = a_spec
        self.out_spec: QuantSpec | None = None  # output quantizer (KV cache): fake-quantizes the matmul's result
        self.a_clip = 1.0  # activation range ratio (QuaRot's a_clip_ratio): the scale is multiplied by it
        # online input rotation (lowbit.quarot): x <- x @ (in_rot (x) M) before the activation quantizer
        self.register_buffer("in_rot", None)
        self.in_rot_inner = "hadamard"
        # SpQR's sparse part (lowbit.spqr): int32 flat indices and fp16 values of weights kept in 16 bits
        self.register_buffer("w_outlier_idx", None)
        self.register_buffer("w_outlier_val", None)

    @classmethod
    def from_linear(cls, lin: nn.Linear, w_spec: QuantSpec, a_spec: QuantSpec | None = None,
                    out_spec: QuantSpec | None = None) -> "QuantLinear":
        """Wrap ``lin``; the new module shares its weight and bias Parameters."""
        with torch.device("meta"):
            q = cls(lin.in_features, lin.out_features, lin.bias is not None, w_spec, a_spec)
        q.weight = lin.weight
        q.bias = lin.bias
        q.out_spec = out_spec
        return q

    def set_outliers(self, idx: Tensor, val: Tensor) -> None:
        """Keep the weights at flat positions ``idx`` in fp16 (call after :meth:`freeze`): ``weight`` holds
        ``val`` there, over the dense dequantized values."""
        self.w_outlier_idx = idx.to(device=self.weight.device, dtype=torch.int32)
        self.w_outlier_val = val.to(device=self.weight.device, dtype=torch.float16)
        with torch.no_grad():
            self.weight.view(-1)[self.w_outlier_idx.long()] = self.w_outlier_val.to(self.weight.dtype)

    def to_linear(self) -> nn.Linear:
        with torch.device("meta"):
            lin = nn.Linear(self.in_features, self.out_features, self.bias is not None)
        lin.weight, lin.bias = self.weight, self.bias
        return lin

    def set_input_transform(self, K: Tensor | None, inner: str = "hadamard") -> None:
        """Rotate the input online, ``x <- x @ (K (x) M)`` (:func:`lowbit.hadamard.kron_transform`; ``M`` is
        ``H_p / sqrt(p)`` or ``I_p`` by ``inner``), before the activation quantizer; None removes it. The
        caller rotates ``weight`` to match (``W <- W (K (x) M)``). It runs as a forward pre-hook, so forward
        hooks on this module (GPTQ's Hessian, calibration statistics) see the input the weight multiplies."""
        if K is not None and (K.dim() != 2 or K.shape[0] != K.shape[1] or self.in_features % K.shape[0]
                              or inner not in ("hadamard", "identity")):
            raise ValueError(f"input rotation {tuple(K.shape)} ({inner}) does not fit {self.in_features} inputs")
        dtype = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        self.in_rot = None if K is None else K.detach().to(self.weight.device, dtype)
        self.in_rot_inner = inner
        if K is not None and not getattr(self, "_in_rot_hooked", False):
            self.register_forward_pre_hook(_rotate_input)
            self._in_rot_hooked = True

    def forward(self, x: Tensor) -> Tensor:
        if self.a_spec is not None:
            qp = None
            if self.a_clip != 1.0:  # shrink the range to a_clip of it: scale * a_clip, same zero-point
                qp = compute_qparams(x, self.a_spec)
                qp.scale = qp.scale * self.a_clip
            x = fake_quantize(x, self.a_spec, qp)
        y = F.linear(x, self.quantized_weight(), self.bias)
        if self.out_spec is not None:  # KV cache: what the key/value projection writes is stored quantized
            y = fake_quantize(y, self.out_spec)
        return y

    def extra_repr(self) -> str:
        a = f", act={self.a_spec.describe()}" if self.a_spec else ""
        a += f", a_clip={self.a_clip}" if self.a_clip != 1.0 else ""
        a += f", out={self.out_spec.describe()}" if self.out_spec else ""
        if self.in_rot is not None:  # K (x) H_p or K (x) I_p
            m = self.in_rot.shape[0]
            a += f", in_rot=K{m}(x){'H' if self.in_rot_inner == 'hadamard' else 'I'}{self.in_features // m}"
        w = self.w_spec.describe() if self.w_spec else "float"
        if self.w_bits is not None:  # mixed precision: mean width of kept rows, pruned rows / columns
            b = self.w_bits.float()
            kept = b[b > 0]
            w = (f"mixed {float(kept.mean()) if kept.numel() else 0:.2f}b/row, {int((b == 0).sum())} rows"
                 + (f" {int((~self.w_col_keep).sum())} cols" if self.w_col_keep is not None else "") + " pruned")
        return f"{self.in_features}, {self.out_features}, w={w}{a}, frozen={self.frozen}"


def _rotate_input(mod: QuantLinear, args: tuple):
    """Forward pre-hook of :meth:`QuantLinear.set_input_transform`."""
    if mod.in_rot is None:
        return None
    return (kron_transform(args[0], mod.in_rot, mod.in_rot_inner), *args[1:])


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
