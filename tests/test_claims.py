"""No run trained twice: the finished-run check is made again under the run's lock (`claim_run`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from optbench.cli import app
from optbench.compare import plan_runs, run_comparison
from optbench.config import resolve_config
from optbench.experiment import claim_run, resolve_runtime, run_experiment
from optbench.records import load_records

TINY = {"dataset": "synthetic", "depth": 1, "epochs": 1, "batch_size": 100, "subset": 200, "test_subset": 60,
        "device": "cpu", "memory_probe": False}
CLI_TINY = ["--preset", "smoke", "--dataset", "synthetic", "--depth", "1", "--epochs", "1", "--batch-size", "100",
            "--subset", "200", "--test-subset", "60", "--device", "cpu", "--quiet"]


def tiny(optimizer: str, results: Path, **changes):
    return resolve_runtime(resolve_config(optimizer, "smoke", {**TINY, "results_dir": str(results), **changes}))


class _Silent:
    def __init__(self, on_enter=None):
        self.on_enter = on_enter

    def __enter__(self):
        if self.on_enter:
            self.on_enter()
        return self

    def __exit__(self, *exc):
        return None

    def __getattr__(self, name):
        return lambda *a, **k: None


def test_a_run_finished_by_another_process_after_compare_started_is_reused(tmp_path: Path):
    """compare read the finished runs before b was done; b finishes while a trains: b is not trained again."""
    a, b = tiny("adamw", tmp_path), tiny("lion", tmp_path)
    finished_meanwhile = []

    def reporter(config):
        if config is a:  # while compare is on run a, "another process" finishes run b
            return _Silent(lambda: finished_meanwhile.append(run_experiment(b)))
        return _Silent()

    messages: list[str] = []
    records = run_comparison([a, b], rerun=False, make_reporter=reporter, announce=messages.append)
    assert len(finished_meanwhile) == 1
    on_disk = load_records(tmp_path).records
    assert sorted(r["optimizer"] for r in on_disk) == ["adamw", "lion"], [r["_path"] for r in on_disk]
    assert "reusing" in messages[1] and "lion" in messages[1]
    assert [r["optimizer"] for r in records] == ["adamw", "lion"]
    assert records[1]["_path"] == str(finished_meanwhile[0][1])


def test_claim_run_returns_the_finished_record_and_releases_the_lock(tmp_path: Path):
    config = tiny("adamw", tmp_path)
    first = claim_run(config)
    assert first.finished is None and first.lock is not None
    first.lock.release()
    record, path = run_experiment(config)
    claim = claim_run(config)
    assert claim.lock is None and claim.finished["_path"] == str(path)
    assert claim_run(config).finished is not None  # the lock was released: claiming again works
    fresh = claim_run(config, reuse_finished=False)  # --rerun: the lock, to train again
    assert fresh.finished is None and fresh.lock is not None
    fresh.lock.release()


def test_the_same_optimizer_or_seed_twice_is_one_run(tmp_path: Path):
    configs = plan_runs("smoke", ["adamw", "adamw", "lion"], [0, 0],
                        {k: v for k, v in TINY.items() if k != "memory_probe"} | {"results_dir": str(tmp_path)})
    assert [(c.optimizer, c.seed) for c in configs] == [("adamw", 0), ("lion", 0)]
    result = CliRunner().invoke(app, ["compare", *CLI_TINY, "--optimizers", "adamw,adamw", "--seeds", "0",
                                      "--results-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert len(load_records(tmp_path).records) == 1


def test_run_resume_of_a_finished_run_reuses_its_record(tmp_path: Path):
    argv = ["run", "-o", "adamw", *CLI_TINY, "--results-dir", str(tmp_path)]
    first = CliRunner().invoke(app, argv)
    assert first.exit_code == 0, first.output
    again = CliRunner().invoke(app, [*argv, "--resume"])
    assert again.exit_code == 0, again.output
    assert "reusing" in again.output and "nothing trained" in again.output
    assert len(load_records(tmp_path).records) == 1


def test_two_compares_on_one_results_directory_train_each_run_once(tmp_path: Path):
    argv = [sys.executable, "-m", "optbench.cli", "compare", *CLI_TINY, "--optimizers", "adamw,lion,schedulefree",
            "--seeds", "0", "--results-dir", str(tmp_path)]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    on_disk = load_records(tmp_path).records
    assert sorted(r["optimizer"] for r in on_disk) == ["adamw", "lion", "schedulefree"], outputs


def test_a_record_whose_config_was_edited_after_the_run_is_named_and_the_run_trained(tmp_path: Path):
    """A hand edit keeps the config_hash but changes the config: run --resume and compare name the file in
    one line (saying what to do) and train the run, instead of reusing the edited record as its result."""
    argv = ["run", "-o", "adamw", *CLI_TINY, "--results-dir", str(tmp_path)]
    first = CliRunner().invoke(app, argv)
    assert first.exit_code == 0, first.output
    (path,) = tmp_path.glob("*.json")
    edited = json.loads(path.read_text())
    edited["config"]["hparams"]["lr"] *= 10  # "I ran it at 10x the lr" -- it was not
    path.write_text(json.dumps(edited))
    again = CliRunner().invoke(app, [*argv, "--resume"])
    assert again.exit_code == 0, again.output
    said = [line for line in again.output.splitlines() if path.name in line]
    assert len(said) == 1 and "is not the one its config_hash" in said[0] and "put its config back" in said[0], \
        again.output
    assert "nothing trained" not in again.output
    on_disk = load_records(tmp_path).records
    assert len(on_disk) == 2 and {r["config_hash"] for r in on_disk} == {edited["config_hash"]}
    trained = next(r for r in on_disk if r["_path"] != str(path))
    assert trained["status"] == "ok" and trained["resumed"] is False  # trained anew, not taken from the edit
    # compare: the untouched record is reused; the edited one is named once, and nothing is trained
    out = CliRunner().invoke(app, ["compare", *CLI_TINY, "--optimizers", "adamw", "--seeds", "0",
                                   "--results-dir", str(tmp_path)])
    assert out.exit_code == 0, out.output
    assert out.output.count(path.name) == 1 and "reusing" in out.output, out.output
    assert len(load_records(tmp_path).records) == 2
    # with the untouched record gone, compare trains the run, and names the edited file once still
    Path(trained["_path"]).unlink()
    out = CliRunner().invoke(app, ["compare", *CLI_TINY, "--optimizers", "adamw", "--seeds", "0",
                                   "--results-dir", str(tmp_path)])
    assert out.exit_code == 0, out.output
    assert out.output.count(path.name) == 1, out.output
    assert len(load_records(tmp_path).records) == 2


def test_a_tune_trial_names_an_edited_record_of_its_run_once_with_a_tracker_too(tmp_path: Path, capsys):
    """A trial's run (tune._run_trial_run) whose record was edited by hand names the file once and trains,
    with --track as without (the tracker's reporter must not name it a second time under the lock)."""
    from optbench.tune import _run_trial_run

    for track in ((), ("tensorboard",)):
        results = tmp_path / f"track-{len(track)}"
        config = tiny("adamw", results)
        first, path = run_experiment(config)
        edited = json.loads(path.read_text())
        edited["config"]["hparams"]["lr"] *= 10  # by hand, after the run
        path.write_text(json.dumps(edited))
        capsys.readouterr()
        said: list[str] = []
        record, _ = _run_trial_run(config, None, said.append, track, str(tmp_path / "tb") if track else None)
        printed = capsys.readouterr()  # warnings go to stderr (console.py)
        shown = said + printed.out.splitlines() + printed.err.splitlines()
        assert record["status"] == "ok" and record["resumed"] is False
        assert len(load_records(results).records) == 2  # trained anew, the edited record not reused
        assert sum(path.name in line for line in shown) == 1, (track, shown)
