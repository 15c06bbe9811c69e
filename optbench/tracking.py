"""Live tracking (`--track tensorboard|mlflow|wandb`): trackers are reporters, never a source of results.

A tracker hears the same events as the console reporter (`FanOutReporter` passes each event to all of
them): `run_start(config)`, `epoch_start`, `log_point(step, values)` at the loop's existing log points
(loss, lr, throughput and the optimizer diagnostics, already read from the device), `epoch_end(row)`,
and `run_end(record, path)` with the record written. Nothing in analysis reads a tracker: the run record
stays the one contract.

Each tracker library is an optional extra (`pip install optbench[tensorboard]`, `[mlflow]`, `[wandb]`),
imported only when asked for; a missing one is a one-line `TrackerError` naming the extra, raised
before any training. A tracker that fails later (network down, disk full) warns once and is dropped;
the run goes on and its record is written as usual.

Where things go (RESULTS is the run's results directory):
- TensorBoard: `RESULTS/tb/EXPERIMENT/OPTIMIZER-seedN/` (event files, read by `tensorboard --logdir`).
- MLflow: `--track-uri` when given, else `sqlite:///RESULTS/mlflow.db` (MLflow 3 refuses the old
  `./mlruns` folder store unless MLFLOW_ALLOW_FILE_STORE is set) with artifacts in `RESULTS/mlartifacts`.
- W&B: offline by default (no account needed; `WANDB_MODE=online` in the environment uploads), files
  under `RESULTS/wandb/`; `wandb sync RESULTS/wandb/offline-run-*` uploads an offline run later.
Runs of one workload share one experiment (MLflow experiment, W&B project and group, TensorBoard
folder) named `optbench-DATASET-PRESET`, and each run is named `OPTIMIZER-seedN`.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
import json
import math
import os
import resource
import shutil
from pathlib import Path
from typing import Any, Callable

from optbench.errors import OptbenchError

TRACKERS = ("tensorboard", "mlflow", "wandb")
# The module each tracker needs, and the extra that installs it.
_NEEDS = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb")}


class TrackerError(OptbenchError):
    """A tracker that was asked for cannot be used (unknown name, library not installed)."""


def experiment_name(config: Any) -> str:
    return f"optbench-{config.dataset}-{config.preset}"


def run_name(config: Any) -> str:
    """`OPTIMIZER-seedN`; a tuning trial (scored on a validation split) adds its config hash, since the
    trials of one optimizer share a seed."""
    trial = f"-trial-{config.config_hash}" if getattr(config, "validation_fraction", 0) else ""
    return f"{config.optimizer}-seed{config.seed}{trial}"


def check_trackers(names: list[str], uri: str | None = None) -> list[str]:
    """Validate `--track` values and import their libraries now, so a missing extra fails before training."""
    out = []
    for name in names:
        key = name.strip().lower()
        if key not in TRACKERS:
            raise TrackerError(f"unknown tracker '{name}': choose one of {', '.join(TRACKERS)} (--track is repeatable)")
        module, extra = _NEEDS[key]
        try:
            importlib.import_module(module)
        except ImportError:
            raise TrackerError(f"--track {key} needs the {module} package: pip install 'optbench[{extra}]'") from None
        if key not in out:
            out.append(key)
    if uri is not None and "mlflow" not in out:
        raise TrackerError("--track-uri is the MLflow tracking URI: use it with --track mlflow")
    return out


def _flat(prefix: str, value: Any, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value
    return out


def _numbers(values: dict[str, Any]) -> dict[str, float]:
    """The finite numbers among `values` (trackers reject NaN or text as a metric)."""
    return {k: float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


SUMMARY_FIELDS = ("final_test_acc", "final_test_loss", "final_train_loss", "train_wall_time_s", "eval_wall_time_s",
                  "total_wall_time_s", "throughput_images_per_s", "achieved_tflops", "steps", "epochs_completed",
                  "peak_memory_bytes", "optimizer_state_bytes", "param_count", "hessian_updates")


def record_summary(record: dict[str, Any]) -> dict[str, Any]:
    """What a tracker shows as the run's summary: the record's headline numbers and its status."""
    out = {k: record.get(k) for k in SUMMARY_FIELDS if record.get(k) is not None}
    out["status"] = record.get("status")
    return out


def _memory_now(device: str) -> dict[str, float]:
    """Memory at an epoch's end without a device sync: the CUDA allocator's peak, or this process's peak RSS."""
    if device == "cuda":
        import torch

        return {"memory/cuda_max_allocated_bytes": float(torch.cuda.max_memory_allocated())}
    return {"memory/process_peak_rss_bytes": float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)}


class _Tracker(ABC):
    """One tracking backend for one run. Subclasses implement `open`, `metrics`, `finish`."""

    name = ""

    def __init__(self, results_dir: str, uri: str | None):
        self.results_dir, self.uri = Path(results_dir), uri
        self.device = "cpu"
        self._steps_per_epoch, self._epoch, self._last_train_time = 0, 1, 0.0

    # events -------------------------------------------------------------------------------------
    def run_start(self, config: Any) -> None:
        self.device = config.device
        self.open(config, _flat("", {"config_hash": config.config_hash, **config.to_dict()}, {}))

    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None:
        self._epoch, self._steps_per_epoch = epoch, steps

    def log_point(self, step: int, values: dict[str, Any]) -> None:
        self.metrics({f"train/{k}": v for k, v in _numbers(values).items()}, step)

    def epoch_end(self, row: dict[str, Any]) -> None:
        values = {f"epoch/{k}": v for k, v in _numbers(_flat("", row, {})).items() if k not in ("steps",)}
        values["epoch/epoch_time_s"] = row["train_time_s"] - self._last_train_time
        self._last_train_time = row["train_time_s"]
        values.update(_memory_now(self.device))
        self.metrics(values, int(row["steps"]))

    def run_end(self, record: dict[str, Any], path: Path | None) -> None:
        self.finish(record_summary(record), record, path)

    # backend --------------------------------------------------------------------------------------
    @abstractmethod
    def open(self, config: Any, params: dict[str, Any]) -> None:
        """Start the tracker's run with the resolved config as its hyperparameters."""

    @abstractmethod
    def metrics(self, values: dict[str, float], step: int) -> None:
        """Log numbers at a training step."""

    @abstractmethod
    def finish(self, summary: dict[str, Any], record: dict[str, Any], path: Path | None) -> None:
        """Log the record's summary and the record file itself."""

    def close(self) -> None:
        """Release files and processes; called once, also after a failure."""


class TensorBoardTracker(_Tracker):
    name = "tensorboard"

    def open(self, config, params):
        from torch.utils.tensorboard import SummaryWriter

        self.logdir = self.results_dir / "tb" / experiment_name(config) / run_name(config)
        self.writer = SummaryWriter(log_dir=str(self.logdir))
        self.params = params
        self.writer.add_text("config", "```\n" + json.dumps(params, indent=2, default=str) + "\n```")

    def metrics(self, values, step):
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def finish(self, summary, record, path):
        hparams = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in self.params.items()}
        # run_name="." keeps the hyperparameters in this run's own folder (not a new sub-run).
        self.writer.add_hparams(hparams, {f"summary/{k}": v for k, v in _numbers(summary).items()}, run_name=".")
        self.writer.add_text("summary", "```\n" + json.dumps(summary, indent=2, default=str) + "\n```")
        if path is not None:  # TensorBoard has no artifact store: the record is copied beside the events
            shutil.copy2(path, self.logdir / Path(path).name)
        self.writer.flush()

    def close(self):
        if getattr(self, "writer", None) is not None:
            self.writer.close()


class MLflowTracker(_Tracker):
    """MLflow through its client API (no global active run, so runs in one process never mix)."""

    name = "mlflow"

    def open(self, config, params):
        import logging

        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        for name in ("mlflow", "alembic"):  # the store's set-up chatter ("Creating initial ... tables")
            logging.getLogger(name).setLevel(logging.WARNING)

        uri = self.uri or f"sqlite:///{(self.results_dir / 'mlflow.db').resolve()}"
        self.client = MlflowClient(tracking_uri=uri)
        name = experiment_name(config)
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            artifacts = None if self.uri else (self.results_dir / "mlartifacts").resolve().as_uri()
            experiment_id = self.client.create_experiment(name, artifact_location=artifacts)
        else:
            experiment_id = experiment.experiment_id
        self.run_id = self.client.create_run(experiment_id, run_name=run_name(config),
                                             tags={"optbench.optimizer": config.optimizer,
                                                   "optbench.seed": str(config.seed),
                                                   "optbench.config_hash": config.config_hash}).info.run_id
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[start:start + 100])

    def metrics(self, values, step):
        from mlflow.entities import Metric

        import time
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def finish(self, summary, record, path):
        from mlflow.entities import Metric, RunTag

        import time
        now = int(time.time() * 1000)
        step = int(record.get("steps") or 0)
        self.client.log_batch(self.run_id, metrics=[Metric(f"summary/{k}", v, now, step)
                                                    for k, v in _numbers(summary).items()],
                              tags=[RunTag("optbench.status", str(record.get("status")))])
        if path is not None:
            self.client.log_artifact(self.run_id, str(path), artifact_path="record")
        self.client.set_terminated(self.run_id, "FINISHED" if record.get("status") == "ok" else "FAILED")
        self.run_id = None

    def close(self):
        if getattr(self, "run_id", None) is not None:  # ended early: mark the run, ignore a second failure
            try:
                self.client.set_terminated(self.run_id, "KILLED")
            except Exception:  # noqa: BLE001 - the tracker is already being dropped
                pass


class WandbTracker(_Tracker):
    name = "wandb"

    def open(self, config, params):
        import wandb

        directory = self.results_dir / "wandb"
        directory.mkdir(parents=True, exist_ok=True)
        name = experiment_name(config)
        self.run = wandb.init(project=name, group=name, name=run_name(config), job_type="train",
                              dir=str(directory), mode=os.environ.get("WANDB_MODE", "offline"),
                              config=params, reinit="create_new",
                              settings=wandb.Settings(silent=True, console="off"))

    def metrics(self, values, step):
        self.run.log(values, step=step)

    def finish(self, summary, record, path):
        self.run.summary.update({f"summary/{k}": v for k, v in summary.items()})
        if path is not None:  # a copy inside the run's folder: W&B keeps (and later uploads) that folder
            copy = Path(self.run.dir) / Path(path).name
            shutil.copy2(path, copy)
            self.run.save(str(copy), base_path=self.run.dir, policy="now")
        self.run.finish(exit_code=0 if record.get("status") == "ok" else 1)
        self.run = None

    def close(self):
        if getattr(self, "run", None) is not None:
            try:
                self.run.finish(exit_code=1)
            except Exception:  # noqa: BLE001 - the tracker is already being dropped
                pass


_CLASSES = {"tensorboard": TensorBoardTracker, "mlflow": MLflowTracker, "wandb": WandbTracker}


def make_trackers(names: list[str], results_dir: str, uri: str | None = None) -> list[_Tracker]:
    return [_CLASSES[name](results_dir, uri) for name in names]


class FanOutReporter:
    """Passes every event to the console reporter and to each tracker.

    A tracker that raises (network down, disk full, a library bug) is reported once through the
    console's `warn` and dropped for the rest of the run: tracking never stops training, and the
    console reporter itself is never dropped.
    """

    def __init__(self, console: Any, trackers: list[_Tracker]):
        self.console, self.trackers = console, list(trackers)

    def __enter__(self) -> "FanOutReporter":
        self.console.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for tracker in self.trackers:
            self._drop_quietly(tracker)
        self.trackers = []
        self.console.__exit__(*exc)

    def _drop_quietly(self, tracker: _Tracker) -> None:
        try:
            tracker.close()
        except Exception:  # noqa: BLE001 - closing a broken tracker must not end the run
            pass

    def _each(self, event: str, call: Callable[[_Tracker], None]) -> None:
        for tracker in list(self.trackers):
            try:
                call(tracker)
            except Exception as exc:  # noqa: BLE001 - any tracker failure: warn once, drop it, keep training
                self.trackers.remove(tracker)
                self.console.warn(f"tracker {tracker.name} failed at {event} ({exc.__class__.__name__}: "
                                  f"{(str(exc).splitlines() or [''])[0][:200]}); it is off for the rest of this "
                                  "run, which goes on (the run record is written as usual)")
                self._drop_quietly(tracker)

    # console-only events
    def phase(self, text: str) -> None:
        self.console.phase(text)

    def warn(self, text: str) -> None:
        self.console.warn(text)

    def progress(self, steps_done_in_epoch: int, loss: float, images_per_s: float) -> None:
        self.console.progress(steps_done_in_epoch, loss, images_per_s)

    # events the trackers hear too
    def run_start(self, config: Any) -> None:
        self._each("start", lambda t: t.run_start(config))

    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None:
        self.console.epoch_start(epoch, epochs, steps)
        self._each("epoch start", lambda t: t.epoch_start(epoch, epochs, steps))

    def log_point(self, step: int, values: dict[str, Any]) -> None:
        self.console.log_point(step, values)
        self._each("a log point", lambda t: t.log_point(step, values))

    def epoch_end(self, row: dict[str, Any]) -> None:
        self.console.epoch_end(row)
        self._each("epoch end", lambda t: t.epoch_end(row))

    def run_end(self, record: dict[str, Any], path: Any) -> None:
        self._each("the end", lambda t: t.run_end(record, path))


def reporter_factory(console_factory: Callable[[Any], Any], names: list[str], uri: str | None) -> Callable[[Any], Any]:
    """`config -> reporter`: the console reporter alone, or fanned out to fresh trackers for that run."""
    if not names:
        return console_factory
    return lambda config: FanOutReporter(console_factory(config), make_trackers(names, config.results_dir, uri))
