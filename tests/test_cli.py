"""The command line: every subcommand end to end on stories260K, and one-line errors for bad input."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lowbit.cli import main

from conftest import STORIES, needs_shared


def run(argv, capsys):
    capsys.readouterr()  # drop whatever the test's own set-up printed
    code = main(["-q", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(code, err, *words):
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("lowbit: error:"), err
    for w in words:
        assert w in lines[0], lines[0]


def test_entry_point_help():
    r = subprocess.run([sys.executable, "-m", "lowbit", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    for cmd in ("quantize", "eval", "generate", "train", "info"):
        assert cmd in r.stdout


@needs_shared
def test_quantize_save_info_eval_generate(tmp_path, capsys):
    out = tmp_path / "s260k-w4"
    js = tmp_path / "q.json"
    code, stdout, err = run(["quantize", "stories260k", "--w-format", "int4", "--w-granularity", "g32",
                             "--eval", "tinystories", "--max-windows", "3", "--eval-fp", "--out", str(out),
                             "--json", str(js)], capsys)
    assert code == 0, err
    rec = json.loads(js.read_text())
    fp, q = rec["fp_metrics"]["tinystories"], rec["metrics"]["tinystories"]
    assert fp["windows"] == q["windows"] == 3 and fp["seqlen"] == 512
    assert 1.0 < fp["ppl"] < q["ppl"] < 3 * fp["ppl"]  # 4-bit costs something, not everything
    assert rec["config"]["weight"]["format"] == "int4" and rec["commit"] and rec["seed"] == 0
    # whole blocks: 4-bit codes + fp16 scale + 4-bit zero per 32 (ragged 172 rows), fp16 norms
    assert 4.6 < rec["bits"]["blocks_bits_per_param"] < 4.8
    assert (out / "quant_config.json").is_file() and (out / "tokenizer.model").is_file()

    code, stdout, err = run(["info", str(out)], capsys)
    assert code == 0 and "rtn W[int4 g32 asym]" in stdout and "attention" in stdout

    js2 = tmp_path / "e.json"
    code, stdout, err = run(["eval", str(out), "--tasks", "tinystories", "--max-windows", "3", "--json", str(js2)],
                            capsys)
    assert code == 0, err
    again = json.loads(js2.read_text())["metrics"]["tinystories"]["ppl"]
    assert abs(again - q["ppl"]) / q["ppl"] < 1e-3  # saved in fp16, reloaded: same model

    code, stdout, err = run(["generate", "stories260k", "--prompt", "Once upon a time", "--temperature", "0",
                             "--max-new-tokens", "12"], capsys)
    assert code == 0 and stdout.startswith("Once upon a time") and "Lily" in stdout


@needs_shared
def test_weight_activation_and_formats(capsys):
    for args in (["--w-format", "int8", "--w-sym", "--a-format", "int8"], ["--w-format", "mxfp4"],
                 ["--w-format", "nf4", "--w-granularity", "g64"], ["--w-format", "int4", "--w-granularity", "gguf"]):
        code, stdout, err = run(["quantize", "stories260k", *args, "--eval", "tinystories", "--max-windows", "1"],
                                capsys)
        assert code == 0, (args, err)


@needs_shared
def test_train_cli(tmp_path, capsys):
    text = (STORIES.parent.parent / "data" / "tinystories" / "tinystories_train_head_2MiB.txt").read_text()
    data = tmp_path / "stories.txt"
    data.write_text("\n<|endoftext|>\n".join(text.split("<|endoftext|>")[:30]))
    argv = ["train", "--data", str(data), "--tokenizer", str(STORIES / "tok512.model"), "--out", str(tmp_path / "run"),
            "--dim", "16", "--n-layers", "1", "--n-heads", "2", "--n-kv-heads", "1", "--hidden-dim", "32",
            "--seq-len", "32", "--batch-size", "2", "--steps", "4", "--eval-every", "2", "--save-every", "2",
            "--eval-windows", "1", "--stop-after", "2"]
    code, stdout, err = run(argv, capsys)
    assert code == 0, err
    code, stdout, err = run(argv, capsys)  # the run exists: refuse, suggest --resume
    assert_one_line_error(code, err, "--resume")
    code, stdout, err = run([*argv[:-2], "--resume"], capsys)
    assert code == 0, err and json.loads(stdout)["steps"] == 4


@pytest.mark.parametrize("argv, words", [
    (["quantize", "/no/such/model", "--w-format", "int4"], ["not found", "/no/such/model"]),
    (["quantize", "stories260k", "--w-format", "int9"], ["bit-width", "1..8"]),
    (["quantize", "stories260k", "--w-format", "int5x"], ["unknown format", "int1..int8"]),
    (["quantize", "stories260k", "--w-format", "int4", "--w-granularity", "g4096"], ["4096", "row length"]),
    (["quantize", "stories260k", "--w-format", "int4", "--w-granularity", "blocks"], ["unknown granularity"]),
    (["quantize", "stories260k", "--w-format", "int4", "--method", "gptqq"], ["unknown method", "rtn"]),
    (["quantize", "stories260k", "--w-format", "mxfp4", "--scale", "fp16"], ["e8m0"]),
    (["eval", "stories260k", "--tasks", "nosuchset"], ["unknown dataset", "wikitext2"]),
])
@needs_shared
def test_bad_input_is_one_line(argv, words, capsys):
    code, _, err = run(argv, capsys)
    assert_one_line_error(code, err, *words)


def test_unsupported_architecture_is_one_line(tmp_path, capsys):
    import transformers as tf

    tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(
        tmp_path / "gpt2")
    code, _, err = run(["info", str(tmp_path / "gpt2")], capsys)
    assert_one_line_error(code, err, "unsupported architecture GPT2LMHeadModel", "LlamaForCausalLM")


def test_corrupt_safetensors_is_one_line(tiny_llama_dir, capsys):
    (tiny_llama_dir / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    code, _, err = run(["info", str(tiny_llama_dir)], capsys)
    assert_one_line_error(code, err, "corrupt")
