"""`optbench compare` end to end on tiny real training, and its figures recomputed from the records."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from optbench.cli import app

ARGS = ["compare", "--preset", "smoke", "--dataset", "synthetic", "--depth", "1", "--epochs", "2",
        "--batch-size", "100", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def compared(tmp_path_factory) -> tuple[Path, str]:
    results = tmp_path_factory.mktemp("compare")
    result = CliRunner().invoke(app, [*ARGS, "--results-dir", str(results)])
    assert result.exit_code == 0, result.output
    return results, result.output


def test_compare_prints_table_and_both_verdicts(compared):
    results, output = compared
    for name in ("AdamW", "Lion", "Sophia", "Schedule-Free"):
        assert name in output
    assert "Lion saves >= 30% peak memory vs AdamW" in output
    assert "modern optimizer equals or beats AdamW" in output
    assert "Time to AdamW's final accuracy" in output
    written = {p.suffix for p in results.glob("comparison-*")}
    assert written == {".csv", ".md", ".png"}


def test_table_figures_recompute_from_json_records(compared):
    results, _ = compared
    records = {json.loads(p.read_text())["optimizer"]: json.loads(p.read_text()) for p in results.glob("*.json")}
    table = pd.read_csv(next(results.glob("comparison-*.csv"))).set_index("optimizer")
    base = records["adamw"]
    for opt, rec in records.items():
        row = table.loc[opt]
        assert row.acc_mean == pytest.approx(rec["final_test_acc"])
        assert row.acc_diff == pytest.approx(rec["final_test_acc"] - base["final_test_acc"])
        assert row.time_ratio == pytest.approx(rec["train_wall_time_s"] / base["train_wall_time_s"])
        assert row.peak_saving == pytest.approx(1 - rec["peak_memory_bytes"] / base["peak_memory_bytes"])
        assert row.state_saving == pytest.approx(1 - rec["optimizer_state_bytes"] / base["optimizer_state_bytes"])
    # Lion keeps one fp32 buffer per parameter; AdamW two, plus a 4-byte `step` tensor per parameter tensor.
    assert records["lion"]["optimizer_state_bytes"] == records["lion"]["param_bytes"]
    extra = records["adamw"]["optimizer_state_bytes"] - 2 * records["adamw"]["param_bytes"]
    assert 0 < extra < 1e-3 * records["adamw"]["param_bytes"] and extra % 4 == 0
    assert table.loc["lion", "state_saving"] == pytest.approx(0.5, abs=1e-4)


def test_second_compare_reuses_every_run(compared):
    results, _ = compared
    before = sorted(p.name for p in results.glob("*.json"))
    again = CliRunner().invoke(app, [*ARGS, "--results-dir", str(results)])
    assert again.exit_code == 0, again.output
    assert again.output.count("reusing") == 4
    assert sorted(p.name for p in results.glob("*.json")) == before


def test_strict_exit_code_follows_the_criteria(compared):
    results, _ = compared
    strict = CliRunner().invoke(app, [*ARGS, "--results-dir", str(results), "--strict"])
    # On this tiny model Lion cannot save 30% of peak memory (the ceiling is 25%): strict must fail.
    assert "FAIL" in strict.output
    assert strict.exit_code == 4


def test_compare_refuses_unknown_optimizer_and_bad_seeds(tmp_path: Path):
    bad = CliRunner().invoke(app, [*ARGS, "--optimizers", "adamw,adam", "--results-dir", str(tmp_path)])
    assert bad.exit_code == 1 and "unknown optimizer 'adam'" in bad.output
    bad = CliRunner().invoke(app, [*ARGS, "--seeds", "0,x", "--results-dir", str(tmp_path)])
    assert bad.exit_code == 1 and "--seeds" in bad.output
