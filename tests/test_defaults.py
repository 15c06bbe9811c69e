"""Consistent commands: `report` and `memory` have defaults as `compare` does, and say what they chose."""

from __future__ import annotations

import json
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
    assert result.exit_code == 1 and "unknown timm model" in result.output
    assert "preset's model" not in result.output  # the model was given: no preset model announced
