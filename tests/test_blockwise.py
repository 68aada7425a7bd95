"""The block-by-block loop reproduces the model: capture, run every block in turn, norm + head."""
from __future__ import annotations

import pytest
import torch

from conftest import ARCH_NAMES, tiny_config, tiny_model
from lowbit.blockwise import capture_inputs, for_each_block, head_logits
from lowbit.config import QuantConfig, parse_spec
from lowbit.qmodules import QuantLinear, replace_modules


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_blockwise_forward_equals_model(arch):
    model = tiny_model(arch)
    batches = [torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    hidden, kwargs = capture_inputs(model, batches)
    assert len(hidden) == 2 and hidden[0].shape == (2, 24, 64)
    seen = []
    outs = for_each_block(model, hidden, kwargs, fn=lambda i, blk, xs, kw: seen.append(i))
    assert seen == list(range(model.config.num_hidden_layers))
    for ids, h in zip(batches, outs):
        torch.testing.assert_close(head_logits(model, h), model(ids).logits, rtol=1e-5, atol=1e-5)


def test_quantized_prefix_feeds_the_next_block():
    """Quantizing each block inside the loop gives the same logits as quantizing the whole model."""
    spec = parse_spec("int3", "g32")
    model, ref = tiny_model("LlamaForCausalLM"), tiny_model("LlamaForCausalLM")
    from lowbit.quantize import quantize_model

    quantize_model(ref, QuantConfig(weight=spec), progress=False)
    ids = [torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(3))]
    hidden, kwargs = capture_inputs(model, ids)

    def quantize_block(i, block, xs, kw):
        names = replace_modules(block, lambda m, n: QuantLinear.from_linear(m, spec),
                                lambda m, n: isinstance(m, torch.nn.Linear) and not isinstance(m, QuantLinear))
        assert len(names) == 7
        for n in names:
            block.get_submodule(n).freeze()

    out = for_each_block(model, hidden, kwargs, fn=quantize_block)
    torch.testing.assert_close(head_logits(model, out[0]), ref(ids[0]).logits, rtol=1e-5, atol=1e-5)


def test_report_gives_block_error_and_time(tiny_llama):
    """The per-block report: zero error when fn leaves the block alone, positive when it perturbs it."""
    import torch

    from lowbit.blockwise import capture_inputs, for_each_block

    ids = [torch.randint(0, 128, (1, 16)) for _ in range(3)]
    hidden, kw = capture_inputs(tiny_llama, ids)
    seen = []
    for_each_block(tiny_llama, hidden, kw, lambda i, b, xs, k: None, report=lambda i, e, s: seen.append((i, e, s)))
    assert [i for i, _, _ in seen] == [0, 1] and all(e == 0 and s >= 0 for _, e, s in seen)

    def perturb(i, block, xs, k):
        with torch.no_grad():
            block.mlp.down_proj.weight.mul_(1.5)

    seen.clear()
    for_each_block(tiny_llama, hidden, kw, perturb, report=lambda i, e, s: seen.append(e))
    assert all(e > 1e-6 for e in seen)


def block_hooks(model) -> int:
    from lowbit.models import blocks

    return sum(len(m._forward_pre_hooks) for m in blocks(model)[1].modules())


@pytest.mark.parametrize("rotated", [False, True])
def test_inputs_reaching_equals_full_forward_inputs(rotated):
    """Stopping the block at a Linear hands it exactly the input a full forward would (the Hessian
    solvers rely on this to skip the layers after each sequential group), also when an online
    rotation (QuaRot's pre-hook on down_proj and o_proj) transforms that input first."""
    from lowbit.blockwise import inputs_reaching, run_block
    from lowbit.models import arch_of, blocks

    model = tiny_model("LlamaForCausalLM")
    if rotated:
        from lowbit.quarot import fuse_norms, rotate_ffn_online, rotate_model, rotate_vo

        fuse_norms(model)
        rotate_model(model, seed=0)
        rotate_ffn_online(model, seed=0)
        rotate_vo(model, True, seed=0)
        assert block_hooks(model)
    ids = [torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    hidden, kw = capture_inputs(model, ids)
    block = blocks(model)[1]
    for group in arch_of(model).sequential:
        module = block.get_submodule(group[0])
        full, early = [], []
        handle = module.register_forward_hook(lambda m, inp, out: full.append(inp[0].detach()))
        for x in hidden:
            run_block(block, x, kw)
        handle.remove()
        inputs_reaching(block, module, hidden, kw, early.append)
        assert len(early) == len(full) == 2
        for a, b in zip(early, full):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # a perturbation before the module must show: the captured input is the live one, not a stale copy
    with torch.no_grad():
        block.self_attn.o_proj.weight.mul_(2.0)
    seen = []
    inputs_reaching(block, block.get_submodule(arch_of(model).sequential[-1][0]), hidden[:1], kw, seen.append)
    assert arch_of(model).sequential[-1][0] == "mlp.down_proj" and not torch.equal(seen[0], early[0])


@pytest.mark.parametrize("arch,rotated", [(a, False) for a in ARCH_NAMES] + [("LlamaForCausalLM", True)])
def test_attention_cache_leaves_gptq_unchanged(arch, rotated, monkeypatch):
    """GPTQ with the attention cache (later groups and the block output replay o_proj(core)) gives the same
    model bit for bit as recomputing attention in every pass, on every architecture and with QuaRot's online
    rotations; the first replay checked itself against the real attention."""
    from lowbit import blockwise
    from lowbit.quantize import quantize_model

    calib = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(4))
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(6))
    caches, out = [], {}
    real_init = blockwise.AttentionCache.__init__
    monkeypatch.setattr(blockwise.AttentionCache, "__init__", lambda self, *a: (real_init(self, *a),
                                                                               caches.append(self))[0])
    for cache in (False, True):  # --opt attn_cache=false / true (the default)
        cfg = QuantConfig(weight=parse_spec("int3", "g32"), act=parse_spec("int8", "token") if rotated else None,
                          method="quarot,gptq" if rotated else "gptq", extra={"attn_cache": cache})
        model = tiny_model(arch)
        quantize_model(model, cfg, calib=calib, progress=False)
        out[cache] = model(ids).logits
    assert len(caches) == tiny_config(arch).num_hidden_layers and all(c.ok for c in caches)
    assert torch.equal(out[True], out[False])


def test_attention_cache_turns_itself_off_when_attention_does_more():
    """An attention module whose forward changes its output after o_proj: the first replay sees the difference,
    the cache falls back to the real attention, and GPTQ's result is the uncached one. (Forward hooks on the
    attention module need no such care: they run on the replayed output as on the real one.)"""
    from lowbit import blockwise
    from lowbit.gptq import sequential_solve
    from lowbit.models import blocks

    calib = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(4))
    out, caches = {}, []
    real_init = blockwise.AttentionCache.__init__

    def init(self, *a):
        real_init(self, *a)
        caches.append(self)

    for cache in (False, True):
        model = tiny_model()
        for blk in blocks(model):
            def more(*a, real=blk.self_attn.forward, **k):  # something after o_proj, inside the forward
                o = real(*a, **k)
                return (o[0] * 1.5, *o[1:])

            blk.self_attn.forward = more
        replace_modules(model, lambda m, n: QuantLinear.from_linear(m, parse_spec("int3", "g32")),
                        lambda m, n: isinstance(m, torch.nn.Linear) and n != "lm_head")
        blockwise.AttentionCache.__init__ = init
        try:
            sequential_solve(model, calib, lambda mods, H: [m.freeze() for m in mods.values()], progress=False,
                             attn_cache=cache)
        finally:
            blockwise.AttentionCache.__init__ = real_init
        out[cache] = model(calib[:1]).logits
    assert caches and all(c.ok is False for c in caches)
    assert torch.equal(out[True], out[False])
