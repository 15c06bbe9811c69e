"""Consistent commands: `report` and `memory` have defaults as `compare` does, and say what they chose."""

from __future__ import annotations

import json
import re
import os
from pathlib import Path

import pytest
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


def test_memory_with_a_model_keeps_that_models_own_size(tmp_path):
    result = runner.invoke(app, ["memory", "--model", "vit_nonexistent_patch16_224"])
    assert result.exit_code == 1 and "unknown model 'vit_nonexistent_patch16_224'" in result.output
    assert "preset's model" not in result.output  # the model was given: no preset model announced
    path = tmp_path / "memory.json"
    result = runner.invoke(app, ["memory", "--model", "vit_tiny_patch16_224", "--batch-size", "1", "--method",
                                 "estimate", "--optimizers", "adamw,lion", "--json", str(path)])
    assert result.exit_code == 0 and "preset's" not in result.output, result.output
    spec = json.loads(path.read_text())["spec"]
    assert (spec["image_size"], spec["patch_size"], spec["num_classes"], spec["in_chans"]) == (224, 16, 1000, 3)


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
    assert re.search(r"adamw s0 epoch 2: .* ETA \d[\dhms]* for this run", result.output), result.output
    assert re.search(r"\[1/2\] adamw seed 0: ok, .*; ETA \d[\dhms]* for the 1 run\(s\) still to train", result.output)
    assert not re.search(r"\[2/2\].*ETA", result.output)  # nothing left to train


# --- a long CPU run asks first, with a measured estimate ----------------------------------------------

from tests.test_data import skip_md5_only, write_tiny_cifar  # noqa: E402,F401  (a fixture and a helper)

CIFAR_ARGS = ["--dataset", "cifar10", "--no-download", "--depth", "1", "--epochs", "2", "--batch-size", "8",
              "--device", "cpu"]


def one_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, output
    return lines[0]


def test_a_cifar_run_on_a_cpu_without_a_terminal_needs_yes(tmp_path, skip_md5_only):
    write_tiny_cifar(tmp_path / "data", "cifar10")
    results = tmp_path / "results"
    result = runner.invoke(app, ["run", "-o", "adamw", *CIFAR_ARGS, "--data-dir", str(tmp_path / "data"),
                                 "--results-dir", str(results), "--quiet"])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    line = one_line(result.output)
    assert "pass --yes" in line and re.search(r"estimated \d+s for 1 run\(s\) of 26 training steps", line), line
    assert "adamw" in line and "s/step" in line
    assert not list(results.glob("*.json")), "nothing may be trained or written before the confirmation"

    result = runner.invoke(app, ["run", "-o", "adamw", *CIFAR_ARGS, "--data-dir", str(tmp_path / "data"),
                                 "--results-dir", str(results), "--quiet", "--yes"])
    assert result.exit_code == 0, result.output
    assert "starting (--yes)" in result.output and len(list(results.glob("*.json"))) == 1


def test_at_a_terminal_the_answer_decides(tmp_path, skip_md5_only, monkeypatch):
    import optbench.cli as cli

    monkeypatch.setattr(cli, "_stdin_is_tty", lambda: True)
    write_tiny_cifar(tmp_path / "data", "cifar10")
    results = tmp_path / "results"
    args = ["compare", "--optimizers", "adamw,sophia", *CIFAR_ARGS, "--data-dir", str(tmp_path / "data"),
            "--results-dir", str(results), "--quiet"]
    result = runner.invoke(app, args, input="n\n")
    assert result.exit_code == 1 and "not started" in result.output, result.output
    assert "estimated" in result.output and "2 run(s) of 52 training steps" in result.output
    assert not list(results.glob("*.json"))
    result = runner.invoke(app, args, input="y\n")
    assert result.exit_code == 0, result.output
    assert len(list(results.glob("*.json"))) == 2
    # Everything already trained: nothing to estimate, nothing asked.
    monkeypatch.setattr(cli, "_stdin_is_tty", lambda: False)
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "estimated" not in again.output, again.output


def test_the_estimate_times_real_steps_with_sophias_hessian_at_its_cadence(tmp_path, skip_md5_only):
    from optbench.compare import plan_runs
    from optbench.data import load_dataset
    from optbench.estimate import estimate_plan

    write_tiny_cifar(tmp_path / "data", "cifar10")
    configs = plan_runs("cifar10", ["adamw", "sophia"], [0, 1], {
        "dataset": "cifar10", "depth": 1, "epochs": 3, "batch_size": 8, "device": "cpu", "download": False,
        "data_dir": str(tmp_path / "data"), "results_dir": str(tmp_path / "r")})
    data = load_dataset("cifar10", tmp_path / "data", False)
    estimate = estimate_plan(configs, data)
    assert estimate.runs == 4 and estimate.steps == 4 * 3 * 13  # 100 images at batch 8: 13 steps an epoch
    adamw, sophia = estimate.paces["adamw"], estimate.paces["sophia"]
    assert adamw.timed_steps == 2 and adamw.hessian_steps_timed == 0
    # Two plain steps and one Hessian step, weighted 1/update_period as in training: Sophia's pace lies
    # between its plain and its Hessian steps.
    assert sophia.timed_steps == 3 and sophia.hessian_steps_timed == 1
    period = configs[1].hparams["update_period"]
    assert sophia.seconds_per_step == pytest.approx(sophia.plain_step_s * (period - 1) / period
                                                    + sophia.hessian_step_s / period)
    assert adamw.hessian_step_s is None and adamw.seconds_per_step == pytest.approx(adamw.plain_step_s)
    expected = sum(3 * 13 * p.seconds_per_step + 3 * p.eval_seconds_per_epoch for p in (adamw, sophia)) * 2
    assert estimate.seconds == pytest.approx(expected) and estimate.seconds > 0


def test_the_estimate_times_what_the_run_trains(tmp_path, monkeypatch):
    """A tuning trial (a validation share held out): the estimate's model, optimizer and schedule come
    from the run's own builder on the run's own split: same initial weights, same optimizer
    implementation, same planned steps (the training split minus the validation share) as the run."""
    import optbench.estimate as estimate
    import optbench.experiment as experiment
    from optbench.data import load_dataset
    from tests.conftest import tiny_config

    built = []
    real_build = experiment.build_training

    def build_training(config, entry, data, device):
        setup = real_build(config, entry, data, device)
        built.append((experiment.weights_digest(setup.model), setup.built.implementation, setup.total_steps,
                      type(setup.scheduler).__name__))
        return setup

    monkeypatch.setattr(experiment, "build_training", build_training)
    monkeypatch.setattr(estimate, "build_training", build_training)
    config = tiny_config("adamw", tmp_path / "results", epochs=1, validation_fraction=0.1, memory_probe=False)
    estimate.estimate_plan([config], load_dataset("synthetic", subset=200, test_subset=60))
    record, _ = experiment.run_experiment(config)
    assert record["status"] == "ok" and len(built) == 2
    assert built[0] == built[1], built
    # 200 images, 20 held out for validation: 180 at batch 16 is 12 steps, not the 13 of all 200
    assert built[0][2] == record["total_steps_planned"] == 12 and built[0][3] == "LambdaLR"


def test_a_cifar_tune_on_a_cpu_counts_every_trial_and_final_run(tmp_path, skip_md5_only):
    write_tiny_cifar(tmp_path / "data", "cifar10")
    results = tmp_path / "results"
    result = runner.invoke(app, ["tune", "--optimizers", "adamw", "--trials", "2", "--final-seeds", "1", "--epochs", "1",
                                 *[a for a in CIFAR_ARGS if a not in ("--epochs", "2")], "--data-dir",
                                 str(tmp_path / "data"), "--results-dir", str(results), "--quiet"])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    line = one_line(result.output)
    # Trials train on 100 - 10 validation images (12 steps at batch 8), final runs on all 100 (13 steps).
    assert "4 run(s) of 50 training steps" in line and "2 trial(s) per optimizer and 2 final run(s)" in line, line
    assert "pass --yes" in line
    assert not list(results.rglob("*.json")), "nothing may be trained before the confirmation"
