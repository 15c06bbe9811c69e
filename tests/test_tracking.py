"""`--track`: what each tracker logged is read back with that tool's own reader (TensorBoard's event
accumulator, `mlflow.search_runs` on the local store, the records of W&B's offline `.wandb` file decoded
with wandb's own protobuf messages) and checked against the run record; a tracker failing mid-run warns
once and the run goes on; a missing extra is a one-line error before any training.
"""

from __future__ import annotations

import errno
import json
import socket
import struct
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from optbench.cli import app

runner = CliRunner()

ARGS = ["--preset", "smoke", "--dataset", "synthetic", "--depth", "1", "--epochs", "2", "--batch-size", "16",
        "--subset", "200", "--test-subset", "60", "--device", "cpu"]


def one_record(results: Path) -> dict:
    paths = sorted(results.glob("*.json"))
    assert len(paths) == 1, paths
    return json.loads(paths[0].read_text()) | {"_path": str(paths[0])}


def wandb_records(run_dir: Path):
    """Decode an offline run's `.wandb` file: W&B's header (':W&B', magic, version: 7 bytes), then
    LevelDB-log framed records (32 KiB blocks; 7-byte header: crc, length, type) each holding one
    `wandb_internal_pb2.Record`. wandb 0.31 ships no Python reader for it, only these messages."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = next(run_dir.glob("*.wandb")).read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending += chunk
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    results = tmp_path_factory.mktemp("tracked")
    out = runner.invoke(app, ["run", "-o", "sophia", *ARGS, "--results-dir", str(results), "--quiet",
                              "--track", "tensorboard", "--track", "mlflow", "--track", "wandb"])
    assert out.exit_code == 0, out.output
    return results, one_record(results), out.output


def test_tensorboard_events_hold_what_the_record_says(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    results, record, _ = tracked_run
    logdir = results / "tb" / "optbench-synthetic-smoke" / "sophia-seed0"
    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    accs = events.Scalars("epoch/test_acc")
    assert [a.step for a in accs] == [13, 26]
    assert accs[-1].value == pytest.approx(record["final_test_acc"], abs=1e-6)  # float32 in the event file
    assert [a.value for a in accs] == pytest.approx([row["test_acc"] for row in record["history"]], abs=1e-6)
    for tag in ("train/loss", "train/lr", "train/images_per_s", "train/grad_norm", "train/update_rms",
                "train/sophia_win_rate", "epoch/epoch_time_s", "memory/process_peak_rss_bytes",
                "epoch/diagnostics.sophia_clipped_fraction"):
        assert tag in tags, (tag, sorted(tags))
    # log points: steps 10 and 13 (epoch end) in epoch 1, 23 and 26 in epoch 2
    assert [s.step for s in events.Scalars("train/loss")] == [10, 13, 23, 26]
    epoch_times = [s.value for s in events.Scalars("epoch/epoch_time_s")]
    assert sum(epoch_times) == pytest.approx(record["history"][-1]["train_time_s"], rel=1e-5)
    assert (logdir / Path(record["_path"]).name).read_text() == Path(record["_path"]).read_text()
    texts = events.Tags()["tensors"]
    assert any("summary" in t for t in texts) and any("config" in t for t in texts)


def test_mlflow_search_runs_finds_the_run_with_the_records_numbers(tracked_run):
    import mlflow
    from mlflow.tracking import MlflowClient

    results, record, _ = tracked_run
    uri = f"sqlite:///{results / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["optbench-synthetic-smoke"])
    assert len(runs) == 1
    run = runs.iloc[0]
    assert run["tags.mlflow.runName"] == "sophia-seed0"
    assert run["status"] == "FINISHED"
    assert run["metrics.epoch/test_acc"] == pytest.approx(record["final_test_acc"], abs=1e-12)
    assert run["metrics.summary/final_test_acc"] == pytest.approx(record["final_test_acc"], abs=1e-12)
    assert float(run["params.hparams.lr"]) == record["config"]["hparams"]["lr"]
    assert run["params.config_hash"] == record["config_hash"]
    client = MlflowClient(uri)
    history = client.get_metric_history(run["run_id"], "train/sophia_win_rate")
    assert [m.step for m in history] == [10, 13, 23, 26]
    artifacts = client.list_artifacts(run["run_id"], "record")
    assert [Path(a.path).name for a in artifacts] == [Path(record["_path"]).name]
    assert (results / "mlartifacts").is_dir()  # artifacts stay in the results dir, not ./mlruns


def test_wandb_offline_run_files_hold_what_the_record_says(tracked_run):
    results, record, _ = tracked_run
    run_dirs = list((results / "wandb" / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1
    decoded = wandb_records(run_dirs[0])
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
               for r in decoded if r.WhichOneof("record_type") == "history"]
    accs = [h["epoch/test_acc"] for h in history if "epoch/test_acc" in h]
    assert accs == pytest.approx([row["test_acc"] for row in record["history"]], abs=1e-12)
    assert accs[-1] == pytest.approx(record["final_test_acc"], abs=1e-12)
    assert [h["_step"] for h in history if "train/loss" in h] == [10, 13, 23, 26]
    summary = {}
    for r in decoded:
        if r.WhichOneof("record_type") == "summary":
            summary.update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in r.summary.update})
    assert summary["summary/final_test_acc"] == pytest.approx(record["final_test_acc"], abs=1e-12)
    runs = [r.run for r in decoded if r.WhichOneof("record_type") == "run"]
    assert runs[0].display_name == "sophia-seed0" and runs[0].run_group == "optbench-synthetic-smoke"
    assert runs[0].project == "optbench-synthetic-smoke"
    config = {item.key: json.loads(item.value_json) for item in runs[0].config.update}
    assert config["config_hash"] == record["config_hash"]
    saved = run_dirs[0] / "files" / Path(record["_path"]).name
    assert saved.read_text() == Path(record["_path"]).read_text()


def test_the_sophia_advice_is_given_once(tracked_run):
    _, record, output = tracked_run
    wins = [row["diagnostics"]["sophia_win_rate"] for row in record["history"]]
    if all(0.1 <= w <= 0.5 for w in wins):
        pytest.skip("win rate stayed healthy on this run")
    assert output.count("win rate") == 1, output


def test_compare_groups_runs_in_one_experiment(tmp_path):
    import mlflow

    results = tmp_path / "results"
    out = runner.invoke(app, ["compare", *ARGS, "--epochs", "1", "--optimizers", "adamw,lion", "--seeds", "0",
                              "--results-dir", str(results), "--quiet", "--track", "mlflow"])
    assert out.exit_code == 0, out.output
    mlflow.set_tracking_uri(f"sqlite:///{results / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["optbench-synthetic-smoke"])
    assert sorted(runs["tags.mlflow.runName"]) == ["adamw-seed0", "lion-seed0"]
    records = {json.loads(p.read_text())["optimizer"]: json.loads(p.read_text()) for p in results.glob("*.json")}
    for _, run in runs.iterrows():
        record = records[run["tags.mlflow.runName"].split("-")[0]]
        assert run["metrics.summary/final_test_acc"] == pytest.approx(record["final_test_acc"], abs=1e-12)


# --- failures ---------------------------------------------------------------------------------------


def test_missing_extra_is_a_one_line_error_before_training(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what Python does when the package is not installed
    results = tmp_path / "results"
    out = runner.invoke(app, ["run", "-o", "adamw", *ARGS, "--results-dir", str(results), "--track", "wandb"])
    assert out.exit_code == 1, out.output
    errors = [line for line in out.output.splitlines() if line.startswith("error:")]
    assert errors == ["error: --track wandb needs the wandb package: pip install 'optbench[wandb]'"], out.output
    assert "Traceback" not in out.output
    assert not list(results.glob("*.json")) if results.exists() else True


@pytest.mark.parametrize("args, message", [
    (["--track", "neptune"], "unknown tracker 'neptune': choose one of tensorboard, mlflow, wandb"),
    (["--track-uri", "http://x"], "--track-uri is the MLflow tracking URI: use it with --track mlflow"),
])
def test_bad_tracker_options(tmp_path, args, message):
    out = runner.invoke(app, ["compare", *ARGS, "--results-dir", str(tmp_path), *args])
    assert out.exit_code == 1
    errors = [line for line in out.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {message}"), out.output
    assert not list(tmp_path.glob("*.json"))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


def test_unreachable_mlflow_server_warns_once_and_the_run_goes_on(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    results = tmp_path / "results"
    out = runner.invoke(app, ["run", "-o", "adamw", *ARGS, "--epochs", "1", "--results-dir", str(results), "--quiet",
                              "--track", "mlflow", "--track-uri", f"http://127.0.0.1:{_closed_port()}"])
    assert out.exit_code == 0, out.output
    assert out.output.count("tracker mlflow failed") == 1, out.output
    assert one_record(results)["status"] == "ok"


def test_disk_full_mid_run_warns_once_and_the_record_is_unchanged(tmp_path, monkeypatch):
    """TensorBoard's writer fails with ENOSPC from the first epoch's end on: one warning, the run
    finishes, and its record equals (weights, accuracy) that of the same run without tracking."""
    from torch.utils.tensorboard import SummaryWriter

    real = SummaryWriter.add_scalar

    def add_scalar(self, tag, *args, **kwargs):
        if tag.startswith("epoch/"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, tag, *args, **kwargs)

    monkeypatch.setattr(SummaryWriter, "add_scalar", add_scalar)
    tracked, plain = tmp_path / "tracked", tmp_path / "plain"
    out = runner.invoke(app, ["run", "-o", "adamw", *ARGS, "--results-dir", str(tracked), "--quiet",
                              "--track", "tensorboard"])
    assert out.exit_code == 0, out.output
    assert out.output.count("tracker tensorboard failed") == 1, out.output
    assert "No space left on device" in out.output
    assert runner.invoke(app, ["run", "-o", "adamw", *ARGS, "--results-dir", str(plain), "--quiet"]).exit_code == 0
    a, b = one_record(tracked), one_record(plain)
    assert a["status"] == "ok" and a["epochs_completed"] == 2
    assert a["final_weights_sha256"] == b["final_weights_sha256"]
    assert a["final_test_acc"] == b["final_test_acc"]


def test_tune_tracks_its_trials_and_final_runs(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    results = tmp_path / "results"
    out = runner.invoke(app, ["tune", *ARGS, "--epochs", "1", "--optimizers", "adamw", "--trials", "2",
                              "--final-seeds", "1", "--results-dir", str(results), "--quiet", "--track", "tensorboard"])
    assert out.exit_code == 0, out.output
    trials = sorted((results / "tune" / "trials" / "tb" / "optbench-synthetic-smoke").iterdir())
    assert len(trials) == 2 and all(t.name.startswith("adamw-seed1000-trial-") for t in trials), trials
    finals = list(results.glob("**/tb/optbench-synthetic-smoke/adamw-seed0"))
    assert finals, list(results.rglob("tb"))
    for logdir in [*trials, *finals]:
        events = EventAccumulator(str(logdir))
        events.Reload()
        assert "epoch/test_acc" in events.Tags()["scalars"], logdir
