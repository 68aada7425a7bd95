"""A killed block-by-block PTQ run resumes from its checkpoint folder and ends bit-identical to an
uninterrupted run; a folder of another run or a corrupt file is a one-line error."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import needs_shared, tiny_model
from lowbit import blockckpt
from lowbit.config import QuantConfig, parse_spec
from lowbit.quantize import quantize_model


class _Killed(Exception):
    pass


def _calib(n: int = 4, seqlen: int = 16) -> torch.Tensor:
    return torch.randint(0, 128, (n, seqlen), generator=torch.Generator().manual_seed(5))


def _cfg(method: str) -> QuantConfig:
    w = parse_spec("int3", "g32")
    a = parse_spec("int8", "token") if method in ("smoothquant,rtn", "quarot,gptq") else None
    extra = {"omni_epochs": 2, "omni_samples": 4} if method == "omniquant" else {}
    return QuantConfig(weight=w, act=a, method=method, seed=0, extra=extra)


def _kill_after(monkeypatch, block: int) -> None:
    save = blockckpt.BlockCheckpoint.save

    def save_then_die(self, i, *a, **k):
        save(self, i, *a, **k)
        if i == block:
            raise _Killed

    monkeypatch.setattr(blockckpt.BlockCheckpoint, "save", save_then_die)


@pytest.mark.parametrize("method", ["gptq", "spqr", "awq", "smoothquant,rtn", "omniquant", "quarot,gptq"])
def test_resumed_run_equals_uninterrupted(method, tmp_path, monkeypatch):
    ids = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(9))
    calib = _calib()
    ref = tiny_model("LlamaForCausalLM")
    quantize_model(ref, _cfg(method), calib=calib, progress=False)
    assert not hasattr(ref, "ptq_resume")
    want = ref(ids).logits

    with monkeypatch.context() as m:
        _kill_after(m, 0)
        with pytest.raises(_Killed):
            quantize_model(tiny_model("LlamaForCausalLM"), _cfg(method), calib=calib, progress=False, ckpt=tmp_path)
    model = tiny_model("LlamaForCausalLM")  # a fresh process: the float model again
    quantize_model(model, _cfg(method), calib=calib, progress=False, ckpt=tmp_path)
    solver = method.split(",")[-1] if method != "smoothquant,rtn" else "smoothquant"
    assert [(r["step"], r["blocks_restored"]) for r in model.ptq_resume] == [(solver, 1)]
    assert torch.equal(model(ids).logits, want)

    again = tiny_model("LlamaForCausalLM")  # a finished folder: every block restored, same model
    quantize_model(again, _cfg(method), calib=calib, progress=False, ckpt=tmp_path)
    assert again.ptq_resume[0]["blocks_restored"] == 2
    assert torch.equal(again(ids).logits, want)


def test_checkpoint_of_another_run_is_refused(tmp_path, monkeypatch):
    calib = _calib()
    with monkeypatch.context() as m:
        _kill_after(m, 0)
        with pytest.raises(_Killed):
            quantize_model(tiny_model(), _cfg("gptq"), calib=calib, progress=False, ckpt=tmp_path)
    other = QuantConfig(weight=parse_spec("int4", "g32"), method="gptq", seed=0)
    with pytest.raises(ValueError, match="holds another run"):
        quantize_model(tiny_model(), other, calib=calib, progress=False, ckpt=tmp_path)
    with pytest.raises(ValueError, match="holds another run"):  # other calibration ids
        quantize_model(tiny_model(), _cfg("gptq"), calib=calib + 1, progress=False, ckpt=tmp_path)
    with pytest.raises(ValueError, match="holds another run"):  # another float model
        quantize_model(tiny_model(seed=1), _cfg("gptq"), calib=calib, progress=False, ckpt=tmp_path)


def test_a_file_or_unwritable_ckpt_path_fails_before_any_work(tmp_path):
    (tmp_path / "afile").write_text("")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        quantize_model(tiny_model(), _cfg("gptq"), calib=_calib(), progress=False, ckpt=tmp_path / "afile")
    with pytest.raises(ValueError, match="cannot be created"):
        quantize_model(tiny_model(), _cfg("gptq"), calib=_calib(), progress=False, ckpt=tmp_path / "afile" / "x")
    cfg = QuantConfig(weight=parse_spec("int3", "g32"), method="dfqat", extra={"dfqat_ckpt": str(tmp_path / "afile")})
    with pytest.raises(ValueError, match="dfqat_ckpt .* is a file"):
        quantize_model(tiny_model(), cfg, calib=_calib(), progress=False)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path, monkeypatch):
    calib = _calib()
    with monkeypatch.context() as m:
        _kill_after(m, 0)
        with pytest.raises(_Killed):
            quantize_model(tiny_model(), _cfg("gptq"), calib=calib, progress=False, ckpt=tmp_path)
    step = tmp_path / "0-gptq"
    (step / "block-0.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="block-0.safetensors is missing or corrupt"):
        quantize_model(tiny_model(), _cfg("gptq"), calib=calib, progress=False, ckpt=tmp_path)
    (step / "state.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        quantize_model(tiny_model(), _cfg("gptq"), calib=calib, progress=False, ckpt=tmp_path)


def test_state_lists_blocks_with_error_and_time(tmp_path):
    model = tiny_model()
    quantize_model(model, _cfg("gptq"), calib=_calib(), progress=False, ckpt=tmp_path)
    state = json.loads((tmp_path / "0-gptq" / "state.json").read_text())
    assert [b["index"] for b in state["blocks"]] == [0, 1]
    assert all(b["rel_err"] > 0 and b["wall_s"] >= b["seconds"] >= 0 for b in state["blocks"])
    assert all("self_attn.q_proj" in b["frozen"] for b in state["blocks"])
    assert sorted(p.name for p in (tmp_path / "0-gptq").iterdir()) == [
        "block-0.safetensors", "block-1.safetensors", "carry.safetensors", "state.json"]
    again = tiny_model()  # a finished folder: the restored blocks' wall times are summed, exactly
    quantize_model(again, _cfg("gptq"), calib=_calib(), progress=False, ckpt=tmp_path)
    (res,) = again.ptq_resume
    assert res["seconds_exact"] and res["seconds_restored"] == pytest.approx(sum(b["wall_s"] for b in state["blocks"]))
    for b in state["blocks"]:  # a checkpoint written before block wall times were kept: a lower bound, said so
        del b["wall_s"]
    (tmp_path / "0-gptq" / "state.json").write_text(json.dumps(state))
    old = tiny_model()
    quantize_model(old, _cfg("gptq"), calib=_calib(), progress=False, ckpt=tmp_path)
    (res,) = old.ptq_resume
    assert not res["seconds_exact"]
    assert res["seconds_restored"] == pytest.approx(sum(b["seconds"] for b in state["blocks"]))


@needs_shared
def test_cli_ckpt_resumes_gptq_on_stories260k(tmp_path, capsys):
    """``lowbit quantize --ckpt``: the second run restores every block and scores exactly as the first."""
    from lowbit.cli import main

    recs = []
    for k in range(2):
        js = tmp_path / f"run{k}.json"
        code = main(["-q", "quantize", "stories260k", "--method", "gptq", "--w-format", "int3", "--calib", "self",
                     "--nsamples", "8", "--calib-seqlen", "64", "--eval", "tinystories", "--max-windows", "4",
                     "--ckpt", str(tmp_path / "ck"), "--json", str(js)])
        assert code == 0, capsys.readouterr().err
        recs.append(json.loads(js.read_text()))
    assert "ptq_resume" not in recs[0]
    assert recs[1]["ptq_resume"][0]["blocks_restored"] == 5
    assert recs[1]["metrics"]["tinystories"]["ppl"] == recs[0]["metrics"]["tinystories"]["ppl"]
    capsys.readouterr()
    code = main(["-q", "quantize", "stories260k", "--method", "gptq", "--w-format", "int4", "--calib", "self",
                 "--nsamples", "8", "--calib-seqlen", "64", "--ckpt", str(tmp_path / "ck")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "holds another run" in err[0], err
