"""Per-channel mixed precision (issue 5): coupled pruning units are exact, the noise has the rounding
variance, storage accounting equals the packed file, the repair meets the budget by sensitivity, the method
runs end to end, saves and reloads bit-exactly, and bad input gets one-line errors."""
from __future__ import annotations

import pytest
import torch

import lowbit.mixed as mx
from conftest import needs_shared, tiny_model
from lowbit.config import QuantConfig, parse_spec
from lowbit.qmodules import QuantLinear
from lowbit.quantize import quantize_model
from lowbit.size import size_report

SPEC = parse_spec("int8", "channel")
TINY = {"dfqat_tile": 1, "dfqat_tile_steps": 3, "dfqat_e2e_steps": 3, "dfqat_batch": 4, "mixed_noise_tile_steps": 6,
        "mixed_noise_e2e_steps": 6,
        "mixed_fisher_batches": 2, "dfqat_e2e_lr": 3e-5, "dfqat_e2e_q_lr": 1e-5, "dfqat_lr": 3e-5}


def _ids(n=4, length=24, seed=0):
    return torch.randint(3, 128, (n, length), generator=torch.Generator().manual_seed(seed))


def _run(target=3.0, model=None, **extra):
    model = tiny_model() if model is None else model
    extra = dict(TINY, **extra) | ({} if target is None else {"mixed_target_bits": target})
    cfg = QuantConfig(weight=SPEC, method="mixed", extra=extra)
    return quantize_model(model, cfg, calib=_ids(), progress=False)


def _save_load(model, folder):
    """Save in fp32 and load back (no tokenizer needed: a placeholder file, the loader's tokenizer stubbed)."""
    import lowbit.export as ex

    ex.save_quantized(model, folder, None, float_dtype=torch.float32)
    (folder / "tokenizer.model").write_bytes(b"")
    orig = ex.load_tokenizer
    ex.load_tokenizer = lambda p: None
    try:
        return ex.load_quantized(folder)[0]
    finally:
        ex.load_tokenizer = orig


def _assert_reloads_exactly(model, folder, rep, bits: str = "blocks_bits", seed: int = 5):
    """Saved and loaded back, the model gives the same logits and the same size report (``bits``)."""
    ids = _ids(2, 16, seed=seed)
    with torch.no_grad():
        ref = model(ids).logits
    loaded = _save_load(model, folder)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref)
    assert size_report(loaded)[bits] == rep[bits]


# ------------------------------------------------------------------------------------------ coupling
def _block_out(block, x, model):
    from lowbit.blockwise import run_block

    return run_block(block, x, model._kw)


def _capture(model):
    from lowbit.blockwise import capture_inputs

    hidden, kw = capture_inputs(model, [_ids(1, 16)])
    model._kw = kw
    return hidden[0]


@pytest.mark.parametrize("kind", ["ffn", "vo", "qk"])
def test_pruned_unit_makes_its_partners_irrelevant(kind):
    """Zero the unit's members on one side (down columns; o columns; q rows): the block's output no longer
    depends on the other side (gate/up rows; v rows; k rows, RoPE pairs included)."""
    torch.manual_seed(0)
    model = tiny_model()
    block = model.model.layers[0]
    x = _capture(model)
    unit = {u.kind: u for u in mx.block_units(block, model.config)}[kind]
    sel = torch.tensor([0, 3, unit.n - 1])
    zero_side, free_side = {"ffn": ("cols", "rows"), "vo": ("cols", "rows"), "qk": ("rows", "rows")}[kind]
    mods = dict(block.named_modules())
    zero_names = {"ffn": ["mlp.down_proj"], "vo": ["self_attn.o_proj"], "qk": ["self_attn.q_proj"]}[kind]
    free_names = {"ffn": ["mlp.gate_proj", "mlp.up_proj"], "vo": ["self_attn.v_proj"], "qk": ["self_attn.k_proj"]}[kind]
    with torch.no_grad():
        for n in zero_names:
            idx = getattr(unit, zero_side)[n][sel].reshape(-1)
            w = mods[n].weight
            if zero_side == "cols":
                w[:, idx] = 0
            else:
                w[idx] = 0
        ref = _block_out(block, x, model)
        for n in free_names:
            idx = getattr(unit, free_side)[n][sel].reshape(-1)
            mods[n].weight[idx] = torch.randn_like(mods[n].weight[idx]) * 5
        out = _block_out(block, x, model)
    assert torch.allclose(out, ref, atol=1e-5)
    # and the oracle can fail: perturbing rows *outside* the unit changes the output
    with torch.no_grad():
        other = [i for i in range(getattr(unit, free_side)[free_names[0]].shape[0]) if i not in sel.tolist()][:2]
        idx = getattr(unit, free_side)[free_names[0]][torch.tensor(other)].reshape(-1)
        mods[free_names[0]].weight[idx] += 1.0
        assert not torch.allclose(_block_out(block, x, model), ref, atol=1e-4)


def test_units_cover_rows_once():
    model = tiny_model()
    block = model.model.layers[0]
    units = mx.block_units(block, model.config)
    for u in units:
        for name, idx in {**u.rows, **u.cols}.items():
            assert idx.shape[0] == u.n
            assert idx.reshape(-1).unique().numel() == idx.numel()  # no row in two units
    vo = {u.kind: u for u in units}["vo"]
    assert vo.cols["self_attn.o_proj"].numel() == model.config.hidden_size  # every o column in one unit


# ----------------------------------------------------------------------------------------- learners
def test_noise_has_rounding_variance_and_gradients():
    torch.manual_seed(0)
    w = torch.randn(8, 4096)
    lr = mx.NoisyRows(w, 2.0, 8.0, 4.0)
    out = lr(w)
    r = w.amax(1) - w.amin(1)
    delta = r / (2 ** lr.bits().detach() - 1)
    var = (out.detach() - w).var(1)
    assert torch.allclose(var, delta ** 2 / 12, rtol=0.1)  # uniform noise: the variance of real rounding
    (out - w).pow(2).sum().backward()
    assert lr.logit.grad is not None and (lr.logit.grad < 0).all()  # more bits, less noise


def _rtn_err(w, lo, hi, b):
    step = (hi - lo) / (2 ** b - 1)
    q = torch.round((w.clamp(lo, hi) - lo) / step) * step + lo
    return (q - w).pow(2).sum(1)


def test_best_clip_never_worse_than_full_range():
    torch.manual_seed(0)
    w = torch.randn(16, 256)
    w[::4, 0] = 12.0  # outlier rows: clipping must pay off there
    f = mx._best_clip(w, 3.0)
    mn, mx_ = w.amin(1).clamp(max=0), w.amax(1).clamp(min=0)
    full, clipped = _rtn_err(w, mn[:, None], mx_[:, None], 3), _rtn_err(w, (f * mn)[:, None], (f * mx_)[:, None], 3)
    assert (clipped <= full + 1e-6).all() and (f <= 1).all()
    assert (clipped[::4] < 0.7 * full[::4]).all()  # the outlier rows gain a lot


def test_clipped_noise_stays_in_range_and_learns_the_clip():
    torch.manual_seed(0)
    w = torch.randn(8, 512)
    w[:, 0] = 10.0
    lr = mx.NoisyRows(w, 2.0, 8.0, 3.0, clip_bits=3.0)
    lo, hi = (t.detach() for t in lr.clip_range(w))  # (rows, 1): one range per row
    assert lo.shape == hi.shape == (8, 1)
    assert (hi < 10.0).all()  # the outlier is clipped from the start
    out = lr(w)
    delta = (hi - lo) / (2 ** lr.bits().detach() - 1)[:, None]
    assert (out.detach() <= hi + delta / 2 + 1e-5).all()
    assert (out.detach() >= lo - delta / 2 - 1e-5).all()
    (out - w).pow(2).sum().backward()
    assert lr.clip.grad is not None and lr.clip.grad.abs().sum() > 0
    assert any(lr.clip is p for group, _ in lr.lr_groups() for p in group)  # trained with the bits logits
    # the fine-tune quantizer starts from the learned clipped range: a finer grid than min-max
    bits = torch.full((8,), 3)
    assert (mx.RowLSQ(w, bits, None, torch.sigmoid(lr.clip.detach())).scale < mx.RowLSQ(w, bits, None).scale).all()


def test_hard_concrete_gate_probabilities():
    g = mx.UnitGates(4000, 0.0)
    z = g.z().detach()
    p = float(g.p_keep()[0].detach())
    assert abs(float((z > 0).float().mean()) - p) < 0.03
    assert float((z == 0).float().mean()) > 0.05 and float((z == 1).float().mean()) > 0.05  # exact zeros and ones


def test_row_lsq_is_exact_and_prunes():
    torch.manual_seed(0)
    w = torch.randn(6, 10)
    bits = torch.tensor([2, 3, 4, 8, 0, 5])
    keep = torch.ones(10, dtype=torch.bool)
    keep[[1, 7]] = False
    q = mx.RowLSQ(w, bits, keep)
    y = q(w).detach()
    assert (y[4] == 0).all() and (y[:, [1, 7]] == 0).all()
    qp = q.qparams()
    for r, b in enumerate(bits.tolist()):
        if b:
            codes = torch.round(y[r, keep] / qp.scale[r, 0, 0] + qp.zero[r, 0, 0])
            assert codes.min() >= 0 and codes.max() <= 2 ** b - 1
            assert len(codes.unique()) <= 2 ** b


# ------------------------------------------------------------------------------------------ storage
def test_pack_roundtrip_and_size():
    torch.manual_seed(0)
    R, C = 12, 40
    w = torch.randn(R, C)
    bits = torch.tensor([0, 2, 3, 4, 5, 6, 8, 2, 3, 0, 4, 8])
    keep = torch.rand(C) > 0.2
    q = mx.RowLSQ(w, bits, keep)
    y, qp = q(w).detach(), q.qparams()
    choices = [0, 2, 3, 4, 5, 6, 8]
    packed = mx.pack_mixed(y, qp, bits, keep, choices)
    w2, qp2, bits2, keep2 = mx.unpack_mixed(packed, (R, C), choices, True)
    assert torch.equal(w2, y) and torch.equal(bits2.long(), bits) and torch.equal(keep2, keep)
    nbytes = sum(t.numel() * t.element_size() for t in packed.values())
    exact = mx.mixed_storage_bits(bits, keep, (R, C), mx.index_bits(choices))["total"]
    assert exact / 8 <= nbytes <= exact / 8 + len(packed)  # up to one byte of padding per packed tensor


def test_repair_meets_budget_and_spends_bits_by_sensitivity():
    """The integer repair lands at (or just under) the budget; rows whose Fisher is 0 lose their bits first."""
    model = tiny_model()
    from lowbit.qmodules import replace_modules
    from lowbit.quantize import block_linear_filter

    replace_modules(model, lambda m, n: QuantLinear.from_linear(m, SPEC), block_linear_filter(model))
    opts = mx.settings(QuantConfig(weight=SPEC, extra={"mixed_target_bits": 4.0, "mixed_prune": False}))
    learners = mx.attach_noise(model, opts)
    for i, lr in enumerate(learners.values()):
        lr.fisher.fill_(1.0)
        if i % 2 == 0:
            lr.fisher[: lr.fisher.numel() // 2] = 0.0  # half the rows do not matter
    plan = mx.integer_bits(model, learners, opts)
    total = plan.pop("_total")
    assert 3.9 <= total["bits_per_param"] <= 4.0
    for i, (name, p) in enumerate(plan.items()):
        if i % 2 == 0:
            half = p["bits"].numel() // 2
            assert p["bits"][:half].float().mean() < p["bits"][half:].float().mean()
            assert int(p["bits"][:half].max()) == 2  # the lowest width


# ------------------------------------------------------------------------------------------- method
def test_method_meets_budget_exactly_and_reloads(tmp_path):
    model = _run(3.0)
    rep = size_report(model)
    assert rep["blocks_bits_per_param"] <= 3.0 + 1e-9
    assert rep["blocks_bits_per_param"] > 2.9
    assert abs(rep["blocks_bits_per_param"] - model.mixed_report["integer"]["bits_per_param"]) < 1e-9
    lins = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert all(m.frozen and m.w_bits is not None and not hasattr(m, "learner") for m in lins)
    assert len({int(b) for m in lins for b in m.w_bits.unique()}) > 1  # really mixed
    _assert_reloads_exactly(model, tmp_path, rep)
    # the file holds the reported bits (+ padding, header and the fp32 float tensors of this test)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        qbytes = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys()
                     if any(s in k for s in (".bitmap", ".col_keep", "_b")))
    lin_bits = sum(mx.mixed_storage_bits(m.w_bits, m.w_col_keep, tuple(m.weight.shape),
                                         mx.index_bits(m.w_bit_choices))["total"] for m in lins)
    assert lin_bits / 8 <= qbytes <= lin_bits / 8 + 64 * len(lins)


def test_checkpoint_rerun_gives_the_same_model(tmp_path):
    """A second run on a finished checkpoint folder loads both phases and reproduces the model exactly."""
    a = _run(3.0, dfqat_ckpt=str(tmp_path / "ck"))
    assert (tmp_path / "ck" / "state.json").is_file() and (tmp_path / "ck" / "finetune" / "state.json").is_file()
    b = _run(3.0, dfqat_ckpt=str(tmp_path / "ck"))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    c = _run(3.0)  # and the same command without checkpoints gives the same model too
    assert all(torch.equal(sa[k], c.state_dict()[k]) for k in sa)


def test_no_noise_phase_allocates_by_fisher_alone():
    """Both noise stages at 0: every row starts at the same width and the Fisher-greedy repair alone sets the
    widths: the budget is still met exactly, the widths differ across rows, no row is pruned, and no noise
    step ran."""
    model = _run(3.0, mixed_noise_tile_steps=0, mixed_noise_e2e_steps=0)
    rep = model.mixed_report
    assert rep["noise"]["tiles"] == [] and rep["noise"]["e2e"] is None and rep["noise"]["budget"] == []
    assert 2.9 < size_report(model)["blocks_bits_per_param"] <= 3.0 + 1e-9
    lins = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len({int(b) for m in lins for b in m.w_bits.unique()}) > 1
    assert all(int(m.w_bits.min()) >= 2 and (m.w_col_keep is None or bool(m.w_col_keep.all())) for m in lins)


def test_pruning_happens_under_a_tight_budget():
    model = _run(2.2, mixed_gate_lr=0.5, mixed_eta=1.0)
    lins = [m for m in model.modules() if isinstance(m, QuantLinear)]
    rep = size_report(model)
    assert rep["blocks_bits_per_param"] <= 2.2 + 1e-9
    pruned = sum(int((m.w_bits == 0).sum()) for m in lins)
    assert pruned > 0
    # coupling survives into the frozen model: pruned gate rows = pruned up rows = pruned down columns
    for layer in model.model.layers:
        g, u, d = layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj
        assert torch.equal(g.w_bits == 0, u.w_bits == 0)
        assert torch.equal(~d.w_col_keep, g.w_bits == 0)
        assert (d.weight[:, ~d.w_col_keep] == 0).all()


def test_no_pruning_option_keeps_every_row():
    model = _run(3.0, mixed_prune=False)
    lins = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert all(int(m.w_bits.min()) >= 2 and m.w_col_keep is None for m in lins)


def test_part_ranges_are_respected():
    model = _run(4.0, mixed_attn_range="5-8", mixed_prune=False)
    for layer in model.model.layers:
        for m in (layer.self_attn.q_proj, layer.self_attn.o_proj):
            assert int(m.w_bits.min()) >= 5


def _part_bits(model, part):
    """Stored bits/param of one part's Linears (metadata included), from the frozen width maps."""
    names = {"attention": ("q_proj", "k_proj", "v_proj", "o_proj"), "ffn": ("gate_proj", "up_proj", "down_proj")}[part]
    lins = [m for n, m in model.model.layers.named_modules() if isinstance(m, QuantLinear) and n.endswith(names)]
    bits = sum(mx.mixed_storage_bits(m.w_bits, m.w_col_keep, tuple(m.weight.shape), mx.index_bits(m.w_bit_choices))
               ["total"] for m in lins)
    return bits / sum(m.weight.numel() for m in lins)


def test_part_budgets_hold_each_part_exactly():
    """Own budgets for attention and FFN: each part lands at (just under) its own target, whatever the other
    part does, and the blocks' total that the report gives is the stored one."""
    model = _run(None, mixed_attn_target=5.0, mixed_ffn_target=2.5, mixed_prune=False)
    att, ffn = _part_bits(model, "attention"), _part_bits(model, "ffn")
    assert 4.8 < att <= 5.0 + 1e-9 and 2.3 < ffn <= 2.5 + 1e-9
    rep = size_report(model)
    assert abs(rep["blocks_bits_per_param"] - model.mixed_report["integer"]["bits_per_param"]) < 1e-9
    assert set(model.mixed_report["integer"]["budgets"]) == {"attention", "ffn"}
    assert {h["budget"] for h in model.mixed_report["noise"]["budget"]} == {"attention", "ffn"}


def test_one_part_budget_with_the_shared_one():
    """An attention budget beside the blocks' target: attention holds its own, the blocks hold the total (the
    FFN gets what is left)."""
    model = _run(3.0, mixed_attn_target=2.5, mixed_prune=False)
    assert _part_bits(model, "attention") <= 2.5 + 1e-9
    assert size_report(model)["blocks_bits_per_param"] <= 3.0 + 1e-9
    assert size_report(model)["blocks_bits_per_param"] > 2.9
    assert _part_bits(model, "ffn") > 3.0  # what attention saved went to the FFN


@pytest.mark.parametrize("extra,msg", [
    ({}, "needs a size budget"),
    ({"mixed_attn_target": 3.0}, "needs a size budget"),
    ({"mixed_target_bits": 3.0, "mixed_ffn_target": 0.1}, "mixed_ffn_target"),
    ({"mixed_target_bits": 0.1}, "target-bits"),
    ({"mixed_target_bits": 3.0, "mixed_range": "9-2"}, "mixed_range"),
    ({"mixed_target_bits": 3.0, "mixed_choices": "a,b"}, "mixed_choices"),
    ({"mixed_target_bits": 3.0, "mixed_bogus": 1}, "unknown mixed setting"),
    ({"mixed_target_bits": 3.0, "mixed_noise_clip": "yes"}, "mixed_noise_clip must be true or false"),
])
def test_bad_settings(extra, msg):
    with pytest.raises(ValueError, match=msg):
        mx.settings(QuantConfig(weight=SPEC, method="mixed", extra=extra))


@pytest.mark.parametrize("target,extra", [(1.5, {"mixed_prune": False}), (3.0, {"mixed_embed_target": 1.0})])
def test_unreachable_budget_is_a_clear_error_before_training(target, extra, monkeypatch):
    """Too small for the lowest width without pruning, or an embedding budget (rows never pruned) below the
    2-bit minimum: refused before the first training step."""
    import lowbit.dfqat as D

    def trained(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(D, "_tiled_stage", trained)
    monkeypatch.setattr(D, "_e2e_stage", trained)
    with pytest.raises(ValueError, match="below what the lowest width"):
        _run(target, **extra)
    if target == 3.0:
        return
    monkeypatch.undo()  # the same budget is refused by the repair after training too (the check agrees with it)
    monkeypatch.setattr(mx, "check_budget", lambda *a, **k: None)
    with pytest.raises(ValueError, match="below what the lowest width"):
        _run(target, **extra)


def test_per_tensor_granularity_is_refused():
    with pytest.raises(ValueError, match="--w-granularity channel .* or gN"):
        quantize_model(tiny_model(), QuantConfig(weight=parse_spec("int4", "tensor"), method="mixed",
                                                 extra=dict(TINY, mixed_target_bits=3.0)), calib=_ids(),
                       progress=False)


# ------------------------------------------------------------------------------ scales per group of a row
def test_group_noise_ranges_are_each_groups_own():
    """With ``group``, every (row, group) has its own range (the last group short: 40 = 16 + 16 + 8), the noise
    stays inside it, and the expected size pays a scale and a zero-point per group."""
    torch.manual_seed(0)
    w = torch.randn(4, 40)
    w[:, 20] = 9.0  # an outlier in the second group only
    lr = mx.NoisyRows(w, 2.0, 8.0, 3.0, group=16)
    lo, hi = lr.clip_range(w)
    assert lo.shape == hi.shape == (4, 3)
    for g, cols in enumerate((slice(0, 16), slice(16, 32), slice(32, 40))):
        assert torch.equal(hi[:, g], w[:, cols].amax(1).clamp(min=0))
        assert torch.equal(lo[:, g], w[:, cols].amin(1).clamp(max=0))
    delta = (hi - lo) / (2 ** lr.bits().detach() - 1)[:, None]
    out = lr(w).detach()
    for g, cols in enumerate((slice(0, 16), slice(16, 32), slice(32, 40))):
        assert (out[:, cols] <= (hi[:, g] + delta[:, g] / 2)[:, None] + 1e-5).all()
        assert (out[:, cols] >= (lo[:, g] - delta[:, g] / 2)[:, None] - 1e-5).all()
    assert (delta[:, 0] < delta[:, 1] / 2).all()  # the outlier widens its own group's grid only
    per_row = mx.NoisyRows(w, 2.0, 8.0, 3.0)
    extra = float((lr.expected_bits((4, 40), 3) - per_row.expected_bits((4, 40), 3)).detach())
    assert abs(extra - 4 * 2 * (16 + 3.0)) < 1e-3  # two more groups per row: fp16 scale + 3-bit zero each


def test_group_row_lsq_pack_roundtrip_and_size():
    """Per-group scales: codes of every group fit the row's width, pack/unpack is bit-exact with pruned rows and
    columns, and the packed bytes equal the storage formula."""
    torch.manual_seed(0)
    R, C, group = 12, 40, 16
    w = torch.randn(R, C)
    bits = torch.tensor([0, 2, 3, 4, 5, 6, 8, 2, 3, 0, 4, 8])
    keep = torch.rand(C) > 0.2
    q = mx.RowLSQ(w, bits, keep, group=group)
    y, qp = q(w).detach(), q.qparams()
    assert qp.scale.shape == (R, 3, 1)
    gid = torch.arange(C) // group
    for r, b in enumerate(bits.tolist()):
        if b:
            codes = torch.round(y[r] / qp.scale[r, gid, 0] + qp.zero[r, gid, 0])[keep]
            assert codes.min() >= 0 and codes.max() <= 2 ** b - 1
    choices = [0, 2, 3, 4, 5, 6, 8]
    packed = mx.pack_mixed(y, qp, bits, keep, choices, group)
    w2, qp2, bits2, keep2 = mx.unpack_mixed(packed, (R, C), choices, True, group)
    assert torch.equal(w2, y) and torch.equal(bits2.long(), bits) and torch.equal(keep2, keep)
    kept = bits > 0
    assert torch.equal(qp2.scale[kept], qp.scale[kept]) and torch.equal(qp2.zero[kept], qp.zero[kept])
    nbytes = sum(t.numel() * t.element_size() for t in packed.values())
    exact = mx.mixed_storage_bits(bits, keep, (R, C), mx.index_bits(choices), group)["total"]
    assert exact / 8 <= nbytes <= exact / 8 + len(packed)
    assert exact - mx.mixed_storage_bits(bits, keep, (R, C), mx.index_bits(choices))["total"] == \
        2 * (int(kept.sum()) * 16 + int(bits.sum()))  # two more groups per kept row


def test_group_method_meets_budget_and_reloads_exactly(tmp_path):
    """End to end with a scale per 32 columns (FFN rows of 72: a short last group): the exact budget, an exact
    reload whose size report matches, and the config carries the group size."""
    spec = mx.container(32)
    model = quantize_model(tiny_model(), QuantConfig(weight=spec, method="mixed",
                                                     extra=dict(TINY, mixed_target_bits=3.5)),
                           calib=_ids(), progress=False)
    rep = size_report(model)
    assert 3.4 < rep["blocks_bits_per_param"] <= 3.5 + 1e-9
    lins = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert all(m.frozen and m.w_spec == spec and m.qparams.scale.shape[1] > 1 for m in lins)
    assert model.mixed_report["settings"]["group"] == 32
    _assert_reloads_exactly(model, tmp_path, rep)


def test_cli_mixed_granularity_must_be_channel_or_groups(capsys):
    from lowbit.cli import main

    assert main(["quantize", "stories260k", "--method", "mixed", "--target-bits", "3", "--w-granularity",
                 "tensor"]) == 2
    assert "--w-granularity channel or gN" in capsys.readouterr().err


@needs_shared
def test_cli_mixed_stories260k(tmp_path):
    import json

    from lowbit.cli import main

    out, js, info = tmp_path / "m", tmp_path / "q.json", tmp_path / "i.json"
    rc = main(["-q", "quantize", "stories260k", "--method", "mixed", "--target-bits", "3.0", "--nsamples", "4",
               "--calib-seqlen", "32", "--opt", "dfqat_tile_steps=3", "--opt", "dfqat_e2e_steps=3",
               "--opt", "mixed_noise_tile_steps=3", "--opt", "mixed_noise_e2e_steps=2",
               "--opt", "mixed_fisher_batches=1", "--out", str(out), "--json", str(js)])
    assert rc == 0
    rec = json.loads(js.read_text())
    assert rec["bits"]["blocks_bits_per_param"] <= 3.0
    assert rec["calibration"]["source"] == "self"
    assert "bit_map" in rec["mixed_report"]
    assert main(["-q", "info", str(out), "--json", str(info)]) == 0
    assert json.loads(info.read_text())["blocks_bits"] == rec["bits"]["blocks_bits"]  # the reloaded map


def test_an_untied_head_gets_learned_widths_within_its_own_budget(tmp_path):
    """``mixed_head_target``: the vocabulary rows of an untied head get widths (never 0) under the head's own
    budget, beside the blocks' and the embedding's; save/load is exact. A tied head is refused in one line."""
    model = _run(3.0, mixed_head_target=4.0, mixed_embed_target=5.0, mixed_prune=False)
    head, emb = model.lm_head, model.model.embed_tokens
    assert isinstance(head, QuantLinear) and head.frozen and head.weight is not emb.weight
    assert int(head.w_bits.min()) >= 2 and not torch.equal(head.w_bits.float().mean(), emb.w_bits.float().mean())
    rep = size_report(model)
    assert 3.9 < rep["parts"]["head"]["bits_per_param"] <= 4.0
    assert 4.9 < rep["parts"]["embeddings"]["bits_per_param"] <= 5.0
    assert rep["blocks_bits_per_param"] <= 3.0
    assert model.mixed_report["integer_head"]["bits_per_param"] == pytest.approx(rep["parts"]["head"]["bits_per_param"])
    assert model.mixed_report["noise"]["head_budget"]  # its own multiplier's trace
    _assert_reloads_exactly(model, tmp_path, rep, bits="model_bits", seed=4)

    tied = tiny_model()
    tied.lm_head.weight = tied.model.embed_tokens.weight
    tied.config.tie_word_embeddings = True
    with pytest.raises(ValueError, match="ties its head to the token embeddings.*mixed_embed_target"):
        _run(3.0, model=tied, mixed_head_target=4.0)
    with pytest.raises(ValueError, match="mixed_head_target must be bits per parameter"):
        _run(3.0, mixed_head_target=0.5)


@needs_shared
def test_cli_target_bits_needs_mixed(capsys):
    from lowbit.cli import main

    assert main(["quantize", "stories260k", "--target-bits", "3"]) == 2
    assert "--method mixed" in capsys.readouterr().err
    assert main(["quantize", "stories260k", "--method", "mixed", "--nsamples", "2", "--calib-seqlen", "16"]) == 2
    assert "--target-bits" in capsys.readouterr().err


@pytest.mark.parametrize("tied", [False, True])
def test_embedding_rows_get_learned_widths_within_their_own_budget(tmp_path, tied):
    """``mixed_embed_target``: the vocabulary rows get widths under the table's own budget; a tied head shares
    the tensor, the grid and the map; save/load is exact."""
    from lowbit.models import tied_embeddings

    model = tiny_model()
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
        model.config.tie_word_embeddings = True
    assert tied_embeddings(model) == tied
    model = _run(3.0, model=model, mixed_embed_target=4.0, mixed_prune=False)
    emb = model.model.embed_tokens
    assert emb.frozen and emb.w_bits is not None and int(emb.w_bits.min()) >= 2
    rep = size_report(model)
    assert 3.9 < rep["parts"]["embeddings"]["bits_per_param"] <= 4.0
    assert rep["blocks_bits_per_param"] <= 3.0
    assert model.mixed_report["integer_embed"]["bits_per_param"] == pytest.approx(
        rep["parts"]["embeddings"]["bits_per_param"])
    if tied:
        assert model.lm_head.weight is emb.weight and torch.equal(model.lm_head.w_bits, emb.w_bits)
    else:
        assert not isinstance(model.lm_head, QuantLinear)  # an untied head stays in float
    _assert_reloads_exactly(model, tmp_path, rep, bits="model_bits", seed=3)
