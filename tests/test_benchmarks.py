"""The benchmark scripts that every BENCHMARKS.md figure comes from: a grid row's own calibration size, the
checkpoint and window-cap options of the grid runner, and report sections rendering from the committed
records."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import needs_shared

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import ptq_grid  # noqa: E402
import report  # noqa: E402


def test_a_row_may_name_its_own_calibration_size():
    run = ptq_grid.Calibration("self", 128, 256, 0)
    assert run.for_source(None) is run and run.for_source("self") is run
    c4 = run.for_source("c4:128x2048")
    assert (c4.source, c4.n, c4.seqlen) == ("c4", 128, 2048)
    assert run.for_source("c4:128x2048") is c4  # made once per run
    same = run.for_source("c4")
    assert (same.source, same.n, same.seqlen) == ("c4", 128, 256)


def test_resumed_is_found_at_any_depth():
    assert not ptq_grid._resumed({"dfqat_report": {"tiles": [{"resumed": False}], "e2e": None}})
    assert ptq_grid._resumed({"mixed_report": {"finetune": {"tiles": [{"resumed": True}]}}})


def test_smollm2_rows_name_their_learning_rates_and_gptq_its_protocol():
    rows = {s.label: s for s in ptq_grid.GRIDS["dfqat-smollm2"]}
    for label in ("dfqat-w3-g128", "dfqat-tiled-w2-g64", "dfqat-e2e-w4-g128"):
        assert ptq_grid.SMOL_DFQAT.items() <= rows[label].extra.items()
    assert rows["gptq-c4-w3-g128"].calib == "c4:128x2048"


@needs_shared
def test_grid_run_caps_windows_and_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    """A dfqat row with --ckpt: the second run (its JSON deleted) loads the finished checkpoint, gives the same
    perplexity and says it resumed; --windows-for caps the set even though the row is full-split."""
    out, ck = tmp_path / "out", tmp_path / "ck"
    argv = ["ptq_grid.py", "--model", "stories260k", "--grid", "dfqat-stories260k", "--only", "dfqat-tiled-w3-g32",
            "--datasets", "tinystories", "--windows-for", "tinystories=2", "--calib", "self", "--nsamples", "8",
            "--calib-seqlen", "32", "--device", "cpu", "--ckpt", str(ck), "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    ptq_grid.main()
    path = out / "dfqat-tiled-w3-g32.json"
    a = json.loads(path.read_text())
    assert a["metrics"]["tinystories"]["windows"] == 2 and not a["resumed_from_checkpoint"]
    assert a["config"]["extra"]["dfqat_ckpt"] == str(ck / "dfqat-tiled-w3-g32")
    assert a["calibration"]["source"] == "self" and a["calibration"]["seconds_to_make"] >= 0
    path.unlink()
    ptq_grid.main()
    b = json.loads(path.read_text())
    assert b["resumed_from_checkpoint"]
    assert b["metrics"]["tinystories"]["ppl"] == a["metrics"]["tinystories"]["ppl"]


@pytest.mark.parametrize("section", ["dfqat_smollm2_section", "ptq_section", "kv_section", "peers_section"])
def test_report_sections_render_from_the_committed_records(section):
    text = getattr(report, section)()
    assert isinstance(text, str) and text.strip()
