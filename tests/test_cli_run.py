"""`optbench run` from the command line: bad input gives one line and a non-zero exit, never a traceback;
a run writes its record; a diverged run exits 3.

Most calls go through typer's CliRunner on the real app (stdout and stderr both land in `output`); one
runs the installed `optbench` script in a subprocess.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from optbench.cli import EXIT_RUN_FAILED, app

runner = CliRunner()

TINY_ARGS = ["--preset", "smoke", "--dataset", "synthetic", "--depth", "1", "--epochs", "1", "--batch-size", "16",
             "--subset", "64", "--test-subset", "30", "--device", "cpu"]


def invoke(*args: str):
    return runner.invoke(app, list(args))


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def assert_one_line_error(result, *fragments: str) -> str:
    assert result.exit_code not in (0, None), result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = error_lines(result.output)
    assert len(lines) == 1, result.output
    for fragment in fragments:  # the whole message is on that one line
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# --- bad input -----------------------------------------------------------------------------------------


def test_unknown_optimizer():
    result = invoke("run", "-o", "adam")
    assert result.exit_code == 1
    assert_one_line_error(result, "unknown optimizer 'adam'", "adamw, lion, sophia, schedulefree")


@pytest.mark.parametrize("lr", ["0", "-0.001", "nan"])
def test_non_positive_learning_rate(lr):
    result = invoke("run", "-o", "adamw", "--lr", lr)
    assert result.exit_code == 1
    assert_one_line_error(result, "learning rate for adamw must be a positive number")


def test_missing_dataset_without_network(tmp_path):
    empty = tmp_path / "data"
    empty.mkdir()
    result = invoke("run", "-o", "adamw", "--dataset", "cifar10", "--no-download", "--data-dir", str(empty),
                    "--results-dir", str(tmp_path / "results"))
    assert result.exit_code == 1
    assert_one_line_error(result, f"CIFAR-10 not found in {empty}", "--data-dir", "cifar-10-batches-py/")
    assert not list((tmp_path / "results").glob("*.json"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_asked_for_without_a_gpu(tmp_path):
    result = invoke("run", "-o", "adamw", "--device", "cuda", "--dataset", "synthetic",
                    "--results-dir", str(tmp_path))
    assert result.exit_code == 1
    assert_one_line_error(result, "--device cuda was asked for but no CUDA GPU", "use --device cpu")


def test_unknown_preset():
    result = invoke("run", "-o", "lion", "--preset", "huge")
    assert result.exit_code == 1
    assert_one_line_error(result, "unknown preset 'huge'", "smoke")


@pytest.mark.parametrize("opt,fragment", [
    ("p0.02", "--opt expects KEY=VALUE (e.g. --opt p=0.02), got 'p0.02'"),
    ("=0.02", "--opt expects KEY=VALUE"),
    ("rho=0.02", "sophia has no hyperparameter 'rho'"),
    ("betas=0.9", "betas for sophia must be two"),
    ("update_period=0", "update_period must be between 1 and"),
])
def test_bad_opt(opt, fragment):
    result = invoke("run", "-o", "sophia", "--opt", opt)
    assert result.exit_code == 1
    assert_one_line_error(result, fragment)


def test_missing_optimizer_option_is_a_usage_error():
    result = invoke("run", "--preset", "smoke")
    assert result.exit_code == 2
    assert "Traceback" not in result.output and "--optimizer" in result.output


def test_installed_script_reports_bad_input_on_one_stderr_line():
    script = Path(sys.executable).with_name("optbench")
    assert script.exists(), script
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([str(script), "run", "-o", "adam"], capture_output=True, text=True, timeout=120,
                          env=env)
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        "error: unknown optimizer 'adam': choose one of adamw, lion, sophia, schedulefree, muon, adopt, ademamix, prodigy, soap, mars"]


# --- runs ------------------------------------------------------------------------------------------


def test_lion_warnings_appear_and_the_run_writes_its_record(tmp_path):
    result = invoke("run", "-o", "lion", "--lr", "1e-3", "--weight-decay", "0.01", *TINY_ARGS,
                    "--results-dir", str(tmp_path), "--quiet")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # rich wraps long warnings at the console width
    assert "warning: Lion at lr 0.001 is at AdamW's scale and tends to diverge" in text
    assert "warning: Lion with weight decay 0.01 is usually worse" in text
    records = list(tmp_path.glob("*.json"))
    assert len(records) == 1
    record = json.loads(records[0].read_text())
    assert record["optimizer"] == "lion" and record["status"] == "ok"
    assert record["config"]["hparams"]["lr"] == 1e-3 and record["config"]["hparams"]["weight_decay"] == 0.01
    assert record["config"]["depth"] == 1 and record["config"]["dataset"] == "synthetic"
    assert "Lion: status ok" in result.output
    assert str(records[0]) in "".join(result.output.split())  # rich may break the path across lines
    # The record keeps the warnings, so a report (e.g. the smoke report, batch 32) says them again.
    assert "warning: Lion at batch size 16" in text and "below 64" in text
    assert len(record["warnings"]) == 3 and any("batch size 16" in w for w in record["warnings"])
    report = invoke("report", str(tmp_path))
    assert report.exit_code == 0, report.output
    assert "Lion at batch size 16" in " ".join(report.output.split())
    assert "Lion at batch size 16" in next(tmp_path.glob("comparison-*.md")).read_text()


def test_schedulefree_with_a_scheduler_is_refused_with_a_reason(tmp_path):
    result = invoke("run", "-o", "schedulefree", "--opt", "scheduler=cosine", *TINY_ARGS,
                    "--results-dir", str(tmp_path))
    assert result.exit_code == 1
    text = " ".join(result.output.split())
    assert "no learning-rate schedule" in text and "has no hyperparameter" not in text


def test_course_default_lion_gives_no_warnings(tmp_path):
    # Warnings are printed before the data is loaded; the missing data then ends the run cheaply.
    result = invoke("run", "-o", "lion", "--dataset", "cifar10", "--no-download", "--data-dir",
                    str(tmp_path / "empty"), "--results-dir", str(tmp_path / "results"), "--quiet")
    assert result.exit_code == 1 and "CIFAR-10 not found" in result.output
    assert "warning:" not in result.output
    result = invoke("run", "-o", "lion", "--lr", "1e-3", "--dataset", "cifar10", "--no-download", "--data-dir",
                    str(tmp_path / "empty"), "--results-dir", str(tmp_path / "results"), "--quiet")
    assert result.exit_code == 1 and result.output.count("warning:") == 1  # only the lr one


def test_diverged_run_exits_3_and_still_writes_its_record(tmp_path):
    result = invoke("run", "-o", "adamw", "--lr", "1e6", *TINY_ARGS, "--results-dir", str(tmp_path), "--quiet")
    assert result.exit_code == EXIT_RUN_FAILED == 3, result.output
    assert "Traceback" not in result.output
    assert re.search(r"AdamW: status diverged \(non-finite loss at step \d+\)", result.output)
    records = list(tmp_path.glob("*.json"))
    assert len(records) == 1
    record = json.loads(records[0].read_text())
    assert record["status"] == "diverged" and record["diverged_at_step"] >= 1
