"""The block-by-block loop reproduces the model: capture, run every block in turn, norm + head."""
from __future__ import annotations

import pytest
import torch

from conftest import ARCH_NAMES, tiny_model
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
