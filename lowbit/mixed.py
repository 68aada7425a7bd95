"""Per-channel mixed precision with learned bit-widths and 0-bit pruning (issue 5, Stage 1).

``lowbit quantize --method mixed --target-bits 3.0``. Every output channel (row) ``c`` of every Linear in
the decoder blocks gets its own bit-width, learned by differentiable noise injection (DiffQ, METHODS.md
5.1 and 5.3); a keep-gate per *structural unit* makes 0 bits (pruning) a real choice. The pipeline:

1. **Noise phase.** Row ``c`` has a bits logit ``l_c``; ``b_c = b_lo + (b_hi - b_lo) sigmoid(l_c)``. The
   training forward replaces the weight by pseudo-quantization noise of the matching step size::

       [lo_c, hi_c] = [s^lo_c min W[c], s^hi_c max W[c]],  s = sigmoid(gamma_c)   (learned clipping)
       Delta_c = (hi_c - lo_c) / (2^{b_c} - 1)
       W~[c]   = z_c (clamp(W[c], lo_c, hi_c) + Delta_c U(-1/2, 1/2))  (uniform: the variance of real rounding)

   The clipping factors (LWC, as in OmniQuant; ``mixed_noise_clip``) start at the per-row factor that minimises
   round-to-nearest error at the target width and are learned with the bits: without them the noise of a row
   with one outlier is that of its full min-max range, far above what the fine-tuned LSQ grid will make, and
   on SmolLM2 the noisy tiles lost most of their signal (relative tile error 0.85 at 2.5 bits/param).

   ``z`` are hard-concrete gates (Louizos et al. 2018; ``beta=2/3, gamma=-0.1, zeta=1.1``) over units that
   must be pruned together: a SwiGLU unit (row j of gate_proj and up_proj, column j of down_proj), a V/O
   unit (row j of v_proj with column j of o_proj for every query head of the KV group) and a Q/K unit (the
   RoPE pair ``j, j + d_h/2`` of a key head with the same rows of all its query heads). Rows writing the
   residual stream (o_proj, down_proj) are never pruned. The expected stored size

       E[bits] = sum_c P(z_c != 0) (b_c n_c + 16 + b_c) + R ceil(log2 |choices|) + [C if columns prunable]

   (codes, an fp16 scale and a b-bit zero-point per kept row, the bit-width index per row, a column mask;
   ``n_c`` the expected kept columns) over the decoder blocks' parameters (norms at 16 bits) is held at the
   target by a Lagrangian ``L = L_task + lambda (B - B_t)``, ``lambda <- max(0, lambda + eta (B - B_t))``
   after every step (dual ascent: no hand-tuned penalty constant), ``B_t`` annealed from the initial bits
   to the target over the first ``mixed_anneal`` of each stage. This phase runs the data-free QAT stages of
   :mod:`lowbit.dfqat` with the noisy weights (tiled: each tile of blocks matches the float tile and holds
   its own budget; then end to end with KD), on self-generated text by default.
2. **Integer bits.** A unit is kept if ``P(z != 0) > 0.5``; kept rows take the nearest allowed width. Then
   a greedy repair reaches the exact budget with the *real* storage formula: while over it, lower the row
   whose next lower width costs the least sensitivity per saved bit, ``sens_c(b) = F_c n_c Delta_c(b)^2 /
   12`` (``F_c`` the mean squared gradient of the KD loss w.r.t. row ``c``, a diagonal Fisher measured in a
   short pass after the noise phase); then raise rows while the budget allows (largest gain per bit).
3. **Fine-tune.** Bit-widths frozen; a per-row LSQ quantizer (learned fp16 scale started from the learned
   clipped range, integer zero-point,
   ``2^{b_c} - 1`` levels per row; pruned rows and columns exactly 0) is trained by the data-free QAT stages
   of :mod:`lowbit.dfqat` on the exact grid (tiles, then end to end; ``dfqat_tile_steps``,
   ``dfqat_e2e_steps``); then every Linear is frozen. The noise phase is shorter
   (``mixed_noise_tile_steps``, ``mixed_noise_e2e_steps``): it only has to find where the bits go.

**Scales per group.** With ``--w-granularity gN`` (a container ``int8 gN``) every row keeps one width but
has a scale and a zero-point per ``N`` input columns (the last group of a row may be short): the noise ranges,
the clipping search, the fine-tuned LSQ scales and the stored metadata are per (row, group), and the budget
pays ``G (16 + b_c)`` bits per kept row instead of ``16 + b_c``; the repair's sensitivity uses the root mean
square of the row's group ranges.

**Storage.** A mixed Linear is a :class:`~lowbit.qmodules.QuantLinear` whose ``w_spec`` is the container
``int8 channel asym`` and whose buffers ``w_bits`` (uint8 per row, 0 = pruned) and ``w_col_keep`` (bool per
column, or None) hold the map. :func:`pack_mixed` writes, per width ``b`` present, the rows of that width
(kept columns only) packed at ``b`` bits, their fp16 scales and ``b``-bit zero-points, plus the bit-width
index per row packed at ``ceil(log2 |choices|)`` bits and the column mask at 1 bit: so the file size
equals :func:`mixed_storage_bits` up to byte padding and the safetensors header.

Settings (``--opt KEY=VALUE``; :data:`DEFAULTS`): ``mixed_target_bits`` (the CLI's ``--target-bits``: bits per
parameter of the decoder blocks, metadata and norms included), ``mixed_choices`` (allowed widths, ``0``
allows pruning), ``mixed_range`` (``lo-hi`` of the continuous bits), ``mixed_attn_range`` /
``mixed_ffn_range`` (per-part ranges), ``mixed_attn_target`` / ``mixed_ffn_target`` (per-part budgets: that
part's Linears alone, metadata included, get their own Lagrangian term and their own repair; the rest of
the blocks gets what is left of ``mixed_target_bits``, which may be omitted when both parts have one),
``mixed_init_bits`` (start, default the part's target + 2), ``mixed_prune``,
``mixed_bits_lr``, ``mixed_gate_lr``, ``mixed_eta`` (dual step), ``mixed_anneal``, ``mixed_fisher_batches``,
``mixed_noise_tile_steps``, ``mixed_noise_e2e_steps`` (both 0: no noise phase, every row starts at
``mixed_init_bits`` and the widths come from the Fisher-greedy repair alone, a HAWQ-style baseline without
pruning), ``mixed_noise_clip``, ``mixed_keep_noise_weights`` (fine-tune from the noise
phase's weights instead of the float ones), ``mixed_embed_target`` / ``mixed_embed_range`` (widths per
vocabulary row of the token-embedding table under its own budget, learned in the end-to-end stages only, a
tied head sharing them; rows are never pruned), ``mixed_head_target`` / ``mixed_head_range`` (the same for an
untied LM head under its own budget; a tied head is refused there: its widths are the embedding's). Both phases
use the other ``dfqat_*`` settings (tile size, batch, learning rates, data, checkpoints: the fine-tune's go to
``<dfqat_ckpt>/finetune``).
"""
from __future__ import annotations

import heapq
import logging
import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .config import QuantConfig
from .formats import IntFormat
from .granularity import PerChannel, PerGroup, num_groups, to_groups
from .models import arch_of, blocks as blocks_of
from .packing import pack_bits, unpack_bits
from .qmodules import QuantLinear
from .quantize import register
from .quantizer import QParams, QuantSpec, _round_scale_fp16

log = logging.getLogger(__name__)

CONTAINER = QuantSpec(IntFormat(8), PerChannel(), symmetric=False)

SCALE_BITS = 16  # fp16 scale per kept row
HC_BETA, HC_GAMMA, HC_ZETA = 2.0 / 3.0, -0.1, 1.1  # hard-concrete constants (Louizos et al. 2018)


def container(group: int = 0) -> QuantSpec:
    """The int8 container of a mixed Linear: one scale and zero-point per row, or per ``group`` input columns."""
    return CONTAINER if not group else QuantSpec(IntFormat(8), PerGroup(group), symmetric=False)


def group_of(spec: QuantSpec | None) -> int:
    """The group size of a mixed container (0: one scale per row)."""
    return spec.granularity.size if spec is not None and isinstance(spec.granularity, PerGroup) else 0


def _n_groups(C: int, group: int) -> int:
    return num_groups(container(group).granularity, (1, C))


def _group_index(C: int, group: int, device=None) -> Tensor | None:
    """Group of every input column (``(C,)``; the last group may be short), or None for one group per row."""
    return None if _n_groups(C, group) == 1 else torch.arange(C, device=device) // group


def _group_minmax(w: Tensor, group: int) -> tuple[Tensor, Tensor]:
    """Per (row, group) ``min <= 0 <= max`` of ``w`` (R, C), shapes (R, G), through the shared grouped view (its
    padding repeats a row's last value, so a short last group keeps its min and max)."""
    wg, _ = to_groups(w, container(group).granularity)
    return wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)


def _per_col(t: Tensor, gid: Tensor | None) -> Tensor:
    """(R, G) per-group values spread over the columns (R, C); (R, 1) stays (R, 1) (broadcasts)."""
    return t if gid is None else t[:, gid]


DEFAULTS = {
    "mixed_target_bits": None,  # bits/param of the decoder blocks (required)
    "mixed_choices": "0,2,3,4,5,6,8",  # allowed integer widths; 0 = pruned unit
    "mixed_range": "2-8",  # continuous bits range [b_lo, b_hi]
    "mixed_attn_range": None,  # e.g. "3-8": attention Linears' own range
    "mixed_ffn_range": None,  # FFN Linears' own range
    "mixed_attn_target": None,  # bits/param of the attention Linears alone (their own budget; default: shared)
    "mixed_ffn_target": None,  # bits/param of the FFN Linears alone
    "mixed_init_bits": None,  # default: target + 2 (clamped into the range)
    "mixed_prune": True,  # keep-gates (0-bit units); false: every row keeps >= the lowest non-zero width
    "mixed_gate_init": 3.0,  # log alpha at start: P(keep) ~ 0.99
    "mixed_bits_lr": 0.05,  # Adam lr of the bits logits
    "mixed_gate_lr": 0.05,  # Adam lr of the gates' log alpha
    "mixed_eta": 0.05,  # dual ascent step of lambda per bit of excess
    "mixed_anneal": 0.3,  # fraction of each stage over which the target is annealed
    "mixed_fisher_batches": 8,  # KD batches of the sensitivity pass
    "mixed_noise_tile_steps": 100,  # noise phase: steps per tile (0: no tiled noise stage)
    "mixed_noise_e2e_steps": 50,  # noise phase: end-to-end steps (0: off)
    "mixed_noise_clip": True,  # learned per-row clipping of the noise range (false: the full min-max range)
    "mixed_keep_noise_weights": False,  # fine-tune from the noise phase's weights (default: from the float ones)
    "mixed_embed_target": None,  # bits/param of the token-embedding table (tied head included): learned widths
    "mixed_embed_range": "2-8",  # continuous bits range of the embedding rows
    "mixed_head_target": None,  # bits/param of an untied LM head: learned widths per vocabulary row
    "mixed_head_range": "2-8",  # continuous bits range of the head rows
}


# -------------------------------------------------------------------------------------- settings
def _range(s, what: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in str(s).split("-"))
    except ValueError:
        raise ValueError(f"{what} must look like 2-8 (lowest-highest bits), got {s!r}") from None
    if not 1 <= lo < hi <= 8:
        raise ValueError(f"{what} must satisfy 1 <= lo < hi <= 8, got {s!r}")
    return lo, hi


def settings(cfg: QuantConfig) -> dict:
    """The mixed settings of ``cfg.extra`` with defaults, checked (one-line ValueErrors)."""
    unknown = sorted(k for k in cfg.extra if k.startswith("mixed_") and k not in DEFAULTS)
    if unknown:
        raise ValueError(f"unknown mixed setting {unknown[0]!r}; known: {', '.join(DEFAULTS)}")
    o = {k: cfg.extra.get(k, v) for k, v in DEFAULTS.items()}
    t = o["mixed_target_bits"]
    part_t = {"attention": o["mixed_attn_target"], "ffn": o["mixed_ffn_target"]}
    for part, v in part_t.items():
        k = "mixed_attn_target" if part == "attention" else "mixed_ffn_target"
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.5 <= v <= 16):
            raise ValueError(f"{k} must be a number of bits per parameter in [0.5, 16], got {v!r}")
    if t is None and None in part_t.values():
        raise ValueError("--method mixed needs a size budget: pass --target-bits 3.0 (bits per parameter of the "
                         "decoder blocks), or both mixed_attn_target and mixed_ffn_target")
    if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.5 <= t <= 16):
        raise ValueError(f"--target-bits must be a number of bits per parameter in [0.5, 16], got {t!r}")
    o["part_target"] = {k: float(v) for k, v in part_t.items() if v is not None}
    try:
        choices = sorted({int(x) for x in str(o["mixed_choices"]).split(",")})
    except ValueError:
        raise ValueError(f"mixed_choices must be comma-separated integers such as 0,2,3,4,8, got "
                         f"{o['mixed_choices']!r}") from None
    if any(c < 0 or c > 8 for c in choices) or not [c for c in choices if c > 0]:
        raise ValueError(f"mixed_choices must be widths in 0..8 with at least one above 0, got {o['mixed_choices']!r}")
    if not o["mixed_prune"]:
        choices = [c for c in choices if c > 0]
    elif 0 not in choices:
        o["mixed_prune"] = False
    o["choices"] = choices
    o["range"] = _range(o["mixed_range"], "mixed_range")
    o["part_range"] = {"attention": _range(o["mixed_attn_range"], "mixed_attn_range") if o["mixed_attn_range"]
                       else o["range"],
                       "ffn": _range(o["mixed_ffn_range"], "mixed_ffn_range") if o["mixed_ffn_range"] else o["range"]}
    for part in ("embed", "head"):
        e = o[f"mixed_{part}_target"]
        if e is not None and (isinstance(e, bool) or not isinstance(e, (int, float)) or not 1 <= e <= 16):
            raise ValueError(f"mixed_{part}_target must be bits per parameter in [1, 16], got {e!r}")
        o[f"{part}_range"] = _range(o[f"mixed_{part}_range"], f"mixed_{part}_range")
    # each part starts 2 bits above its own budget (or the shared one)
    o["part_init"] = {part: float(o["mixed_init_bits"]) if o["mixed_init_bits"] is not None
                      else float(o["part_target"].get(part, t)) + 2 for part in part_t}
    for k in ("mixed_bits_lr", "mixed_gate_lr", "mixed_eta"):
        if isinstance(o[k], bool) or not isinstance(o[k], (int, float)) or not 0 < o[k] < math.inf:
            raise ValueError(f"{k} must be a positive number, got {o[k]!r}")
    if isinstance(o["mixed_anneal"], bool) or not isinstance(o["mixed_anneal"], (int, float)) or \
            not 0 <= o["mixed_anneal"] <= 1:
        raise ValueError(f"mixed_anneal must be a fraction in [0, 1], got {o['mixed_anneal']!r}")
    for k in ("mixed_prune", "mixed_noise_clip", "mixed_keep_noise_weights"):
        if not isinstance(o[k], bool):
            raise ValueError(f"{k} must be true or false, got {o[k]!r}")
    for k in ("mixed_fisher_batches", "mixed_noise_tile_steps", "mixed_noise_e2e_steps"):
        if isinstance(o[k], bool) or not isinstance(o[k], int) or o[k] < 0:
            raise ValueError(f"{k} must be an integer >= 0, got {o[k]!r}")
    return o


def index_bits(choices: list[int]) -> int:
    """Bits of the per-row width index: ``ceil(log2 |choices|)`` (0 with a single choice)."""
    return max(0, math.ceil(math.log2(len(choices))))


# -------------------------------------------------------------------------------------- coupling
@dataclass
class Unit:
    """Rows/columns pruned together across one block's Linears: ``rows[name]`` / ``cols[name]`` are ``(U, k)``
    index tensors (unit ``u`` owns indices ``[u, :]``)."""

    kind: str
    n: int
    rows: dict[str, Tensor]
    cols: dict[str, Tensor]


def block_units(block: nn.Module, config) -> list[Unit]:
    """The prunable units of one decoder block (Llama-family names; see the module docstring)."""
    mods = dict(block.named_modules())
    units = []
    h = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or h
    d = getattr(config, "head_dim", None) or config.hidden_size // h
    rep = h // kv
    if {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"} <= set(mods):
        n = mods["mlp.gate_proj"].out_features
        j = torch.arange(n).unsqueeze(1)
        units.append(Unit("ffn", n, {"mlp.gate_proj": j, "mlp.up_proj": j}, {"mlp.down_proj": j}))
    elif {"mlp.up_proj", "mlp.down_proj"} <= set(mods):  # plain MLP (no gate)
        n = mods["mlp.up_proj"].out_features
        j = torch.arange(n).unsqueeze(1)
        units.append(Unit("ffn", n, {"mlp.up_proj": j}, {"mlp.down_proj": j}))
    names = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"}
    if names <= set(mods) and mods["self_attn.k_proj"].out_features == kv * d and d % 2 == 0:
        g, jj = torch.meshgrid(torch.arange(kv), torch.arange(d), indexing="ij")  # (kv, d): key head, dim
        heads = g.unsqueeze(-1) * rep + torch.arange(rep)  # (kv, d, rep): the query heads of the group
        vo_rows = (g * d + jj).reshape(-1, 1)
        vo_cols = (heads * d + jj.unsqueeze(-1)).reshape(-1, rep)
        units.append(Unit("vo", kv * d, {"self_attn.v_proj": vo_rows}, {"self_attn.o_proj": vo_cols}))
        half = d // 2  # rotate_half pairs (j, j + d/2) rotate together
        g, jj = g[:, :half], jj[:, :half]
        pair = torch.stack([jj, jj + half], -1)  # (kv, d/2, 2)
        k_rows = (g.unsqueeze(-1) * d + pair).reshape(-1, 2)
        q_rows = ((g.unsqueeze(-1) * rep + torch.arange(rep)).unsqueeze(-1) * d + pair.unsqueeze(-2)).reshape(-1, 2 * rep)
        units.append(Unit("qk", kv * half, {"self_attn.q_proj": q_rows, "self_attn.k_proj": k_rows}, {}))
    return units


# ----------------------------------------------------------------------------------------- gates
class UnitGates(nn.Module):
    """Hard-concrete keep-gates, one per unit. ``z()`` samples once per training step (cached until
    :meth:`advance`, so every Linear of a unit sees the same sample); ``stochastic=False`` gives the
    deterministic gate."""

    def __init__(self, n: int, init: float, device=None):
        super().__init__()
        self.log_alpha = nn.Parameter(torch.full((n,), float(init), device=device))
        self.stochastic = True
        self._z: Tensor | None = None
        self._grad = False

    def p_keep(self) -> Tensor:
        """``P(z != 0) = sigmoid(log alpha - beta log(-gamma / zeta))``."""
        return torch.sigmoid(self.log_alpha - HC_BETA * math.log(-HC_GAMMA / HC_ZETA))

    def z(self) -> Tensor:
        grad = torch.is_grad_enabled()
        if self._z is None or self._grad != grad:
            la = self.log_alpha
            if self.stochastic:
                u = torch.rand_like(la).clamp(1e-6, 1 - 1e-6)
                s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + la) / HC_BETA)
            else:
                s = torch.sigmoid(la)
            self._z = (s * (HC_ZETA - HC_GAMMA) + HC_GAMMA).clamp(0, 1)
            self._grad = grad
        return self._z

    def advance(self) -> None:
        self._z = None


def _unit_index(unit: Unit, name: str, axis: str, n: int) -> Tensor | None:
    idx = (unit.rows if axis == "rows" else unit.cols).get(name)
    if idx is None:
        return None
    out = torch.full((n,), unit.n, dtype=torch.long)  # unit.n = the "always 1" slot of NoisyRows._per
    out[idx.reshape(-1)] = torch.arange(unit.n).repeat_interleave(idx.shape[1])
    return out


# -------------------------------------------------------------------------------------- learners
class NoisyRows(nn.Module):
    """Noise-phase learner of one Linear: bits logits per row, links to its row/column gates, the
    row ranges and a running diagonal Fisher per row (module docstring, phase 1)."""

    part: str | None = None  # "attention" or "ffn" for a block Linear (which budget it belongs to)

    def __init__(self, weight: Tensor, lo: float, hi: float, init_bits: float, row_gates=None, col_gates=None,
                 clip_bits: float | None = None, group: int = 0):
        super().__init__()
        R, C = weight.shape
        self.lo, self.hi, self.spec, self.group = lo, hi, container(group), group
        self.n_groups = _n_groups(C, group)
        # the group of every column (None: one range per row); not a checkpoint key when None
        self.register_buffer("gid", _group_index(C, group, weight.device))
        frac = min(max((init_bits - lo) / (hi - lo), 1e-3), 1 - 1e-3)
        self.logit = nn.Parameter(torch.full((R,), math.log(frac / (1 - frac)), device=weight.device))
        # learned clipping (LWC-style): the noise range is [s_lo min W[c], s_hi max W[c]], s = sigmoid(gamma),
        # started at the per-row range that minimises the rounding error at ``clip_bits`` (None: full range)
        self.clip = None
        if clip_bits is not None:
            f = _best_clip(weight.detach().float(), clip_bits, group)
            g = torch.logit(f.clamp(0.02, 0.98))
            self.clip = nn.Parameter(torch.stack([g, g.clone()], 1))  # (R, 2): gamma_lo, gamma_hi
        # shared UnitGates modules (submodules here too, so checkpoints hold them) and the unit of each row/column
        self.rgate = None if row_gates is None else row_gates[0]
        self.cgate = None if col_gates is None else col_gates[0]
        self.register_buffer("rindex", None if row_gates is None else row_gates[1].to(weight.device))
        self.register_buffer("cindex", None if col_gates is None else col_gates[1].to(weight.device))
        self.register_buffer("fisher", torch.zeros(R, device=weight.device))
        self.noisy = True
        self.mults = (1.0, 1.0)  # learning-rate multipliers of (bits, gates) w.r.t. the stage's q_lr

    def bits(self) -> Tensor:
        return self.lo + (self.hi - self.lo) * torch.sigmoid(self.logit)

    @property
    def row_gates(self):
        return None if self.rgate is None else (self.rgate, self.rindex)

    @property
    def col_gates(self):
        return None if self.cgate is None else (self.cgate, self.cindex)

    @staticmethod
    def _per(gates: UnitGates | None, index: Tensor | None, values: Tensor | None, n: int, device) -> Tensor:
        """Per-row (or column) values of the units (1 where no unit owns the row)."""
        if gates is None:
            return torch.ones(n, device=device)
        return torch.cat([values, values.new_ones(1)])[index]

    def _keep(self, which) -> Tensor | None:
        if which is None:
            return None
        gates, index = which
        return self._per(gates, index, gates.z(), 0, None)

    def p_rows(self, R: int) -> Tensor:
        g = self.rgate
        return self._per(g, self.rindex, None if g is None else g.p_keep(), R, self.logit.device)

    def p_cols(self, C: int) -> Tensor:
        g = self.cgate
        return self._per(g, self.cindex, None if g is None else g.p_keep(), C, self.logit.device)

    def clip_range(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """Per-row (per row and group with ``group``) ``(lo, hi)``, shapes (R, G), of the noise range: the
        min-max range (``min <= 0 <= max`` like the stored grid), shrunk by the row's learned clipping factors
        when there are any."""
        with torch.no_grad():
            mn, mx = _group_minmax(w, self.group)
        if self.clip is None:
            return mn, mx
        s = torch.sigmoid(self.clip)
        return s[:, :1] * mn, s[:, 1:] * mx

    def forward(self, w: Tensor) -> Tensor:
        wf = w.float()
        if self.noisy:
            lo, hi = self.clip_range(wf)
            delta = (hi - lo).clamp_min(1e-8) / (torch.pow(2.0, self.bits()) - 1).unsqueeze(1)
            lo, hi, delta = _per_col(lo, self.gid), _per_col(hi, self.gid), _per_col(delta, self.gid)
            if self.clip is not None:  # clipping error, then the rounding noise of the clipped grid
                wf = torch.minimum(torch.maximum(wf, lo), hi)
            wf = wf + delta * (torch.rand_like(wf) - 0.5)
        zr, zc = self._keep(self.row_gates), self._keep(self.col_gates)
        if zr is not None:
            wf = wf * zr.unsqueeze(1)
        if zc is not None:
            wf = wf * zc.unsqueeze(0)
        return wf.to(w.dtype)

    def lr_groups(self) -> list[tuple[list[nn.Parameter], float]]:
        out = [([self.logit] + ([self.clip] if self.clip is not None else []), self.mults[0])]
        for g in (self.rgate, self.cgate):
            if g is not None:
                out.append(([g.log_alpha], self.mults[1]))
        return out

    def expected_bits(self, shape: tuple[int, int], idx_bits: int) -> Tensor:
        """Differentiable expected storage of the Linear (module docstring)."""
        R, C = shape
        b = self.bits()
        n = self.p_cols(C).sum()
        per_row = b * n + self.n_groups * (SCALE_BITS + b)  # codes, then a scale and zero-point per group
        return (self.p_rows(R) * per_row).sum() + R * idx_bits + (C if self.col_gates is not None else 0)


@torch.no_grad()
def _best_clip(w: Tensor, bits: float, group: int = 0, grid: int = 20) -> Tensor:
    """Per-row factor ``s`` in [0.3, 1] whose range ``[s min W[c], s max W[c]]`` (of every ``group`` columns of
    the row) minimises the squared error of round-to-nearest at ``round(bits)`` bits (the AWQ/OmniQuant clipping
    search, one factor for both ends)."""
    b = max(1, int(math.floor(bits + 0.5)))
    gid = _group_index(w.shape[1], group, w.device)
    mn, mx = (_per_col(t, gid) for t in _group_minmax(w, group))
    best_err = torch.full((w.shape[0],), math.inf, device=w.device)
    best = torch.ones(w.shape[0], device=w.device)
    for f in torch.linspace(1.0, 0.3, grid).tolist():
        lo, hi = f * mn, f * mx
        step = ((hi - lo) / (2 ** b - 1)).clamp_min(1e-12)
        q = torch.round((w.clamp(lo, hi) - lo) / step) * step + lo
        err = (q - w).pow(2).sum(1)
        better = err < best_err
        best_err, best = torch.where(better, err, best_err), torch.where(better, torch.full_like(best, f), best)
    return best


def _row_minmax_qparams(w: Tensor, bits: Tensor, col_keep: Tensor | None, clip: Tensor | None = None,
                        group: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Min-max (min <= 0 <= max) fp16 scale and integer zero per row, or per row and ``group`` columns, over the
    kept columns, shapes (R, G), and qmax (R, 1) for widths ``bits`` (R,); ``clip`` (R, 2): factors of the min
    and the max (learned clipping). A group with no kept column gets scale 1, zero 0."""
    wk = w if col_keep is None else w * col_keep.to(w.dtype).unsqueeze(0)  # pruned columns: 0 is within [min, max]
    mn, mx = _group_minmax(wk, group)
    if clip is not None:
        mn, mx = mn * clip[:, :1].to(mn), mx * clip[:, 1:].to(mx)
    qmax = (torch.pow(2.0, bits.float()) - 1).clamp_min(1).unsqueeze(1)
    scale = _round_scale_fp16(torch.where(mx > mn, (mx - mn) / qmax, torch.ones_like(mx)))
    zero = torch.round(-mn / scale).clamp(torch.zeros_like(qmax), qmax)
    return scale, zero, qmax


class RowLSQ(nn.Module):
    """Fine-tune learner: a learned fp16 scale per row, or per row and ``group`` input columns (LSQ gradient,
    ``g = 1/sqrt(n qmax)``, ``n`` the values sharing the scale), a fixed integer zero-point, ``2^{b_c} - 1``
    levels in row ``c``; pruned rows/columns are exactly 0."""

    def __init__(self, weight: Tensor, bits: Tensor, col_keep: Tensor | None, clip: Tensor | None = None,
                 group: int = 0):
        super().__init__()
        w = weight.detach().float()
        C = w.shape[1]
        self.spec, self.group = container(group), group
        self.register_buffer("gid", _group_index(C, group, w.device))
        self.register_buffer("bits", bits.to(w.device, torch.uint8))
        self.register_buffer("col_keep", None if col_keep is None else col_keep.to(w.device, torch.bool))
        scale, zero, qmax = _row_minmax_qparams(w, self.bits, self.col_keep, clip, group)
        self.scale = nn.Parameter(scale)  # (R, G)
        self.register_buffer("zero", zero)
        self.register_buffer("qmax", qmax)
        n = C if col_keep is None else int(col_keep.sum())
        n = min(n, group) if self.gid is not None else n
        self.register_buffer("grad_scale", 1.0 / torch.sqrt(max(n, 1) * self.qmax))

    def forward(self, w: Tensor) -> Tensor:
        s = _round_scale_fp16(self.scale.detach()) + (self.scale * self.grad_scale
                                                      - (self.scale * self.grad_scale).detach())
        s, zero = _per_col(s, self.gid), _per_col(self.zero, self.gid)
        v = w.float() / s + zero
        q = torch.clamp(torch.round(v.detach()) + (v - v.detach()), torch.zeros_like(self.qmax), self.qmax)
        y = s * (q - zero)
        y = y * (self.bits > 0).unsqueeze(1)
        if self.col_keep is not None:
            y = y * self.col_keep.unsqueeze(0)
        return y.to(w.dtype)

    @torch.no_grad()
    def qparams(self) -> QParams:
        return QParams(_round_scale_fp16(self.scale.detach()).unsqueeze(-1).clone(), self.zero.unsqueeze(-1).clone())


# --------------------------------------------------------------------------------------- storage
def mixed_storage_bits(bits: Tensor, col_keep: Tensor | None, shape: tuple[int, int], idx_bits: int,
                       group: int = 0) -> dict[str, int]:
    """Stored bits of a mixed Linear: codes, fp16 scales and b-bit zero-points of kept rows (one per row, or one
    per ``group`` columns of the row), the width index per row and the column mask (exact; bytes are padded
    per packed tensor on disk)."""
    R, C = shape
    b = bits.long()
    G = _n_groups(C, group)
    kept_cols = C if col_keep is None else int(col_keep.sum())
    codes = int(b.sum()) * kept_cols
    meta = G * (int((b > 0).sum()) * SCALE_BITS + int(b.sum())) + R * idx_bits + (C if col_keep is not None else 0)
    return {"codes": codes, "meta": meta, "total": codes + meta}


def pack_mixed(w: Tensor, qp: QParams, bits: Tensor, col_keep: Tensor | None, choices: list[int],
               group: int = 0) -> dict[str, Tensor]:
    """The stored tensors of a frozen mixed Linear (keys relative to the module; see the module docstring);
    with ``group``, ``scale_b{b}`` is (rows, groups) and ``zero_b{b}`` packs rows x groups zero-points."""
    from .quantizer import quantize

    R = w.shape[0]
    codes = quantize(w.float(), qp, container(group))
    scale, zero = qp.scale.reshape(R, -1), qp.zero.reshape(R, -1)
    pos = {c: i for i, c in enumerate(choices)}
    bl = [int(x) for x in bits.tolist()]
    out = {"bitmap": pack_bits(torch.tensor([pos[x] for x in bl], dtype=torch.int64), max(1, index_bits(choices)))}
    if col_keep is not None:
        out["col_keep"] = pack_bits(col_keep.to(torch.int64), 1)
        codes = codes[:, col_keep]
    for b in sorted(set(bl) - {0}):
        rows = bits == b
        out[f"qweight_b{b}"] = pack_bits(codes[rows], b)
        sc = scale[rows]
        out[f"scale_b{b}"] = (sc.reshape(-1) if sc.shape[1] == 1 else sc).half().contiguous()
        out[f"zero_b{b}"] = pack_bits(zero[rows].long(), b)
    return out


def unpack_mixed(t: dict[str, Tensor], shape: tuple[int, int], choices: list[int], col_pruned: bool,
                 group: int = 0) -> tuple[Tensor, QParams, Tensor, Tensor | None]:
    """Inverse of :func:`pack_mixed`: ``(weight, qparams, bits, col_keep)``; bit-exact."""
    R, C = shape
    G, gid = _n_groups(C, group), _group_index(C, group)
    idx = unpack_bits(t["bitmap"], max(1, index_bits(choices)), R)
    if int(idx.max()) >= len(choices):
        raise ValueError("mixed bit-width map has an index outside its choices; the file is corrupt")
    bits = torch.tensor(choices, dtype=torch.int64)[idx]
    col_keep = unpack_bits(t["col_keep"], 1, C).bool() if col_pruned else None
    kc = C if col_keep is None else int(col_keep.sum())
    kgid = None if gid is None else (gid if col_keep is None else gid[col_keep])  # group of each kept column
    scale, zero = torch.ones(R, G), torch.zeros(R, G)
    w = torch.zeros(R, C)
    for b in sorted(set(bits.tolist()) - {0}):
        rows = bits == b
        n = int(rows.sum())
        q = unpack_bits(t[f"qweight_b{b}"], b, n * kc).view(n, kc).float()
        s = t[f"scale_b{b}"].float().view(n, G)
        z = unpack_bits(t[f"zero_b{b}"], b, n * G).float().view(n, G)
        scale[rows], zero[rows] = s, z
        vals = _per_col(s, kgid) * (q - _per_col(z, kgid))
        if col_keep is None:
            w[rows] = vals
        else:
            block = torch.zeros(n, C)
            block[:, col_keep] = vals
            w[rows] = block
    return w, QParams(scale.view(R, G, 1), zero.view(R, G, 1)), bits.to(torch.uint8), col_keep


# ------------------------------------------------------------------------------------------ budget
def _model_params(block: nn.Module) -> list[nn.Parameter]:
    """The block's own parameters (what is stored), not the learners' bits logits and gates."""
    return [p for n, p in block.named_parameters() if ".learner." not in f".{n}"]


def _mixed_modules(block: nn.Module) -> list[nn.Module]:
    return [m for m in block.modules() if isinstance(getattr(m, "learner", None), NoisyRows)]


class Budget:
    """The Lagrangian size penalty of the noise phase: called as ``penalty(root, step, steps)`` by the dfqat
    stages (root: a tile, or the whole model), it returns ``lambda (B - B_t)`` for the blocks in ``root``,
    updates ``lambda`` by dual ascent and advances the gates' samples.

    ``parts``: the block parts (``attention``, ``ffn``) whose Linears this budget covers (None: all);
    ``fixed``: whether it also counts the blocks' other parameters (norms, float Linears) at 16 bits. With
    per-part targets there is one budget per such part (``fixed=False``) and one for the rest."""

    def __init__(self, model: nn.Module, opts: dict, idx_bits: int, *, target: float | None = None,
                 parts: tuple[str, ...] | None = None, fixed: bool = True, name: str = "blocks"):
        self.opts, self.idx_bits, self.name, self.parts, self.fixed = opts, idx_bits, name, parts, fixed
        self.target = float(opts["mixed_target_bits"] if target is None else target)
        self.blocks = list(blocks_of(model))
        self.lam = 0.0
        self.history: list[dict] = []
        self._fixed = {}
        self._members: dict[int, list[nn.Module]] = {}
        for i, b in enumerate(self.blocks):
            mixed = _mixed_modules(b)
            self._members[i] = [m for m in mixed if parts is None or m.learner.part in parts]
            mixed_ids = {id(m.weight) for m in mixed}
            other = [p for p in _model_params(b) if id(p) not in mixed_ids] if fixed else []
            params = sum(m.weight.numel() for m in self._members[i]) + sum(p.numel() for p in other)
            self._fixed[i] = (16 * sum(p.numel() for p in other), params)
        self._start: dict[tuple[int, ...], float] = {}

    def _scope(self, root: nn.Module) -> list[int]:
        ids = {id(m) for m in root.modules()}
        return [i for i, b in enumerate(self.blocks) if id(b) in ids]

    def stored_bits(self, scope: list[int]) -> tuple[Tensor | float, int]:
        """Expected stored bits and parameter count of this budget's share of the blocks in ``scope``."""
        tot, params = 0.0, 0
        for i in scope:
            fixed, p = self._fixed[i]
            tot, params = tot + fixed, params + p
            for m in self._members[i]:
                tot = tot + m.learner.expected_bits(tuple(m.weight.shape), self.idx_bits)
        return tot, params

    def bits_per_param(self, scope: list[int]) -> Tensor:
        tot, params = self.stored_bits(scope)
        return torch.as_tensor(tot / max(params, 1))

    def __call__(self, root: nn.Module, step: int, steps: int) -> Tensor:
        scope = self._scope(root)
        B = self.bits_per_param(scope)
        key = tuple(scope)
        if step == 0 or key not in self._start:
            self._start[key] = float(B.detach())
        target = self.target
        start = max(self._start[key], target)
        a = self.opts["mixed_anneal"] * steps
        bt = target + (start - target) * max(0.0, 1 - step / a) if a > 0 else target
        excess = float(B.detach()) - bt
        self.lam = max(0.0, self.lam + self.opts["mixed_eta"] * excess)
        if step % 10 == 0 or step + 1 == steps:
            self.history.append({"budget": self.name, "blocks": [scope[0], scope[-1]], "step": step,
                                 "bits": float(B.detach()), "target": bt, "lambda": self.lam})
        return self.lam * (B - bt)


def rest_target(model: nn.Module, opts: dict) -> float:
    """Bits/param left to the parts without their own target (and the norms) so that the whole decoder blocks
    meet ``mixed_target_bits``: ``(T P_blocks - sum_p t_p P_p) / (P_blocks - sum_p P_p)``."""
    own = opts["part_target"]
    total = sum(p.numel() for b in blocks_of(model) for p in _model_params(b))
    part = {k: sum(m.weight.numel() for b in blocks_of(model) for m in _mixed_modules(b) if m.learner.part == k)
            for k in own}
    rest = total - sum(part.values())
    return (float(opts["mixed_target_bits"]) * total - sum(own[k] * n for k, n in part.items())) / max(rest, 1)


def block_budgets(model: nn.Module, opts: dict, idx_bits: int) -> list[Budget]:
    """One :class:`Budget` per part with its own target (``mixed_attn_target`` / ``mixed_ffn_target``), then
    one for the rest of the blocks (:func:`rest_target`: the blocks as a whole meet ``mixed_target_bits``);
    none for the rest when nothing learned is left in it."""
    own = opts["part_target"]
    out = [Budget(model, opts, idx_bits, target=t, parts=(part,), fixed=False, name=part) for part, t in own.items()]
    rest = tuple(p for p in ("attention", "ffn") if p not in own)
    if rest:
        out.append(Budget(model, opts, idx_bits, parts=rest if own else None, fixed=True, name="rest" if own else
                          "blocks", target=rest_target(model, opts) if own else None))
    return out


class Penalty:
    """The sum of several budgets' terms, called like one :class:`Budget`; the gates advance once per step."""

    def __init__(self, budgets: list[Budget]):
        self.budgets = budgets

    def __call__(self, root: nn.Module, step: int, steps: int) -> Tensor:
        terms = [b(root, step, steps) for b in self.budgets]
        for m in root.modules():
            if isinstance(m, UnitGates):
                m.advance()
        return sum(terms[1:], terms[0])

    @property
    def history(self) -> list[dict]:
        return [h for b in self.budgets for h in b.history]

    def blocks_bits_per_param(self, model: nn.Module) -> float:
        """Expected bits/param of all the decoder blocks (every budget's share plus what none learns)."""
        blocks = list(blocks_of(model))
        tot, params = 0.0, 0
        for b in self.budgets:
            t, p = b.stored_bits(list(range(len(blocks))))
            tot += float(t.detach() if torch.is_tensor(t) else t)  # a report: no graph
            params += p
        if not any(b.fixed for b in self.budgets):  # every part has its own budget: the rest stays at 16 bits
            for blk in blocks:
                ids = {id(m.weight) for m in _mixed_modules(blk)}
                n = sum(p.numel() for p in _model_params(blk) if id(p) not in ids)
                tot, params = tot + 16 * n, params + n
        return tot / max(params, 1)


# ---------------------------------------------------------------------------------------- attach
def _part(rel: str, arch) -> str:
    return "attention" if rel in arch.attn else "ffn"


def attach_noise(model: nn.Module, opts: dict, group: int = 0) -> dict[str, NoisyRows]:
    """Give every live block Linear a :class:`NoisyRows` learner (one noise range per row, or per ``group``
    input columns of a row) and every unit its gates."""
    arch = arch_of(model)
    learners = {}
    for bi, block in enumerate(blocks_of(model)):
        units = block_units(block, model.config) if opts["mixed_prune"] else []
        gates = {}
        for u in units:
            g = UnitGates(u.n, opts["mixed_gate_init"], device=next(block.parameters()).device)
            gates[u.kind] = (u, g)
        for rel, m in block.named_modules():
            if not isinstance(m, QuantLinear) or m.frozen or m.w_spec is None:
                continue
            row_g = col_g = None
            for u, g in gates.values():
                if rel in u.rows:
                    row_g = (g, _unit_index(u, rel, "rows", m.out_features))
                if rel in u.cols:
                    col_g = (g, _unit_index(u, rel, "cols", m.in_features))
            part = _part(rel, arch)
            lo, hi = opts["part_range"][part]
            init = min(max(opts["part_init"][part], lo), hi)
            clip = min(max(float(opts["part_target"].get(part, opts["mixed_target_bits"] or 0)), lo), hi)
            m.learner = NoisyRows(m.weight.detach(), lo, hi, init, row_g, col_g,
                                  clip_bits=clip if opts["mixed_noise_clip"] else None, group=group)
            m.learner.part = part
            learners[f"{arch.layers}.{bi}.{rel}"] = m.learner
    return learners


def _table_learner(weight: Tensor, opts: dict, part: str) -> NoisyRows:
    """The per-row learner of a vocabulary table (``part``: embed or head) under ``mixed_<part>_target``: no gates,
    started 2 bits above the target, its clipping searched at the target (both clamped into the part's range)."""
    lo, hi = opts[f"{part}_range"]
    target = float(opts[f"mixed_{part}_target"])
    return NoisyRows(weight.detach(), lo, hi, min(max(target + 2, lo), hi),
                     clip_bits=min(max(target, lo), hi) if opts["mixed_noise_clip"] else None)


def attach_embedding(model: nn.Module, opts: dict) -> tuple[str, NoisyRows] | None:
    """With ``mixed_embed_target``: the token embedding becomes a live ``QuantEmbedding`` with a per-row
    (vocabulary row) :class:`NoisyRows` learner, no pruning; a tied head is a ``QuantLinear`` sharing the weight
    and the learner. Returns ``(embedding name, learner)``."""
    if opts["mixed_embed_target"] is None:
        return None
    from .models import get_module, set_module, tied_embeddings
    from .qmodules import QuantEmbedding

    arch = arch_of(model)
    emb = QuantEmbedding.from_embedding(get_module(model, arch.embed), CONTAINER)
    set_module(model, arch.embed, emb)
    emb.learner = _table_learner(emb.weight, opts, "embed")
    if tied_embeddings(model):
        head = QuantLinear.from_linear(get_module(model, arch.head), CONTAINER)
        head.learner = emb.learner
        set_module(model, arch.head, head)
    return arch.embed, emb.learner


def attach_head(model: nn.Module, opts: dict, cfg: QuantConfig) -> tuple[str, NoisyRows] | None:
    """With ``mixed_head_target``: an untied LM head becomes a live ``QuantLinear`` with a per-row (vocabulary
    row) :class:`NoisyRows` learner, no pruning, under its own budget. A tied head shares the embedding's
    widths (``mixed_embed_target``). Returns ``(head name, learner)``."""
    if opts["mixed_head_target"] is None:
        return None
    from .models import get_module, set_module, tied_embeddings

    if tied_embeddings(model):
        raise ValueError("mixed_head_target: this model ties its head to the token embeddings, so the head's widths "
                         "are the embedding's; use --opt mixed_embed_target instead")
    if cfg.head is not None:
        raise ValueError("mixed_head_target learns the head's widths; drop --head-format (a uniform head format)")
    arch = arch_of(model)
    head = QuantLinear.from_linear(get_module(model, arch.head), CONTAINER)
    set_module(model, arch.head, head)
    head.learner = _table_learner(head.weight, opts, "head")
    return arch.head, head.learner


class TableBudget:
    """The own Lagrangian term of a vocabulary table (the token embedding, or an untied head) under
    ``mixed_<part>_target`` (end-to-end stages only: the tiles do not see it)."""

    def __init__(self, mod: nn.Module, opts: dict, idx_bits: int, part: str = "embed"):
        self.mod, self.opts, self.idx_bits, self.part, self.lam = mod, opts, idx_bits, part, 0.0
        self.history: list[dict] = []

    def bits_per_param(self) -> Tensor:
        w = self.mod.weight
        return self.mod.learner.expected_bits(tuple(w.shape), self.idx_bits) / w.numel()

    def __call__(self, step: int, steps: int) -> Tensor:
        B = self.bits_per_param()
        target = float(self.opts[f"mixed_{self.part}_target"])
        excess = float(B.detach()) - target
        self.lam = max(0.0, self.lam + self.opts["mixed_eta"] * excess)
        if step % 10 == 0 or step + 1 == steps:
            self.history.append({"step": step, "bits": float(B.detach()), "lambda": self.lam})
        return self.lam * (B - target)


def _levels(allowed: list[int], lo: float, hi: float) -> list[int]:
    """The allowed widths a row with the continuous range ``[lo, hi]`` may round to."""
    return [c for c in allowed if lo - 0.5 <= c <= hi + 0.5] or allowed


def _nearest(b: float, allowed: list[int]) -> int:
    return min(allowed, key=lambda c: (abs(c - b), c))


@torch.no_grad()
def integer_bits(model: nn.Module, learners: dict[str, NoisyRows], opts: dict, *,
                 pool: tuple[float, int, int] | None = None, name: str = "blocks") -> dict[str, dict]:
    """Round the learned widths (pruning units with ``P(keep) <= 0.5``) and repair to the exact budget with the
    greedy sensitivity rule of the module docstring. Returns ``{name: {"bits", "col_keep"}}``. ``pool``:
    ``(target bits/param, parameters, fixed bits)`` of another budget than the decoder blocks' (the embedding
    table's)."""
    mods = dict(model.named_modules())
    allowed = [c for c in opts["choices"] if c > 0]
    ib = index_bits(opts["choices"])
    state = {}
    for name, lr in learners.items():
        m = mods[name]
        R, C = m.weight.shape
        bits = torch.tensor([_nearest(float(b), _levels(allowed, lr.lo, lr.hi))
                             for b in lr.bits().tolist()], dtype=torch.int64)
        if lr.row_gates is not None:
            bits[lr.p_rows(R).cpu() <= 0.5] = 0
        col_keep = None if lr.col_gates is None else (lr.p_cols(C).cpu() > 0.5)
        lo_c, hi_c = lr.clip_range(m.weight.detach().float())
        # the (clipped) range the noise used; with groups the root mean square over the row's groups, so that
        # n Delta^2 below is the sum of the groups' n_g Delta_g^2 (equal groups)
        d = (hi_c - lo_c).detach().float()
        rng = (d[:, 0] if d.shape[1] == 1 else d.pow(2).mean(1).sqrt()).cpu().clamp_min(1e-8)
        state[name] = {"bits": bits, "col_keep": col_keep, "range": rng, "ib": ib, "group": lr.group,
                       "G": lr.n_groups,
                       "fisher": lr.fisher.detach().float().cpu(), "shape": (R, C), "lo": lr.lo, "hi": lr.hi}
    # the budget: bits of every block parameter (mixed Linears exactly, the rest at 16) over their count
    if pool is None:
        params = fixed = 0
        mixed_ids = {id(mods[n].weight) for n in learners}
        for b in blocks_of(model):
            for p in _model_params(b):
                params += p.numel()
                if id(p) not in mixed_ids:
                    fixed += 16 * p.numel()
        target = opts["mixed_target_bits"]
    else:
        target, params, fixed = pool
    budget = target * params

    def size(st) -> int:
        return mixed_storage_bits(st["bits"], st["col_keep"], st["shape"], ib, st["group"])["total"]

    total = fixed + sum(size(st) for st in state.values())
    levels = {name: _levels(allowed, st["lo"], st["hi"]) for name, st in state.items()}

    def sens(st, r: int, b: int) -> float:
        if b == 0:
            return math.inf
        n = st["shape"][1] if st["col_keep"] is None else int(st["col_keep"].sum())
        d = float(st["range"][r]) / (2 ** b - 1)
        return float(st["fisher"][r]) * n * d * d / 12

    def kept(st) -> int:
        return st["shape"][1] if st["col_keep"] is None else int(st["col_keep"].sum())

    def step_down(name, r):
        st = state[name]
        b = int(st["bits"][r])
        lower = [c for c in levels[name] if c < b]
        if b == 0 or not lower:
            return None
        nb = lower[-1]
        saved = (b - nb) * (kept(st) + st["G"])  # the codes and a zero-point per group
        return (sens(st, r, nb) - sens(st, r, b)) / saved, nb, saved

    def step_up(name, r):
        st = state[name]
        b = int(st["bits"][r])
        higher = [c for c in levels[name] if c > b]
        if b == 0 or not higher:
            return None
        nb = higher[0]
        cost = (nb - b) * (kept(st) + st["G"])
        return (sens(st, r, b) - sens(st, r, nb)) / cost, nb, cost

    if total > budget:
        heap = []
        for name, st in state.items():
            for r in range(st["shape"][0]):
                s = step_down(name, r)
                if s is not None:
                    heap.append((s[0], name, r))
        heapq.heapify(heap)
        while total > budget and heap:
            _, name, r = heapq.heappop(heap)
            s = step_down(name, r)
            if s is None:
                continue
            state[name]["bits"][r] = s[1]
            total -= s[2]
            s2 = step_down(name, r)
            if s2 is not None:
                heapq.heappush(heap, (s2[0], name, r))
        if total > budget and opts["mixed_prune"]:  # still over: prune whole units, least likely kept first
            total = _prune_units(state, learners, total, budget)
        if total > budget:
            raise ValueError(f"a {name} budget of {target} bits/param is below what the lowest width "
                             f"({min(allowed)} bits) and the metadata can reach ({total / params:.3f}); raise it "
                             "or allow pruning (mixed_choices with 0)")
    heap = []
    for name, st in state.items():
        for r in range(st["shape"][0]):
            s = step_up(name, r)
            if s is not None:
                heap.append((-s[0], name, r))
    heapq.heapify(heap)
    while heap:
        _, name, r = heapq.heappop(heap)
        s = step_up(name, r)
        if s is None or total + s[2] > budget:
            continue
        state[name]["bits"][r] = s[1]
        total += s[2]
        s2 = step_up(name, r)
        if s2 is not None:
            heapq.heappush(heap, (-s2[0], name, r))
    return {n: {"bits": st["bits"], "col_keep": st["col_keep"],
                "clip": None if learners[n].clip is None else torch.sigmoid(learners[n].clip.detach()),
                "group": learners[n].group}
            for n, st in state.items()} | \
        {"_total": {"bits_per_param": total / params, "params": params}}


def block_pools(model: nn.Module, learners: dict[str, NoisyRows], opts: dict
                ) -> list[tuple[str, dict[str, NoisyRows], tuple[float, int, int]]]:
    """The budgets of :func:`integer_bits` for the decoder blocks, as ``(name, learners, pool)``: one per part
    with its own target (its Linears only), then the rest (the other Linears, norms and float parameters at
    16 bits) under :func:`rest_target`; the rest is left out when it learns nothing."""
    mods = dict(model.named_modules())
    own = opts["part_target"]
    pools = []
    for part, t in own.items():
        sub = {n: lr for n, lr in learners.items() if lr.part == part}
        pools.append((part, sub, (t, sum(mods[n].weight.numel() for n in sub), 0)))
    rest = {n: lr for n, lr in learners.items() if lr.part not in own}
    if rest:
        ids = {id(mods[n].weight) for n in learners}
        other = sum(p.numel() for b in blocks_of(model) for p in _model_params(b) if id(p) not in ids)
        params = sum(mods[n].weight.numel() for n in rest) + other
        pools.append(("rest" if own else "blocks", rest, (rest_target(model, opts), params, 16 * other)))
    return pools


def check_budget(model: nn.Module, learners: dict[str, NoisyRows], opts: dict, pool: tuple[float, int, int],
                 name: str) -> None:
    """Refuse, before any training, a budget that :func:`integer_bits` could not reach: every row at the
    lowest width its range allows and, when pruning is allowed, units pruned until it fits (all of them at
    worst; rows that write the residual stream have no gate and stay)."""
    allowed = [c for c in opts["choices"] if c > 0]
    ib = index_bits(opts["choices"])
    target, params, fixed = pool
    mods = dict(model.named_modules())
    state = {}
    for n, lr in learners.items():
        R, C = mods[n].weight.shape
        state[n] = {"bits": torch.full((R,), min(_levels(allowed, lr.lo, lr.hi)), dtype=torch.int64),
                    "col_keep": None if lr.col_gates is None else torch.ones(C, dtype=torch.bool),
                    "shape": (R, C), "ib": ib, "group": lr.group}
    total = fixed + sum(mixed_storage_bits(st["bits"], st["col_keep"], st["shape"], ib, st["group"])["total"]
                        for st in state.values())
    if total > target * params and opts["mixed_prune"]:
        total = _prune_units(state, learners, total, target * params)
    if total > target * params:
        low = min(int(st["bits"].max()) for st in state.values())
        raise ValueError(f"a {name} budget of {target:g} bits/param is below what the lowest width "
                         f"({low} bits) and the metadata can reach ({total / params:.3f}); raise it"
                         + ("" if opts["mixed_prune"] else " or allow pruning (mixed_choices with 0)"))


def _prune_units(state: dict, learners: dict[str, NoisyRows], total: float, budget: float) -> float:
    """Prune units (rows and columns of every member Linear) in increasing order of ``P(keep)`` until the
    stored size fits ``budget``; returns the new total."""
    members: dict[int, tuple[UnitGates, list]] = {}
    for name, lr in learners.items():
        for g, index, axis in ((lr.rgate, lr.rindex, "rows"), (lr.cgate, lr.cindex, "cols")):
            if g is not None:
                members.setdefault(id(g), (g, []))[1].append((name, index.cpu(), axis))
    order = sorted(((float(p), gid, u) for gid, (g, _) in members.items()
                    for u, p in enumerate(g.p_keep().detach().cpu().tolist())))
    for _, gid, u in order:
        if total <= budget:
            break
        touched = {name for name, _, _ in members[gid][1]}
        before = {n: state[n] for n in touched}
        old = sum(mixed_storage_bits(st["bits"], st["col_keep"], st["shape"], st["ib"], st["group"])["total"]
                  for st in before.values())
        for name, index, axis in members[gid][1]:
            st = state[name]
            if axis == "rows":
                st["bits"][index == u] = 0
            else:
                st["col_keep"][index == u] = False
        new = sum(mixed_storage_bits(st["bits"], st["col_keep"], st["shape"], st["ib"], st["group"])["total"]
                  for st in before.values())
        total += new - old
    return total


@torch.no_grad()
def freeze_mixed(m: QuantLinear, learner: RowLSQ, choices: list[int]) -> None:
    """Store the fine-tuned weight on its exact grid with the width map (see :class:`QuantLinear`);
    ``choices``: the allowed widths (the stored index per row points into them)."""
    y = learner(m.weight.detach())
    m.weight.copy_(y)
    m.w_spec = learner.spec
    m.set_qparams(learner.qparams())
    m.w_bits = learner.bits.clone()
    m.w_col_keep = None if learner.col_keep is None else learner.col_keep.clone()
    m.w_bit_choices = list(choices)
    m.frozen = True


# ---------------------------------------------------------------------------------------- method
def _fisher_pass(model: nn.Module, teacher: nn.Module, ids: Tensor, learners: dict[str, NoisyRows], opts: dict,
                 dopts: dict, seed: int) -> None:
    """Mean squared gradient of the KD loss per row, on ``mixed_fisher_batches`` batches (noise on)."""
    from .dfqat import _kd, _Sampler

    mods = dict(model.named_modules())
    for lr in learners.values():
        lr.fisher.zero_()
    n = opts["mixed_fisher_batches"]
    if n == 0:
        return
    device = next(model.parameters()).device
    sampler = _Sampler(len(ids), dopts["dfqat_e2e_batch"], seed, "fisher")
    ws = [mods[name].weight for name in learners]
    for w in ws:
        w.requires_grad_(True)
    try:
        with torch.enable_grad():
            for step in range(n):
                batch = ids[sampler(step)].to(device)
                with torch.no_grad():
                    t = {"logits": teacher(batch, use_cache=False).logits}
                loss = _kd(model(batch, use_cache=False).logits, t, dopts)
                grads = torch.autograd.grad(loss, ws, allow_unused=True)
                for (name, lr), g in zip(learners.items(), grads):
                    if g is not None:
                        lr.fisher += g.float().pow(2).mean(1) / n
                for g in (m for m in model.modules() if isinstance(m, UnitGates)):
                    g.advance()
    finally:
        for w in ws:
            w.requires_grad_(False)
            w.grad = None


@register("mixed", needs_data=True)
def mixed_method(model: nn.Module, cfg: QuantConfig, calib: Tensor | None = None, progress: bool = True) -> None:
    """Learned per-channel mixed precision (module docstring); the summary goes to ``model.mixed_report``."""
    from . import dfqat as D

    opts = settings(cfg)
    dopts = D.settings(cfg)
    ids, data, source = D._training_data(calib, dopts)
    if cfg.weight is None or not isinstance(cfg.weight.fmt, IntFormat) or not isinstance(cfg.weight.granularity,
                                                                                         (PerChannel, PerGroup)):
        raise ValueError("--method mixed learns per-channel integer widths: use --w-format int8 (any intN) with "
                         "--w-granularity channel (one scale per row) or gN (a scale per N columns of a row)")
    group = group_of(cfg.weight)  # the scales' granularity; the widths are per row either way
    live = [m for m in model.modules() if isinstance(m, QuantLinear) and not m.frozen and m.w_spec is not None]
    if not live:
        log.warning("mixed: no live quantized Linear to train")
        return
    t_start = time.time()
    ib = index_bits(opts["choices"])
    report: dict = {"settings": {k: v for k, v in opts.items() if k.startswith("mixed_")} | {"choices": opts["choices"],
                                                                                           "group": group},
                    "data": {"source": source, "n": int(ids.shape[0]), "seqlen": int(ids.shape[1])}}
    with D.training_mode(model):
        teacher = D.float_teacher(model)
        learners = attach_noise(model, opts, group)
        embed = attach_embedding(model, opts)
        # vocabulary tables with their own budgets (rows never pruned): the token embedding, an untied head
        tables = {part: t for part, t in (("embed", embed), ("head", attach_head(model, opts, cfg))) if t}
        emb_choices = [c for c in opts["choices"] if c > 0]
        topts = dict(opts, choices=emb_choices, mixed_prune=False)
        mods = dict(model.named_modules())
        for pname, sub, pool in block_pools(model, learners, opts):  # an unreachable budget fails now, not later
            if sub:
                check_budget(model, sub, opts, pool, pname)
        for part, (tname, tl) in tables.items():
            check_budget(model, {tname: tl}, topts, (float(opts[f"mixed_{part}_target"]), mods[tname].weight.numel(),
                                                     0), "embedding" if part == "embed" else "head")
        float_w = {n: mods[n].weight.detach().clone() for n in [*learners, *(t[0] for t in tables.values())]}
        tbudgets = [TableBudget(mods[tname], opts, index_bits(emb_choices), part)
                    for part, (tname, _) in tables.items()]
        budget = Penalty(block_budgets(model, opts, ib))
        key = D._run_key(cfg, teacher, ids, dopts | opts) if dopts["dfqat_ckpt"] else ""
        ck = D._Checkpoint(dopts["dfqat_ckpt"], key)
        if ck.load():
            D._load_model_tensors(model, ck.tensors, ck.meta.get("frozen", []))
        torch.manual_seed(cfg.seed)

        def set_mults(q_lr: float) -> None:
            for lr in [*learners.values(), *(t[1] for t in tables.values())]:
                lr.mults = (opts["mixed_bits_lr"] / q_lr, opts["mixed_gate_lr"] / q_lr)

        nopts = dict(dopts, dfqat_tile_steps=opts["mixed_noise_tile_steps"],
                     dfqat_e2e_steps=opts["mixed_noise_e2e_steps"])
        tiles: list[dict] = []
        if nopts["dfqat_tile_steps"] > 0:
            set_mults(nopts["dfqat_q_lr"])
            D._tiled_stage(model, teacher, ids, nopts, cfg.seed, ck, tiles, progress, penalty=budget,
                           freeze_tiles=False)
        e2e = None
        if nopts["dfqat_e2e_steps"] > 0:
            set_mults(nopts["dfqat_e2e_q_lr"])
            pen = budget if not tbudgets else (lambda root, step, steps: budget(root, step, steps)
                                               + sum(tb(step, steps) for tb in tbudgets))
            e2e = D._e2e_stage(model, teacher, ids, data, nopts, cfg.seed, ck, progress, penalty=pen,
                               label="mixed-noise")
        report["noise"] = {"tiles": tiles, "e2e": e2e, "budget": budget.history,
                           "expected_bits": budget.blocks_bits_per_param(model)}
        torch.manual_seed(cfg.seed + 1)  # the same noise as the uninterrupted run (a resumed one reaches here too)
        _fisher_pass(model, teacher, ids, learners | dict(tables.values()), opts, dopts, cfg.seed)
        for g in (m for m in model.modules() if isinstance(m, UnitGates)):
            g.stochastic = False
        if not opts["mixed_keep_noise_weights"]:  # the noise phase only chose the widths
            with torch.no_grad():
                for n, w in float_w.items():
                    mods[n].weight.copy_(w)
        del float_w
        plan, parts = {}, {}
        for pname, sub, pool in block_pools(model, learners, opts):
            if sub:
                p = integer_bits(model, sub, opts, pool=pool, name=pname)
                parts[pname] = p.pop("_total")
                plan |= p
        total = sum(v["bits_per_param"] * v["params"] for v in parts.values())
        params = sum(v["params"] for v in parts.values())
        if "rest" not in parts and "blocks" not in parts:  # every part has its own budget: the rest at 16 bits
            wid = {id(mods[n].weight) for n in learners}
            other = sum(p.numel() for b in blocks_of(model) for p in _model_params(b) if id(p) not in wid)
            total, params = total + 16 * other, params + other
        report["integer"] = {"bits_per_param": total / params, "params": params} | (
            {"budgets": parts} if opts["part_target"] else {})
        for tb, (part, (tname, tl)) in zip(tbudgets, tables.items()):
            tplan = integer_bits(model, {tname: tl}, topts,
                                 pool=(float(opts[f"mixed_{part}_target"]), mods[tname].weight.numel(), 0))
            report[f"integer_{part}"] = tplan.pop("_total")
            report["noise"][f"{part}_budget"] = tb.history
            plan |= tplan
        for name, p in plan.items():
            m = mods[name]
            m.learner = RowLSQ(m.weight.detach(), p["bits"], p["col_keep"], p["clip"], p["group"])
        head = _tied_head(model) if embed else None
        if head is not None:
            head.learner = mods[embed[0]].learner  # the tied head uses the embedding's quantizer
        # the widths are fixed: straight-through QAT on the exact grid, the dfqat stages (tiles, end to end)
        fck = D._Checkpoint(f"{dopts['dfqat_ckpt']}/finetune" if dopts["dfqat_ckpt"] else None, key + ":ft")
        if fck.load():
            D._load_model_tensors(model, fck.tensors, fck.meta.get("frozen", []))
        ft_tiles: list[dict] = []
        if dopts["dfqat_tile_steps"] > 0:
            D._tiled_stage(model, teacher, ids, dopts, cfg.seed, fck, ft_tiles, progress, freeze_tiles=False)
        report["finetune"] = {"tiles": ft_tiles, "e2e": None}
        if dopts["dfqat_e2e_steps"] > 0:
            report["finetune"]["e2e"] = D._e2e_stage(model, teacher, ids, data, dopts, cfg.seed, fck, progress,
                                                     label="mixed-finetune")
        for name in plan:
            m = mods[name]
            learner = m.learner
            if not D._finite([m.weight, *learner.parameters()]):
                raise ValueError("mixed: non-finite weights at the end of training; nothing was frozen")
            del m.learner
            freeze_mixed(m, learner, emb_choices if name in {t[0] for t in tables.values()} else opts["choices"])
        if head is not None:  # the same tensor, the same grid and width map
            emb_m = mods[embed[0]]
            del head.learner
            head.w_spec = CONTAINER
            head.set_qparams(emb_m.qparams)
            head.w_bits, head.w_col_keep, head.w_bit_choices = emb_m.w_bits, None, emb_m.w_bit_choices
            head.frozen = True
    report["bit_map"] = bit_map_summary(model)
    report["seconds"] = time.time() - t_start
    model.mixed_report = report
    log.info("mixed: %.3f bits/param (blocks) in %.1fs", report["integer"]["bits_per_param"], report["seconds"])


def _tied_head(model: nn.Module) -> QuantLinear | None:
    from .models import get_module, tied_embeddings

    arch = arch_of(model)
    head = get_module(model, arch.head)
    return head if tied_embeddings(model) and isinstance(head, QuantLinear) else None


def bit_map_summary(model: nn.Module) -> dict:
    """Where the bits went: per layer and part (q/k/v/o, gate/up/down) the mean width of kept rows, pruned
    rows and columns, stored bits and parameters."""
    from .models import get_module

    arch = arch_of(model)
    out = {}
    emb = get_module(model, arch.embed)
    if getattr(emb, "w_bits", None) is not None:
        b = emb.w_bits.long().cpu()
        st = mixed_storage_bits(b, None, tuple(emb.weight.shape), index_bits(emb.w_bit_choices))
        out["embed"] = {"part": "embeddings", "rows": int(b.numel()), "pruned_rows": 0, "pruned_cols": 0,
                        "mean_bits_kept": float(b.float().mean()),
                        "hist": {int(k): int((b == k).sum()) for k in b.unique()},
                        "bits": st["total"], "params": int(emb.weight.numel())}
    for bi, block in enumerate(blocks_of(model)):
        for rel, m in block.named_modules():
            if isinstance(m, QuantLinear) and getattr(m, "w_bits", None) is not None:
                b = m.w_bits.long().cpu()
                ck = None if m.w_col_keep is None else m.w_col_keep.cpu()
                st = mixed_storage_bits(b, ck, tuple(m.weight.shape), index_bits(m.w_bit_choices), group_of(m.w_spec))
                out[f"{bi}.{rel}"] = {"part": _part(rel, arch), "rows": int(b.numel()),
                                      "pruned_rows": int((b == 0).sum()),
                                      "pruned_cols": 0 if ck is None else int((~ck).sum()),
                                      "mean_bits_kept": float(b[b > 0].float().mean()) if (b > 0).any() else 0.0,
                                      "hist": {int(k): int((b == k).sum()) for k in b.unique()},
                                      "bits": st["total"], "params": int(m.weight.numel())}
    return out


__all__ = ["DEFAULTS", "settings", "block_units", "UnitGates", "NoisyRows", "RowLSQ", "Budget", "block_budgets",
           "Penalty", "block_pools", "attach_noise", "check_budget",
           "integer_bits", "freeze_mixed", "mixed_storage_bits", "pack_mixed", "unpack_mixed", "mixed_method",
           "bit_map_summary", "index_bits"]
