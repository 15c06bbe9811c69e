"""Consistent commands: `report` and `memory` have defaults as `compare` does, and say what they chose."""

from __future__ import annotations

import json
import re
import os
from pathlib import Path

from typer.testing import CliRunner

from optbench.cli import app
from tests.test_analysis import four

runner = CliRunner()


def write_records(folder: Path, records: list[dict], mtime: float) -> None:
    folder.mkdir(parents=True)
    for i, rec in enumerate(records):
        path = folder / f"r{i}.json"
        path.write_text(json.dumps(rec))
        os.utime(path, (mtime, mtime))


def test_report_without_a_folder_reads_the_one_with_the_newest_record(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    results = tmp_path / "results"
    write_records(results / "older", four(), 1_000_000)
    # Accuracies that make the accuracy verdict differ, so which folder was read shows in the output too.
    write_records(results / "newer", four(accs=(0.50, 0.30, 0.30, 0.30)), 2_000_000)
    (results / "toy").mkdir()
    (results / "toy" / "not-a-record.json").write_text("{}")  # newest file, but no run record: not chosen
    os.utime(results / "toy" / "not-a-record.json", (3_000_000, 3_000_000))

    result = runner.invoke(app, ["report"])
    assert result.exit_code == 0, result.output
    assert "reading results/newer" in result.output and "r" in result.output
    assert "no modern optimizer matches" in result.output
    assert list((results / "newer").glob("comparison-*.md")) and not list((results / "older").glob("comparison-*"))

    os.utime(results / "older" / "r0.json", (4_000_000, 4_000_000))  # now the older folder holds the newest
    result = runner.invoke(app, ["report"])
    assert result.exit_code == 0 and "reading results/older" in result.output, result.output
    assert "schedulefree match(es)" in result.output


def test_report_without_a_folder_and_no_records_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["report"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().count("\n") == 0 and "no results folder results/" in result.output
    (tmp_path / "results" / "smoke").mkdir(parents=True)
    result = runner.invoke(app, ["report"])
    assert result.exit_code == 1 and "no run records in results/" in result.output, result.output


def test_memory_without_model_or_batch_measures_the_homework_workload(tmp_path):
    path = tmp_path / "memory.json"
    result = runner.invoke(app, ["memory", "--method", "estimate", "--optimizers", "adamw,lion", "--batch-size", "2",
                                 "--json", str(path)])
    assert result.exit_code == 0, result.output
    assert "homework preset's model vit_tiny_patch16_224 on CIFAR-100: 32 px" in result.output
    spec = json.loads(path.read_text())["spec"]
    assert (spec["model"], spec["image_size"], spec["patch_size"], spec["num_classes"], spec["batch_size"],
            spec["in_chans"], spec["depth"]) == ("vit_tiny_patch16_224", 32, 4, 100, 2, 3, None)


def test_memory_takes_the_batch_size_and_workload_from_another_preset(tmp_path):
    path = tmp_path / "memory.json"
    result = runner.invoke(app, ["memory", "--preset", "smoke", "--method", "estimate", "--optimizers", "adamw,lion",
                                 "--json", str(path)])
    assert result.exit_code == 0, result.output
    assert "smoke preset's batch size 32" in result.output
    spec = json.loads(path.read_text())["spec"]
    # The smoke preset: ViT-Tiny at depth 4 on 8x8 one-channel digits, batch 32.
    assert (spec["image_size"], spec["in_chans"], spec["num_classes"], spec["depth"], spec["batch_size"]) == \
        (8, 1, 10, 4, 32)


def test_memory_with_a_model_keeps_that_models_own_size():
    result = runner.invoke(app, ["memory", "--model", "vit_nonexistent_patch16_224"])
    assert result.exit_code == 1 and "unknown model 'vit_nonexistent_patch16_224'" in result.output
    assert "preset's model" not in result.output  # the model was given: no preset model announced


# --- ETA --------------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_eta_is_the_measured_pace_times_the_steps_left(monkeypatch):
    from io import StringIO

    from rich.console import Console

    import optbench.console as console_module

    out = StringIO()
    monkeypatch.setattr(console_module, "console", Console(file=out, width=300))
    clock = FakeClock()
    reporter = console_module.RichReporter("adamw s0", clock=clock)
    reporter.epoch_start(1, 3, 10)  # 30 steps planned
    reporter.progress(5, 1.0, 100.0)  # the first log point: warm-up before it is not counted
    clock.now += 10.0
    reporter.progress(10, 1.0, 100.0)  # 5 steps in 10 s: 2 s per step
    clock.now += 4.0  # evaluation
    reporter.epoch_end({"epoch": 1, "train_loss": 1.0, "test_loss": 1.0, "test_acc": 0.5, "train_time_s": 12.0})
    # 5 steps measured in 14 s (with the evaluation), 20 steps left: 56 s.
    assert "ETA 56s for this run" in out.getvalue()
    assert console_module.duration_text(3725) == "1h02m" and console_module.duration_text(185) == "3m05s"


def test_compare_shows_each_runs_eta_and_the_comparisons(tmp_path):
    from optbench.compare import remaining_seconds

    assert remaining_seconds({"a": [10.0, 20.0], "b": [40.0]}, ["a", "b", "c"]) == 15.0 + 40.0 + 70.0 / 3
    result = runner.invoke(app, ["compare", "--optimizers", "adamw,lion", "--dataset", "synthetic", "--depth", "1",
                                 "--epochs", "3", "--subset", "64", "--test-subset", "20", "--batch-size", "16",
                                 "--device", "cpu", "--results-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    # 4 steps an epoch, one log point each: the pace is measured from the second epoch's end on.
    assert re.search(r"adamw s0 epoch 2: .* ETA \d+s for this run", result.output), result.output
    assert re.search(r"\[1/2\] adamw seed 0: ok, .*; ETA \d+s for the 1 run\(s\) still to train", result.output)
    assert not re.search(r"\[2/2\].*ETA", result.output)  # nothing left to train
