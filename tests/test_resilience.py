"""Nothing lost: kill -9 and resume, SIGTERM, out-of-memory, broken files, locks, input fuzzing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from optbench.checkpoints import checkpoint_path
from optbench.cli import app
from optbench.compare import plan_runs, run_comparison
from optbench.config import resolve_config
from optbench.errors import ConfigError
from optbench.experiment import RunBusy, resolve_runtime, run_experiment
from optbench.records import load_records

# A run that takes a few seconds: synthetic data, one transformer block.
SMALL = ["--dataset", "synthetic", "--depth", "1", "--batch-size", "100", "--device", "cpu", "--quiet"]


def cli(*args: str, results: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "optbench.cli", *args, "--results-dir", str(results)],
                          capture_output=True, text=True, timeout=timeout)


def start(*args: str, results: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "optbench.cli", *args, "--results-dir", str(results)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path_glob: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not list(path_glob.parent.glob(path_glob.name)):
        assert proc.poll() is None, f"run ended before a checkpoint appeared: {proc.communicate()}"
        assert time.time() < deadline, "no checkpoint appeared in time"
        time.sleep(0.05)


def only_record(results: Path) -> dict:
    loaded = load_records(results)
    assert len(loaded.records) == 1, [r["_path"] for r in loaded.records]
    return loaded.records[0]


@pytest.mark.parametrize("optimizer", ["sophia", "schedulefree"])
def test_kill9_then_resume_gives_the_same_final_numbers(tmp_path: Path, optimizer: str):
    """Sophia draws Hutchinson probes from torch's RNG; Schedule-Free is checkpointed in eval mode."""
    args = ["run", "-o", optimizer, "--epochs", "6", *SMALL]
    whole = cli(*args, results=tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr
    proc = start(*args, results=tmp_path / "killed")
    wait_for(tmp_path / "killed" / "checkpoints" / "[!.]*.pt", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not list((tmp_path / "killed").glob("*.json")), "the run finished before it was killed"
    resumed = cli(*args, "--resume", results=tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr
    a, b = only_record(tmp_path / "whole"), only_record(tmp_path / "killed")
    assert b["resumed"] is True and a["resumed"] is False
    assert b["final_weights_sha256"] == a["final_weights_sha256"]
    assert b["final_test_acc"] == a["final_test_acc"]
    assert [h["test_acc"] for h in b["history"]] == [h["test_acc"] for h in a["history"]]
    assert b["hessian_updates"] == a["hessian_updates"]
    assert not checkpoint_path(tmp_path / "killed", b["config_hash"]).exists()  # finished: checkpoint removed


def test_sigterm_stops_saves_and_records_interrupted_then_resumes(tmp_path: Path):
    args = ["run", "-o", "adamw", "--epochs", "8", *SMALL]
    whole = cli(*args, results=tmp_path / "whole")
    proc = start(*args, results=tmp_path / "stopped")
    wait_for(tmp_path / "stopped" / "checkpoints" / "[!.]*.pt", proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    rec = only_record(tmp_path / "stopped")
    assert rec["status"] == "interrupted" and rec["final_test_acc"] is None
    assert 1 <= rec["epochs_completed"] < 8 and len(rec["history"]) == rec["epochs_completed"]
    assert checkpoint_path(tmp_path / "stopped", rec["config_hash"]).exists()
    resumed = cli(*args, "--resume", results=tmp_path / "stopped")
    assert resumed.returncode == 0, resumed.stderr
    finished = [r for r in load_records(tmp_path / "stopped").records if r["status"] == "ok"]
    assert len(finished) == 1  # and the interrupted record is still there, untouched
    assert finished[0]["final_weights_sha256"] == only_record(tmp_path / "whole")["final_weights_sha256"]


def small_config(optimizer: str, results: Path, **changes):
    overrides = {"dataset": "synthetic", "depth": 1, "epochs": 2, "batch_size": 100, "device": "cpu",
                 "results_dir": str(results), "memory_probe": False, **changes}
    return resolve_config(optimizer, "smoke", overrides)


class _Silent:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def __getattr__(self, name):
        return lambda *a, **k: None


def test_out_of_memory_ends_one_run_and_compare_carries_on(tmp_path: Path, monkeypatch):
    import optbench.train as train_module

    real_step = train_module.training_step

    def step_that_runs_out(model, optimizer, entry, *args):
        if entry.name == "lion":  # simulate a CUDA OOM on Lion's first step
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(model, optimizer, entry, *args)

    monkeypatch.setattr(train_module, "training_step", step_that_runs_out)
    configs = [resolve_runtime(small_config(o, tmp_path)) for o in ("adamw", "lion", "schedulefree")]
    records = run_comparison(configs, rerun=False, make_reporter=lambda c: _Silent(), announce=lambda t: None)
    status = {r["optimizer"]: r for r in records}
    assert status["lion"]["status"] == "oom" and "batch size 100" in status["lion"]["status_detail"]
    assert status["adamw"]["status"] == "ok" and status["schedulefree"]["status"] == "ok"
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "lion seed 0: oom" in result.output


def test_compare_reuses_finished_runs_and_reruns_only_missing(tmp_path: Path):
    configs = [resolve_runtime(small_config(o, tmp_path)) for o in ("adamw", "lion")]
    messages: list[str] = []
    run_comparison(configs[:1], False, lambda c: _Silent(), messages.append)
    run_comparison(configs, False, lambda c: _Silent(), messages.append)
    assert "reusing" in messages[1] and "adamw" in messages[1]
    assert "reusing" not in messages[2] and "lion" in messages[2]
    assert len(load_records(tmp_path).records) == 2


def test_checkpoint_of_another_config_or_corrupt_is_refused(tmp_path: Path):
    from optbench.checkpoints import save_checkpoint

    a = resolve_runtime(small_config("adamw", tmp_path, epochs=3))
    b = resolve_runtime(small_config("adamw", tmp_path, epochs=4))
    path_a, path_b = checkpoint_path(tmp_path, a.config_hash), checkpoint_path(tmp_path, b.config_hash)
    save_checkpoint(path_a, {"config_hash": a.config_hash})
    path_b.write_bytes(path_a.read_bytes())
    with pytest.raises(ConfigError.__mro__[1], match="belongs to another config"):
        run_experiment(b, resume=True)

    argv = ["run", "-o", "adamw", "--preset", "smoke", "--dataset", "synthetic", "--depth", "1", "--epochs", "4",
            "--batch-size", "100", "--device", "cpu", "--results-dir", str(tmp_path), "-q"]
    cli_hash = json.loads(CliRunner().invoke(app, [*argv, "--dry-run"]).output)["config_hash"]
    corrupt = checkpoint_path(tmp_path, cli_hash)
    corrupt.write_bytes(b"not a checkpoint at all")
    result = CliRunner().invoke(app, [*argv, "--resume"])
    assert result.exit_code == 1 and "cannot be loaded" in result.output, result.output
    assert "Traceback" not in result.output
    assert corrupt.read_bytes() == b"not a checkpoint at all"  # named and refused, not overwritten
    assert not list(tmp_path.glob("*.json"))


def test_unwritable_results_dir_fails_before_training(tmp_path: Path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    started = time.time()
    result = CliRunner().invoke(app, ["run", "-o", "adamw", "--dataset", "synthetic", "--depth", "1",
                                      "--results-dir", str(blocker / "results")])
    assert result.exit_code == 1 and "cannot write to results directory" in result.output
    assert time.time() - started < 20  # refused before any training


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_results_dir_fails_before_training(tmp_path: Path):
    tmp_path.chmod(0o500)
    try:
        result = CliRunner().invoke(app, ["run", "-o", "adamw", "--dataset", "synthetic", "--results-dir",
                                          str(tmp_path)])
        assert result.exit_code == 1 and "cannot write" in result.output
    finally:
        tmp_path.chmod(0o700)


def test_a_run_held_by_another_live_process_is_not_clobbered_and_compare_waits_for_it(tmp_path: Path):
    """The serial compare leaves a held run to its holder and waits for it, as --workers do (attempts.py: one
    rule): the holder is killed (its lock goes stale) and compare takes the run over. Before, the serial compare
    skipped it and reported without it, exit 0."""
    import threading

    config = resolve_runtime(small_config("adamw", tmp_path))
    other = resolve_runtime(small_config("lion", tmp_path))
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from optbench.checkpoints import acquire_run_lock; "
        f"lock = acquire_run_lock({str(tmp_path)!r}, {config.config_hash!r}); print('held', flush=True); "
        "time.sleep(120)")], stdout=subprocess.PIPE, text=True)
    messages: list[str] = []
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunBusy):
            run_experiment(config)

        def kill_when_waited_for() -> None:
            deadline = time.time() + 300
            while time.time() < deadline and not any(m.startswith("waiting for 1 run") for m in messages):
                time.sleep(0.1)
            time.sleep(1)  # a look or two while it is still held
            holder.kill()  # kill -9: its lock is left with a dead pid, stale

        threading.Thread(target=kill_when_waited_for, daemon=True).start()
        records = run_comparison([config, other], False, lambda c: _Silent(), messages.append)
    finally:
        holder.kill()
        holder.wait()
    assert [r["optimizer"] for r in records] == ["adamw", "lion"] and {r["status"] for r in records} == {"ok"}
    assert "held by another live process" in messages[0], messages
    assert len(list(tmp_path.glob("*.json"))) == 2  # each run once


def test_out_of_memory_during_set_up_is_recorded(tmp_path: Path, monkeypatch):
    import optbench.experiment as experiment

    def probe_runs_out(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")

    monkeypatch.setattr(experiment, "memory_probe", probe_runs_out)
    record, path = run_experiment(small_config("sophia", tmp_path, memory_probe=True))
    assert record["status"] == "oom" and "set-up" in record["status_detail"] and "batch size 100" in record["status_detail"]
    assert path.exists() and load_records(tmp_path).records[0]["status"] == "oom"


# --- fuzzing the config/CLI layer ------------------------------------------------------------------

values = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                   st.text(max_size=12), st.lists(st.floats(allow_nan=True), max_size=3))
setting_names = st.sampled_from(["dataset", "epochs", "batch_size", "subset", "device", "precision", "seed",
                                 "augment", "depth", "patch_size", "warmup_steps", "model", "bogus"])
hparam_names = st.sampled_from(["lr", "weight_decay", "betas", "eps", "p", "update_period",
                                "hessian_distribution", "implementation", "nonsense"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(optimizer=st.sampled_from(["adamw", "lion", "sophia", "schedulefree", "sgd", ""]),
       overrides=st.dictionaries(setting_names, values, max_size=4),
       hparams=st.dictionaries(hparam_names, values, max_size=3))
def test_config_layer_accepts_or_refuses_cleanly(optimizer, overrides, hparams):
    try:
        config = resolve_config(optimizer, "smoke", overrides, hparams)
    except ConfigError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    assert config.hparams["lr"] > 0 and config.epochs >= 1 and config.batch_size >= 1


option_values = st.one_of(st.text(max_size=10), st.integers(-5, 10**9).map(str),
                          st.sampled_from(["nan", "inf", "-inf", "0", "-1", "1e-3", "1e400", "", "cuda", "cpu"]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(optimizer=st.sampled_from(["adamw", "lion", "sophia", "schedulefree", "Lion", "adam"]),
       options=st.lists(st.tuples(st.sampled_from(["--lr", "--weight-decay", "--epochs", "--batch-size", "--seed",
                                                   "--subset", "--device", "--precision", "--dataset", "--depth",
                                                   "--preset", "--opt"]), option_values), max_size=4))
def test_cli_never_shows_a_traceback(optimizer, options):
    argv = ["run", "-o", optimizer, "--dry-run"]
    for name, value in options:
        argv += [name, value]
    result = CliRunner().invoke(app, argv)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code in (0, 1, 2)
    assert "Traceback" not in result.output
    if result.exit_code == 0:
        assert json.loads(result.output)["optimizer"] == optimizer


def test_an_unexpected_error_in_training_is_recorded_not_a_traceback(tmp_path: Path, monkeypatch):
    import optbench.train as train_module

    real_step, calls = train_module.training_step, []

    def step_then_backend_failure(*args):
        calls.append(1)
        if len(calls) > 12:  # after the first epoch (10 steps): e.g. a torch.compile backend error
            raise RuntimeError("BackendCompilerFailed: inductor raised CppCompileError")
        return real_step(*args)

    monkeypatch.setattr(train_module, "training_step", step_then_backend_failure)
    record, path = run_experiment(small_config("adamw", tmp_path, epochs=3))
    assert record["status"] == "failed" and "CppCompileError" in record["status_detail"]
    assert record["epochs_completed"] == 1 and len(record["history"]) == 1
    assert path.exists()
