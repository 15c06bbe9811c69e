"""A checkpoint carries what it claims and is checked before any state is loaded: a tampered or
inconsistent one is refused in one line (no traceback, no resume into a wrong result)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from optbench.checkpoints import CheckpointError, checkpoint_path, load_checkpoint, save_checkpoint
from optbench.cli import app
from optbench.data import load_dataset
from optbench.experiment import resolve_runtime, run_experiment
from optbench.models import build_model
from optbench.records import load_records

from conftest import tiny_config
from test_stop_resume import StopAtStep

SETTINGS = dict(log_every=1, memory_probe=False)


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> dict[str, Path]:
    """AdamW and Lion runs stopped by SIGTERM at step 5 (mid-epoch): each folder holds a real checkpoint."""
    out = {}
    for name in ("adamw", "lion"):
        results = tmp_path_factory.mktemp(f"stopped-{name}")
        record, _ = run_experiment(tiny_config(name, results, **SETTINGS), StopAtStep(5))
        assert record["status"] == "interrupted"
        out[name] = results
    return out


def copy_of(stopped_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "results"
    shutil.copytree(stopped_dir, target)
    for record in target.glob("*.json"):  # only the checkpoint matters here
        record.unlink()
    return target


def rewrite(results: Path, config_hash: str, change) -> Path:
    """Load the checkpoint's payload, change it, and save it again with a correct digest (what a
    hand edit by someone who knows the format gives)."""
    path = checkpoint_path(results, config_hash)
    payload = load_checkpoint(path, config_hash)
    change(payload)
    save_checkpoint(path, payload)
    return path


def adamw_state(stopped) -> dict:
    config = resolve_runtime(tiny_config("adamw", stopped["adamw"], **SETTINGS))
    return load_checkpoint(checkpoint_path(stopped["adamw"], config.config_hash), config.config_hash)


CASES = {
    "a missing part": ("adamw", lambda p, s: p.pop("rng"), "lacks rng"),
    "an extra progress field": ("adamw", lambda p, s: p["progress"].update(extra=1), "other fields"),
    "99 epochs done": ("adamw", lambda p, s: p["progress"].update(epochs_done=99), "outside the planned"),
    "steps that do not add up": ("adamw", lambda p, s: p["progress"].update(steps=40), "not the 5 its epochs make"),
    "a model of another depth": ("adamw", lambda p, s: p.update(model=build_model(
        "vit_tiny_patch16_224", load_dataset("synthetic", subset=200, test_subset=60).spec, 0, None, 2).state_dict()),
        "model of another shape"),
    "AdamW's state under Lion's hash": ("lion", lambda p, s: p.update(optimizer=adamw_state(s)["optimizer"]),
                                        "where this run's lion has"),
    "another optimizer's name": ("lion", lambda p, s: p.update(optimizer_name="adamw"), "holds a 'adamw' run"),
    "a plan of other length": ("adamw", lambda p, s: p.update(total_steps=999), "planned as 999 steps"),
    "negative wall time": ("adamw", lambda p, s: p.update(wall_time_s=-1.0), "wall time"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_an_inconsistent_checkpoint_is_refused_before_anything_is_loaded(stopped, tmp_path, case):
    optimizer, change, message = CASES[case]
    results = copy_of(stopped[optimizer], tmp_path)
    config = resolve_runtime(tiny_config(optimizer, results, **SETTINGS))
    path = rewrite(results, config.config_hash, lambda p: change(p, stopped))
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match=message) as refused:
        run_experiment(config, resume=True)
    assert "\n" not in str(refused.value) and "delete it" in str(refused.value)
    assert path.read_bytes() == before  # named and left as it was
    assert not list(results.glob("*.json"))  # no record: nothing was trained from it


def test_a_payload_changed_without_its_digest_is_refused(stopped, tmp_path):
    results = copy_of(stopped["adamw"], tmp_path)
    config = resolve_runtime(tiny_config("adamw", results, **SETTINGS))
    path = checkpoint_path(results, config.config_hash)
    document = bytearray(path.read_bytes())
    document[len(document) // 2] ^= 0xFF  # one flipped byte inside the tensors
    path.write_bytes(bytes(document))
    with pytest.raises(CheckpointError, match="does not match its SHA-256"):
        run_experiment(config, resume=True)


def test_the_cli_names_a_bad_checkpoint_in_one_line(stopped, tmp_path):
    results = copy_of(stopped["adamw"], tmp_path)
    config = resolve_runtime(tiny_config("adamw", results, **SETTINGS))
    argv = ["run", "-o", "adamw", "--preset", "smoke", "--dataset", "synthetic", "--depth", "1", "--epochs", "2",
            "--batch-size", "16", "--subset", "200", "--test-subset", "60", "--device", "cpu", "--quiet",
            "--results-dir", str(results)]
    cli_hash = json.loads(CliRunner().invoke(app, [*argv, "--dry-run"]).output)["config_hash"]  # memory probe on
    payload = load_checkpoint(checkpoint_path(results, config.config_hash), config.config_hash)
    payload["config_hash"] = cli_hash
    payload["progress"]["epochs_done"] = 99
    save_checkpoint(checkpoint_path(results, cli_hash), payload)
    result = CliRunner().invoke(app, [*argv, "--resume"])
    assert result.exit_code == 1, result.output
    assert "outside the planned" in result.output and "Traceback" not in result.output
    assert not load_records(results).records


def test_an_untouched_checkpoint_still_resumes(stopped, tmp_path):
    results = copy_of(stopped["lion"], tmp_path)
    record, _ = run_experiment(tiny_config("lion", results, **SETTINGS), resume=True)
    assert record["status"] == "ok" and record["resumed"] is True


def as_version_2(path: Path) -> bytes:
    """The checkpoint rewritten as version 2 wrote it: the same payload, a header without the progress."""
    line, _, blob = path.read_bytes().partition(b"\n")
    assert line.split(b" ")[:2] == [b"optbench-checkpoint", b"3"]
    return b"optbench-checkpoint 2 " + line.split(b" ")[2] + b"\n" + blob


def test_a_version_2_checkpoint_resumes_to_the_same_weights(stopped, tmp_path):
    records = []
    for name, change in (("v3", None), ("v2", as_version_2)):
        results = copy_of(stopped["lion"], tmp_path / name)
        config = resolve_runtime(tiny_config("lion", results, **SETTINGS))
        path = checkpoint_path(results, config.config_hash)
        if change is not None:
            path.write_bytes(change(path))
            assert path.read_bytes().startswith(b"optbench-checkpoint 2 ")
        record, _ = run_experiment(config, resume=True)
        assert record["status"] == "ok" and record["resumed"] is True
        records.append(record)
    assert records[0]["final_weights_sha256"] == records[1]["final_weights_sha256"]


def test_a_header_that_disagrees_with_its_payload_is_refused(stopped, tmp_path):
    results = copy_of(stopped["adamw"], tmp_path)
    config = resolve_runtime(tiny_config("adamw", results, **SETTINGS))
    path = checkpoint_path(results, config.config_hash)
    document = path.read_bytes()
    assert b" epoch=0/2 step=5/26\n" in document.split(b"\n", 1)[0] + b"\n"  # stopped at step 5 of 13 x 2
    path.write_bytes(document.replace(b" epoch=0/2 step=5/26\n", b" epoch=1/2 step=18/26\n", 1))
    with pytest.raises(CheckpointError, match="says epoch 1 of 2, step 18 of 26 in its header"):
        run_experiment(config, resume=True)
    # the plan's length too: `optbench status` prints it from this line ("epoch 0 of 9 done, step 5 of 99")
    path.write_bytes(document.replace(b" epoch=0/2 step=5/26\n", b" epoch=0/9 step=5/99\n", 1))
    with pytest.raises(CheckpointError, match="says epoch 0 of 9, step 5 of 99 in its header"):
        run_experiment(config, resume=True)


def test_status_says_how_far_a_stopped_run_got_from_the_header_alone(stopped, tmp_path, monkeypatch):
    from optbench import status as status_module

    results = tmp_path / "results"
    shutil.copytree(stopped["adamw"], results)  # with its `interrupted` record, which makes the run known
    config = resolve_runtime(tiny_config("adamw", results, **SETTINGS))
    path = checkpoint_path(results, config.config_hash)
    consumed = []
    real_open = open

    class Counted:  # the bytes `status` takes from the checkpoint file
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def read(self, *args):
            data = self.handle.read(*args)
            consumed.append(len(data))
            return data

        def readline(self, *args):
            line = self.handle.readline(*args)
            consumed.append(len(line))
            return line

        def __getattr__(self, name):
            return getattr(self.handle, name)

    def spying_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        return Counted(handle) if Path(file) == path else handle

    monkeypatch.setattr("builtins.open", spying_open)
    runs, _ = status_module.grid_status(results)
    monkeypatch.undo()
    (run,) = runs
    assert run.state == "stopped" and run.config_hash == config.config_hash
    assert run.detail.startswith("epoch 0 of 2 done, step 5 of 26; checkpoint saved"), run.detail
    assert consumed and 0 < sum(consumed) < 200 < path.stat().st_size  # its first line, not the payload
    # Its worker killed outright (a lock whose process is gone): the next worker resumes it from there.
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = path.with_suffix(".lock")
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": int(gone.stdout), "token": "t"}))
    (run,), _ = status_module.grid_status(results)
    assert run.state == "stale" and run.detail.endswith(
        "the next worker resumes it from its checkpoint (epoch 0 of 2 done, step 5 of 26)"), run.detail
    lock.unlink()
    path.write_bytes(as_version_2(path))  # an older checkpoint: no progress in its header, the age as before
    (run,), _ = status_module.grid_status(results)
    assert run.state == "stopped" and run.detail.startswith("checkpoint saved"), run.detail
