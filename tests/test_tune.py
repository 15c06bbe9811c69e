"""`optbench tune` end to end on tiny real training: Optuna studies on SQLite and on a real PostgreSQL
server, the validation split (the test split is never read), equal budgets after SIGKILL and resume.
"""

from __future__ import annotations

import json
import re
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import optbench.data
from optbench.cli import app
from optbench.data import holdout_validation, load_dataset
from optbench.records import load_records
from optbench.tune import MAX_RETRY, default_storage, draw_points, make_plan, open_storage, trial_dicts
from optbench.tune_analysis import budget_status

# TINY (tests/conftest.py) as command-line options: synthetic data, depth 1, 2 epochs.
WORKLOAD = ["--preset", "smoke", "--dataset", "synthetic", "--depth", "1", "--batch-size", "16", "--subset", "200",
            "--test-subset", "60", "--device", "cpu"]
ROOT = Path(__file__).resolve().parent.parent


def plan_for(results: Path, optimizers=("adamw", "lion"), trials=3, space="grid", epochs=2, storage=None):
    overrides = {"dataset": "synthetic", "depth": 1, "batch_size": 16, "subset": 200, "test_subset": 60,
                 "device": "cpu", "epochs": epochs, "results_dir": str(results)}
    return make_plan("smoke", list(optimizers), overrides, space, trials, 1000, 0.1, storage, heartbeat_s=1)


def studies(plan, storage=None) -> dict[str, list[dict]]:
    storage = storage or open_storage(plan.storage, heartbeat_s=1)
    return {s.optimizer: trial_dicts(optuna.load_study(study_name=s.name, storage=storage), s.optimizer)
            for s in plan.studies}


# --- the validation split and the plan ------------------------------------------------------------


def test_validation_split_is_fixed_class_balanced_and_carries_no_test_images():
    data = load_dataset("synthetic", subset=200, test_subset=60)
    held = holdout_validation(data, 0.1, seed=0)
    assert held.test_x.shape[0] == 20 and held.train_x.shape[0] == 180
    assert np.bincount(held.test_y.numpy(), minlength=10).tolist() == [2] * 10
    train_rows = {bytes(x.numpy().tobytes()) for x in held.train_x}
    assert not any(bytes(x.numpy().tobytes()) in train_rows for x in held.test_x)  # disjoint
    test_rows = {bytes(x.numpy().tobytes()) for x in data.test_x}
    assert not any(bytes(x.numpy().tobytes()) in test_rows for x in held.test_x)  # not the test split
    again = holdout_validation(data, 0.1, seed=0)
    assert torch.equal(again.test_x, held.test_x)  # fixed
    with pytest.raises(optbench.errors.DataError, match="at least one per class"):
        holdout_validation(data, 0.01, seed=0)


def test_grid_plan_is_the_defaults_then_the_rest_of_the_grid(tmp_path: Path):
    plan = plan_for(tmp_path, optimizers=("lion",), trials=12)
    spec = plan.studies[0]
    points = draw_points(spec, "grid", 12, seed=0)
    assert points[0] == {"lr": 1e-4, "weight_decay": 0.5}
    assert sorted(map(lambda p: tuple(p.values()), points)) == sorted(tuple(p.values()) for p in spec.space.grid_points())
    assert draw_points(spec, "grid", 4, seed=0) == points[:4]  # a larger budget extends a smaller one


def test_sobol_plan_maps_one_sequence_into_each_optimizers_ranges(tmp_path: Path):
    plan = plan_for(tmp_path, optimizers=("adamw", "lion"), trials=5, space="sobol")
    positions = []
    for spec in plan.studies:
        points = draw_points(spec, "sobol", 5, seed=0)
        assert points[0] == spec.defaults and len({tuple(p.values()) for p in points}) == 5
        positions.append([[spec.space.param(k).position(v) for k, v in p.items()] for p in points[1:]])
        assert all(0 <= x <= 1 for row in positions[-1] for x in row)
    assert np.allclose(positions[0], positions[1])  # the same unit points for every optimizer
    assert draw_points(plan.studies[0], "sobol", 5, seed=1) != draw_points(plan.studies[0], "sobol", 5, seed=0)


def test_bad_tune_options_are_one_line_errors(tmp_path: Path):
    runner = CliRunner()
    for args, message in ((["--trials", "13"], "exceeds adamw's grid of 12 points"),
                          (["--space", "random"], "unknown --space"),
                          (["--validation", "0.9"], "--validation must be a fraction"),
                          (["--storage", "postgresql://nobody@127.0.0.1:1/none"], "cannot open the Optuna storage"),
                          (["--optimizers", "adamw,adam"], "unknown optimizer 'adam'")):
        result = runner.invoke(app, ["tune", *WORKLOAD, "--epochs", "2", "--results-dir", str(tmp_path), *args])
        assert result.exit_code == 1, (args, result.output)
        assert message in result.output and "Traceback" not in result.output


# --- a small tune through the real CLI, on the default SQLite storage -----------------------------


@pytest.fixture(scope="module")
def tuned(tmp_path_factory) -> tuple[Path, str]:
    results = tmp_path_factory.mktemp("tune")
    args = ["tune", *WORKLOAD, "--epochs", "2", "--optimizers", "adamw,lion", "--trials", "3", "--final-seeds", "2",
            "--results-dir", str(results)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return results, result.output


def test_tune_prints_choice_defaults_compute_and_both_verdicts(tuned):
    results, output = tuned
    for text in ("What tuning did", "chosen", "val defaults", "test tuned", "device-s", "lr 0.001, wd 0.05",
                 "Lion saves >= 30% peak memory vs AdamW", "modern optimizer equals or beats AdamW",
                 "With the defaults (same final seeds)"):
        assert text in output, text
    assert "tuning changed" in output
    tune_dir = results / "tune"
    for name in ("tuning-grid-3.csv", "tuning-grid-3.md", "tuning-grid-3-curve.png", "tuning-grid-3-lr.png"):
        assert (tune_dir / name).stat().st_size > 0
    # the title says what ran, from the records' model block
    assert "ViT-Tiny, patch 4 on 16 px, depth 1, width 192" in (tune_dir / "tuning-grid-3.md").read_text().splitlines()[0]
    assert (results / "tune" / "optuna.sqlite3").is_file()


def test_tune_shows_an_eta_for_the_queued_trials(tuned):
    _, output = tuned
    text = " ".join(output.split())
    # After the first trial: 2 AdamW and 3 Lion trials are queued (Lion at AdamW's measured mean).
    assert re.search(r"adamw slot 1/3 .*; ETA \d[\dhms]* for the 5 queued trial\(s\) at this worker's pace", text), text
    assert not re.search(r"lion slot 3/3 [^;]*\]; ETA", text)  # nothing queued after the last one


def test_every_optimizer_got_exactly_the_budget_and_the_study_points_at_records(tuned):
    results, _ = tuned
    plan = plan_for(results)
    trial_records = {r["config_hash"]: r for r in load_records(results / "tune" / "trials").records}
    for opt, trials in studies(plan).items():
        assert len(trials) == 3 and all(t["state"] == "COMPLETE" for t in trials)
        assert sorted(t["slot"] for t in trials) == [0, 1, 2]
        for t in trials:
            record = json.loads(Path(t["record"]).read_text())
            assert record["config_hash"] == t["config_hash"] and record["optimizer"] == opt
            assert record["evaluated_on"] == "validation" and record["final_test_acc"] is None
            assert record["config"]["validation_fraction"] == 0.1 and record["dataset"]["test_images"] is None
            assert t["value"] == record["final_val_acc"]
            assert {k: record["config"]["hparams"][k] for k in t["params"]} == t["params"]
            assert t["config_hash"] in trial_records


def test_tuning_table_recomputes_from_the_records(tuned):
    results, _ = tuned
    table = pd.read_csv(results / "tune" / "tuning-grid-3.csv").set_index("optimizer")
    trial_records = load_records(results / "tune" / "trials").records
    final_dir = results / "tune" / "final-grid-3"
    finals = load_records(final_dir).records if final_dir.is_dir() else []
    defaults = load_records(results).records
    for opt in ("adamw", "lion"):
        mine = [r for r in trial_records if r["optimizer"] == opt]
        best = max(r["final_val_acc"] for r in mine)
        assert table.loc[opt, "tuned_val_acc"] == pytest.approx(best)
        chosen = {k: table.loc[opt, f"chosen_{k}"] for k in ("lr", "weight_decay")}
        # Where tuning kept the defaults, the tuned final runs are the defaults' own runs (reused, not rerun).
        tuned_finals = [r for r in finals if r["optimizer"] == opt] or [
            r for r in defaults if r["optimizer"] == opt and table.loc[opt, "default_lr"] == chosen["lr"]
            and table.loc[opt, "default_weight_decay"] == chosen["weight_decay"]]
        assert sorted(r["config"]["seed"] for r in tuned_finals) == [0, 1]  # fresh: the trials used 1000
        assert all(r["config"]["hparams"][k] == pytest.approx(v) for r in tuned_finals for k, v in chosen.items())
        assert all(r["config"].get("validation_fraction", 0) == 0 and r["final_test_acc"] is not None
                   for r in tuned_finals)
        assert table.loc[opt, "tuned_test_acc"] == pytest.approx(np.mean([r["final_test_acc"] for r in tuned_finals]))
        assert table.loc[opt, "default_test_acc"] == pytest.approx(
            np.mean([r["final_test_acc"] for r in defaults if r["optimizer"] == opt]))
        assert table.loc[opt, "tuning_epochs"] == sum(r["epochs_completed"] for r in mine)
        assert table.loc[opt, "tuning_device_seconds"] == pytest.approx(
            sum(r["train_wall_time_s"] + r["eval_wall_time_s"] for r in mine))


def show_status(results: Path, *extra: str) -> str:
    result = CliRunner().invoke(app, ["status", str(results), *extra], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    return result.output


def test_status_shows_a_tune_folder_and_never_changes_its_study(tuned):
    results, _ = tuned
    study_file = results / "tune" / "optuna.sqlite3"
    before = (study_file.read_bytes(), study_file.stat().st_mtime_ns)
    shown = show_status(results)
    assert (study_file.read_bytes(), study_file.stat().st_mtime_ns) == before  # read only
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[1:-1]]
            for line in shown.splitlines() if line.count("│") == 9}  # the studies table: 8 columns
    for opt in ("adamw", "lion"):  # optimizer, budget, complete, running, waiting, failed, pruned, detail
        assert rows[opt][:7] == [opt, "3", "3/3", "0", "0", "0", "0"], shown
    assert "6/6 trials settled" in shown
    assert "4 finished" in shown  # the defaults' final runs: 2 optimizers x 2 seeds, compare's runs in RESULTS
    finals = sorted((results / "tune").glob("final-*"))
    for folder in finals:  # the tuned settings' final runs, where tuning changed an optimizer's setting
        assert f"final runs of the tuned settings in {folder}" in " ".join(shown.split())
    assert shown == show_status(results / "tune")  # the tune folder itself names the same


def test_a_second_tune_reuses_every_trial_and_run(tuned):
    results, _ = tuned
    before = sorted(p.name for p in results.rglob("*.json"))
    again = CliRunner().invoke(app, ["tune", *WORKLOAD, "--epochs", "2", "--optimizers", "adamw,lion", "--trials", "3",
                                     "--final-seeds", "2", "--results-dir", str(results)])
    assert again.exit_code == 0, again.output
    assert sorted(p.name for p in results.rglob("*.json")) == before
    assert again.output.count("reusing") == 8


def test_trials_never_read_the_test_split(tuned, tmp_path: Path, monkeypatch):
    """The same trials with the test split's images and labels poisoned: identical scores and weights."""
    results, _ = tuned
    clean = {r["config_hash"]: r for r in load_records(results / "tune" / "trials").records}
    real_load = optbench.data.load_dataset

    def poisoned(*args, **kwargs):
        data = real_load(*args, **kwargs)
        data.test_x = torch.randint(0, 256, data.test_x.shape, dtype=torch.uint8)
        data.test_y = (data.test_y + 1) % data.spec.num_classes
        return data

    monkeypatch.setattr(optbench.data, "load_dataset", poisoned)
    result = CliRunner().invoke(app, ["tune", *WORKLOAD, "--epochs", "2", "--optimizers", "adamw,lion", "--trials",
                                      "3", "--final-seeds", "0", "--results-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    again = {r["config_hash"]: r for r in load_records(tmp_path / "tune" / "trials").records}
    assert set(again) == set(clean) and len(again) == 6
    for h, rec in again.items():
        assert rec["final_val_acc"] == clean[h]["final_val_acc"]
        assert rec["final_weights_sha256"] == clean[h]["final_weights_sha256"]
        assert [row["val_acc"] for row in rec["history"]] == [row["val_acc"] for row in clean[h]["history"]]


# --- killed workers: SQLite resume, PostgreSQL with two workers ----------------------------------


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def start_tune(results: Path, *extra: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "optbench.cli", "tune", *WORKLOAD, "--optimizers", "adamw,lion", "--trials", "3",
            "--final-seeds", "0", "--heartbeat", "1", "--epochs", "8", "--results-dir", str(results), *extra]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())


def kill_mid_trial(proc: subprocess.Popen, plan, storage_url: str, timeout: float = 180) -> dict:
    """SIGKILL `proc` while it runs a trial whose run has written a checkpoint; returns that trial."""
    worker = f"{socket.gethostname()}:{proc.pid}"
    storage = open_storage(storage_url, heartbeat_s=1)
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        checkpoints = {p.stem for p in (plan.trials_dir / "checkpoints").glob("*.pt")}
        if not checkpoints:
            time.sleep(0.01)
            continue
        try:
            running = [t for trials in studies(plan, storage).values() for t in trials
                       if t["state"] == "RUNNING" and t["worker"] == worker and t["config_hash"] in checkpoints]
        except Exception:  # the study may not exist yet
            running = []
        if running:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return running[0]
    raise AssertionError("no trial with a checkpoint appeared in time")


def assert_killed_trial_was_retried_and_resumed(plan, storage_url: str, killed: dict) -> dict[str, list[dict]]:
    by_opt = studies(plan, open_storage(storage_url, heartbeat_s=1))
    for opt, trials in by_opt.items():
        status = budget_status(trials, 3, MAX_RETRY)
        assert status.done and sorted(status.settled) == [0, 1, 2], (opt, trials)
        assert sum(t["state"] == "COMPLETE" for t in trials) == 3  # exactly the budget, not one more
    trials = by_opt[killed["optimizer"]]
    failed = next(t for t in trials if t["number"] == killed["number"])
    assert failed["state"] == "FAIL"
    retry = next(t for t in trials if t["retry_history"] and t["retry_history"][0] == killed["number"])
    assert retry["state"] == "COMPLETE" and retry["slot"] == killed["slot"] and retry["params"] == killed["params"]
    assert retry["config_hash"] == killed["config_hash"]
    record = json.loads(Path(retry["record"]).read_text())
    assert record["resumed"] is True and record["status"] == "ok"  # continued from the checkpoint
    return by_opt


def test_killed_tune_resumes_to_exactly_the_budget(tmp_path: Path):
    results = tmp_path / "results"
    plan = plan_for(results, epochs=8)
    proc = start_tune(results)
    killed = kill_mid_trial(proc, plan, default_storage(results))
    again = start_tune(results)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert_killed_trial_was_retried_and_resumed(plan, default_storage(results), killed)


def test_a_sigkilled_worker_on_journal_storage_is_retried_through_its_run_lock(tmp_path: Path):
    """Optuna's journal storage has no heartbeat: the killed worker's trial stays RUNNING (status says its
    worker is gone, without touching the journal) until the next tune finds its run's lock stale (holder dead
    on this host), fails it and re-queues it, spending one retry as the heartbeat does, and the retry resumes
    the run from its checkpoint. Before, the second tune stopped and said to run it again."""
    results, journal = tmp_path / "results", tmp_path / "shared" / "journal.log"
    url = f"journal:{journal}"
    plan = plan_for(results, optimizers=("adamw",), epochs=8, storage=url)
    proc = start_tune(results, "--storage", url, "--optimizers", "adamw")
    killed = kill_mid_trial(proc, plan, url)
    trials = studies(plan, open_storage(url))["adamw"]
    assert next(t for t in trials if t["number"] == killed["number"])["state"] == "RUNNING"
    before = journal.read_bytes()
    shown = show_status(results)
    assert journal.read_bytes() == before  # status never writes to a study
    assert f"running in {socket.gethostname()}:{proc.pid}; 1 lost (worker gone): the next tune re-queues it" \
        in " ".join(shown.split()), shown
    again = start_tune(results, "--storage", url, "--optimizers", "adamw")
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert_killed_trial_was_retried_and_resumed(plan, url, killed)
    assert "3/3 trials settled" in show_status(results)


def test_a_retried_trial_is_not_failed_while_its_worker_lives_beside_the_lost_workers_stale_lock(tmp_path: Path):
    """Journal storage: a lost worker's trial is failed and re-queued; the retry starts with a copy of its user
    attributes (the dead worker's host and pid) and the dead worker's stale run lock is still there until the
    retry's worker breaks it. Neither may make another worker fail the retry while its own worker lives (before:
    it was failed at once, a second retry spent, and its run trained by two workers)."""
    from optbench.runlock import lock_path, this_process
    from optbench.tune import fail_lost_trials, mark_taken, trial_lost

    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid of this host that is dead
    trials_dir, config_hash = tmp_path / "trials", "0123456789abcdef"
    study = optuna.create_study(study_name="s", storage=open_storage(f"journal:{tmp_path / 'journal.log'}"))
    study.enqueue_trial({}, user_attrs={"slot": 0, "defaults": True})
    lost = study.ask()
    lost.set_user_attr("process", {"trial": lost.number, **this_process(), "pid": gone.pid})
    lost.set_user_attr("config_hash", config_hash)
    lock = lock_path(trials_dir, config_hash)
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({**this_process(), "pid": gone.pid, "token": "dead worker's"}))

    fail_lost_trials(study, False, trials_dir)  # the dead worker's trial: failed and re-queued
    retry = study.ask()
    assert (lost.number, retry.number) == (0, 1)
    frozen = {t.number: t for t in study.get_trials(deepcopy=False)}
    assert frozen[0].state.name == "FAIL" and frozen[1].system_attrs["retry_history"] == [0]
    assert frozen[1].user_attrs["process"]["pid"] == gone.pid  # inherited
    assert not trial_lost(frozen[1], trials_dir)  # just taken, its worker not said yet
    mark_taken(retry)  # this process is the retry's worker; the stale lock is not broken yet
    assert not trial_lost(study.get_trials(deepcopy=False)[1], trials_dir)
    fail_lost_trials(study, False, trials_dir)
    assert [t.state.name for t in study.get_trials(deepcopy=False)] == ["FAIL", "RUNNING"]  # no second retry
    lock.write_text(json.dumps({**this_process(), "token": "the retry's"}))
    assert not trial_lost(study.get_trials(deepcopy=False)[1], trials_dir)  # holding the lock, alive


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres_url():
    """A real PostgreSQL server in a temporary directory, run as the postgres user, stopped afterwards."""
    bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not bins or shutil.which("runuser") is None:
        pytest.skip("PostgreSQL server binaries (Debian's postgresql package) or runuser are not installed; "
                    ".ci/run installs them")
    bindir = bins[-1].parent
    root = Path(tempfile.mkdtemp(prefix="optbench-pg-"))
    shutil.chown(root, "postgres", "postgres")
    data = root / "data"
    port = _free_port()
    as_pg = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*as_pg, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"], check=True,
                   capture_output=True)
    subprocess.run([*as_pg, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-o",
                    f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start"], check=True, capture_output=True)
    try:
        subprocess.run([*as_pg, str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "optbench"], check=True,
                       capture_output=True)
        yield f"postgresql://postgres@127.0.0.1:{port}/optbench"
    finally:
        subprocess.run([*as_pg, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def test_two_workers_on_postgresql_share_the_study_and_survive_a_sigkill(tmp_path: Path, postgres_url: str):
    results = tmp_path / "results"
    plan = plan_for(results, epochs=8, storage=postgres_url)
    first, second = start_tune(results, "--storage", postgres_url), start_tune(results, "--storage", postgres_url)
    killed = kill_mid_trial(first, plan, postgres_url)
    out, err = second.communicate(timeout=300)
    assert second.returncode == 0, err
    by_opt = assert_killed_trial_was_retried_and_resumed(plan, postgres_url, killed)
    survivor = f"{socket.gethostname()}:{second.pid}"
    killed_worker = f"{socket.gethostname()}:{first.pid}"
    completed = [t for trials in by_opt.values() for t in trials if t["state"] == "COMPLETE"]
    slots = [(t["optimizer"], t["slot"]) for t in completed]
    assert len(slots) == len(set(slots)) == 6  # disjoint: no slot completed twice; union: the whole budget
    assert {t["worker"] for t in completed} <= {survivor, killed_worker}
    assert any(t["worker"] == killed_worker for trials in by_opt.values() for t in trials)  # both took part
    retry = next(t for t in by_opt[killed["optimizer"]] if t["retry_history"])
    assert retry["worker"] == survivor  # the other worker finished the killed trial


def test_an_error_ends_the_serial_and_the_workers_tune_alike(tmp_path: Path):
    """attempts.py's rule for trials: an error (the defaults' trial run has a checkpoint that cannot be loaded)
    ends `tune` with its one-line message, in this process and with --workers 2 alike: the trial is failed
    and re-queued once (one retry spent, none more), the file is left as it was, and no record is written.
    Before, a worker printed a traceback and the parent tried the trial again, spending a second retry."""
    from optbench.tune import trial_config

    seen = []
    for mode in ([], ["--workers", "2"]):
        results = tmp_path / ("workers" if mode else "serial")
        plan = make_plan("smoke", ["adamw", "lion"], {
            "dataset": "synthetic", "depth": 1, "batch_size": 16, "subset": 200, "test_subset": 60, "device": "cpu",
            "epochs": 2, "threads": 1, "results_dir": str(results)}, "grid", 2, 1000, 0.1, None)
        broken_hash = trial_config(plan.studies[0].base, plan.studies[0].defaults).config_hash
        broken = plan.trials_dir / "checkpoints" / f"{broken_hash}.pt"
        broken.parent.mkdir(parents=True)
        broken.write_bytes(b"not a checkpoint at all")
        done = subprocess.run([sys.executable, "-m", "optbench.cli", "tune", *WORKLOAD, "--optimizers", "adamw,lion",
                               "--trials", "2", "--final-seeds", "0", "--epochs", "2", "--threads", "1", "--results-dir",
                               str(results), *mode], capture_output=True, text=True,
                              env={**_env(), "COLUMNS": "250"}, timeout=600)
        out = done.stdout + done.stderr
        assert "Traceback" not in out, out[-3000:]
        assert broken.read_bytes() == b"not a checkpoint at all"
        assert broken_hash not in {r["config_hash"] for r in load_records(plan.trials_dir).records}
        trials = [t for t in studies(plan)["adamw"] if t["config_hash"] == broken_hash or t["slot"] == 0]
        seen.append((done.returncode, [line.replace(str(results), "RESULTS") for line in out.splitlines()
                                       if "cannot be loaded" in line],
                     max(len(t["retry_history"]) for t in trials)))
    assert seen[0] == seen[1], seen
    assert seen[0][0] == 1 and len(seen[0][1]) == 1 and seen[0][1][0].startswith("error:") and seen[0][2] == 1, seen


def test_workers_option_spawns_processes_that_share_the_study(tmp_path: Path):
    results = tmp_path / "results"
    args = [sys.executable, "-m", "optbench.cli", "tune", *WORKLOAD, "--optimizers", "adamw,lion", "--trials", "2",
            "--final-seeds", "0", "--epochs", "2", "--workers", "2", "--results-dir", str(results)]
    done = subprocess.run(args, capture_output=True, text=True, env=_env(), timeout=300)
    assert done.returncode == 0, done.stderr
    by_opt = studies(plan_for(results, trials=2))
    completed = [t for trials in by_opt.values() for t in trials if t["state"] == "COMPLETE"]
    assert sorted((t["optimizer"], t["slot"]) for t in completed) == [("adamw", 0), ("adamw", 1), ("lion", 0),
                                                                       ("lion", 1)]
    assert {t["worker"] for t in completed} <= {"worker0", "worker1"}


def test_journal_file_storage_holds_the_study(tmp_path: Path):
    journal = tmp_path / "shared" / "journal.log"
    result = CliRunner().invoke(app, ["tune", *WORKLOAD, "--epochs", "1", "--optimizers", "adamw", "--trials", "2",
                                      "--final-seeds", "0", "--storage", f"journal:{journal}",
                                      "--results-dir", str(tmp_path / "results")])
    assert result.exit_code == 0, result.output
    assert journal.stat().st_size > 0 and not (tmp_path / "results" / "tune" / "optuna.sqlite3").exists()
    plan = plan_for(tmp_path / "results", optimizers=("adamw",), trials=2, epochs=1, storage=f"journal:{journal}")
    trials = studies(plan)["adamw"]
    assert sorted(t["slot"] for t in trials if t["state"] == "COMPLETE") == [0, 1]


# --- tune through submitit: one job array of tune_worker tasks, then the final runs as tasks too ------------


def test_tune_through_submitits_local_executor_survives_preemption(tmp_path: Path):
    """The trials go to submitit's LocalExecutor (SLURM's submission, signal and requeue machinery, as local
    processes); one task gets the preemption signal (USR2) mid-trial: the trial's run saves its checkpoint,
    the trial is re-queued without spending a retry, submitit requeues the task, and the run resumes.
    Every study ends with exactly its budget and the final runs go through the same executor."""
    from optbench.checkpoints import read_lock

    results = tmp_path / "results"
    args = [sys.executable, "-m", "optbench.cli", "tune", *WORKLOAD, "--optimizers", "adamw,lion", "--trials", "2",
            "--final-seeds", "1", "--epochs", "3", "--executor", "submitit-local", "--workers", "2",
            "--results-dir", str(results)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    plan = plan_for(results, trials=2, epochs=3)
    deadline, preempted = time.time() + 120, None
    while preempted is None and time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        for ckpt in (plan.trials_dir / "checkpoints").glob("*.pt"):
            owner = read_lock(ckpt.with_suffix(".lock"))
            if owner and isinstance(owner.get("pid"), int) and owner["pid"] != proc.pid:
                os.kill(owner["pid"], signal.SIGUSR2)
                preempted = ckpt.stem
                break
        time.sleep(0.1)
    assert preempted, "no trial wrote a checkpoint in time"
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "What tuning did" in out and "submitted 2 task(s) for 4 trial(s)" in out + err
    by_opt = studies(plan)
    trial_records = {r["config_hash"]: r for r in load_records(plan.trials_dir).records if r["status"] == "ok"}
    for opt, trials in by_opt.items():
        completed = [t for t in trials if t["state"] == "COMPLETE"]
        assert sorted(t["slot"] for t in completed) == [0, 1], trials  # exactly the budget
        assert all(t["config_hash"] in trial_records and t["worker"].split("@")[0].isdigit() for t in completed)
    stopped = [t for trials in by_opt.values() for t in trials if t["state"] == "FAIL"]
    assert [t["config_hash"] for t in stopped] == [preempted] and stopped[0]["status"] == "interrupted"
    again = next(t for trials in by_opt.values() for t in trials
                 if t["state"] == "COMPLETE" and t["config_hash"] == preempted)
    assert again["retry_history"] == []  # a stop is not a failure: no retry spent
    assert trial_records[preempted]["resumed"] is True  # continued from its checkpoint
    logs = "".join(p.read_text() for p in (plan.tune_dir / "slurm").glob("*_log.*"))
    assert "Requeued job" in logs  # submitit's own requeue
    jobs = json.loads((results / "slurm" / "jobs.json").read_text())  # the final runs: array tasks as well
    assert jobs and all(r["config"]["seed"] == 0 for r in load_records(results).records)


def test_tune_on_slurm_needs_a_shared_storage_and_says_when_there_is_no_slurm(tmp_path: Path):
    runner = CliRunner()
    base = ["tune", *WORKLOAD, "--epochs", "1", "--trials", "2", "--executor", "slurm", "--results-dir",
            str(tmp_path / "r")]
    result = runner.invoke(app, base)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "--executor slurm needs a study storage" in result.output and "journal:PATH" in result.output
    assert not (tmp_path / "r" / "tune" / "optuna.sqlite3").exists()  # nothing made before the check
    result = runner.invoke(app, [*base, "--storage", f"journal:{tmp_path / 'journal.log'}"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "no SLURM here" in result.output and "--executor submitit-local" in result.output


def test_a_trial_waiting_for_its_runs_holder_says_so_once_per_holder(tmp_path: Path, monkeypatch, synthetic_data):
    """Another live process holds the trial's run: the trial waits, naming the holder once (not at every
    look), and once more when another process takes the run over; then it runs the run when it is free."""
    import threading

    import optbench.tune
    from optbench.experiment import resolve_runtime
    from optbench.runlock import acquire_run_lock
    from conftest import tiny_config

    monkeypatch.setattr(optbench.tune, "BUSY_POLL_S", 0.02, raising=False)
    config = resolve_runtime(tiny_config("adamw", tmp_path / "results", epochs=1, memory_probe=False))  # as tune's
    held = acquire_run_lock(config.results_dir, config.config_hash)  # a live process: this one
    said: list[str] = []
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(
        record=optbench.tune._run_trial_run(config, synthetic_data, said.append)[0]))
    worker.start()
    time.sleep(1.0)  # dozens of looks
    owner = json.loads(held.path.read_text())
    taken = held.path.with_name("taken-over")
    taken.write_text(json.dumps({**owner, "token": "another", "worker": "w9"}))
    taken.replace(held.path)  # another process took the run over (a new token)
    time.sleep(1.0)
    held.release()  # not ours any more: left in place
    held.path.unlink()  # the new holder finishes without a record: the trial runs it
    worker.join(120)
    assert not worker.is_alive() and result["record"]["status"] == "ok"
    waiting = [line for line in said if "waiting for it" in line]
    assert len(waiting) == 2, said
    assert "held by another live process" in waiting[0] and "taken over" in waiting[1] and "w9" in waiting[1]


def test_status_shows_no_study_of_a_storage_holding_none_of_the_folders(tmp_path: Path):
    """The tune folder's index names its studies; a storage holding none of them (a shared database, the
    wrong --storage) shows none of its own, and says why in one line, rather than every study it holds."""
    from optbench.status import record_studies

    url = f"sqlite:///{tmp_path / 'shared.sqlite3'}"
    optuna.create_study(study_name="someone-elses-study", storage=open_storage(url))
    record_studies(tmp_path / "results" / "tune", url, {"smoke-adamw-grid-3": {"optimizer": "adamw", "budget": 3}})
    shown = show_status(tmp_path / "results")
    assert "someone-elses-study" not in shown and "trials settled" not in shown
    assert "no study that" in shown and "smoke-adamw-grid-3" in shown and "holds 1 other study" in shown
    assert "pass the --storage the tune used" in shown


def test_status_reads_a_journal_without_writing_to_it(tmp_path: Path):
    """status's journal storage reads what Optuna's own backend reads, and cannot write: Optuna's
    JournalFileBackend creates a missing file and appends under a lock file beside it, which a read-only
    mount or another user's journal refuses; status's reader does neither."""
    from optbench.errors import RecordError
    from optbench.study_storage import open_study_storage

    journal = tmp_path / "journal.log"
    written = optuna.create_study(study_name="s", storage=open_storage(f"journal:{journal}"))
    written.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=3)
    before = journal.read_bytes()
    with journal.open("ab") as handle:
        handle.write(b'{"op_code": 4, "worker_id"')  # a line still being appended by a worker
    read = optuna.load_study(study_name="s", storage=open_study_storage(f"journal:{journal}"))
    assert [(t.number, t.state, t.value, t.params) for t in read.trials] == \
        [(t.number, t.state, t.value, t.params) for t in written.trials] and len(read.trials) == 3
    with pytest.raises(RecordError, match="read only"):
        optuna.create_study(study_name="another", storage=open_study_storage(f"journal:{journal}"))
    with pytest.raises(RecordError, match="read only"):
        read.enqueue_trial({"x": 0.5})
    assert journal.read_bytes() == before + b'{"op_code": 4, "worker_id"'
    assert not list(tmp_path.glob("journal.log.lock*"))
