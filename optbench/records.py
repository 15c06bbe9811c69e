"""Run records: the one contract between training and analysis.

One JSON file per run. Written to a temporary file in the same directory and then hard-linked to its
final name, which fails rather than replaces if that name exists: a record is never overwritten. Loading
never raises for one bad file: unreadable records are reported by name and skipped. The name holds the
run's config hash (`record_filename`), and the looks that decide whether a run is done read the files
named for that run only (`records_of_runs`), not the whole folder, once per run.
"""

from __future__ import annotations

import errno
import json
import math
import os
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from optbench.errors import RecordError
from optbench.tempfiles import temp_name

SCHEMA_VERSION = 1
REQUIRED_FIELDS = ("optimizer", "status", "config", "config_hash")
STATUSES = ("ok", "diverged", "interrupted", "oom", "failed")


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def record_filename(record: dict[str, Any]) -> str:
    cfg = record["config"]
    stamp = record.get("started_at", utc_now()).replace(":", "").replace("-", "")
    return f"{cfg['dataset']}-{record['optimizer']}-seed{cfg['seed']}-{record['config_hash']}-{stamp}.json"


def _what_to_do(exc: OSError) -> str:
    """The advice that fits the file system's reason."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free disk space or choose another --results-dir"
    if exc.errno == errno.ENAMETOOLONG:
        return "choose a shorter --results-dir"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "choose another --results-dir or fix its permissions"
    return "choose another --results-dir"


def ensure_writable(results_dir: str | Path, longest_name: str | None = None) -> Path:
    """Create the results directory and prove a file can be written there, before any training.
    `longest_name`: the longest file name that will be written there (a run's record name), so a path
    too long for the file system is found now, not when the record is written."""
    path = Path(results_dir)
    probe = temp_name("", prefix=".write-test-")
    if longest_name is not None and len(longest_name) > len(probe):
        probe += "x" * (len(longest_name) - len(probe))
    try:
        path.mkdir(parents=True, exist_ok=True)
        with open(path / probe, "xb") as handle:
            try:
                handle.write(b"ok")
                handle.flush()
                os.fsync(handle.fileno())
            finally:
                os.unlink(path / probe)
    except OSError as exc:
        raise RecordError(f"cannot write to results directory {path} ({exc.strerror or exc}): "
                          f"{_what_to_do(exc)}") from None
    return path


def _json_safe(value: Any) -> Any:
    """`value` with non-finite floats replaced by None: JSON has no NaN/inf, and a diverged run's
    losses (e.g. a non-finite test loss) must not stop its record from being written."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def record_text(record: dict[str, Any]) -> str:
    """The record as written: JSON, non-finite numbers as null, loader annotations (`_path`, ...) left out."""
    clean = {k: v for k, v in record.items() if not k.startswith("_")}
    return json.dumps(_json_safe(clean), indent=2, sort_keys=False, allow_nan=False, default=str) + "\n"


def write_record(results_dir: str | Path, record: dict[str, Any]) -> Path:
    """Write `record` atomically under a new name; returns its path. Never replaces an existing file.

    Non-finite numbers are written as null. Raises RecordError with the file system's reason."""
    directory = Path(results_dir)
    base = record_filename(record)
    text = record_text(record)
    tmp = directory / temp_name(".json")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with open(tmp, "x") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        for attempt in range(1000):
            name = base if attempt == 0 else base.replace(".json", f"-{attempt}.json")
            target = directory / name
            try:
                os.link(tmp, target)  # atomic, and refuses to replace an existing record
                return target
            except FileExistsError:
                continue
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                    raise
                # a file system without hard links (some network mounts): exclusive create
                try:
                    with open(target, "x") as handle:
                        handle.write(text)
                    return target
                except FileExistsError:
                    continue
        raise RecordError(f"could not find a free record name for {base} in {directory}")
    except OSError as exc:
        raise RecordError(f"could not write run record {directory / base} ({exc.strerror or exc})") from None
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass


FALLBACK_ENV = "OPTBENCH_FALLBACK_DIR"


def fallback_dirs() -> list[Path]:
    """Where a record goes when its results directory cannot take it: $OPTBENCH_FALLBACK_DIR, then
    ~/.local/state/optbench/unsaved-records, then the system's temporary folder (often another disk)."""
    override = os.environ.get(FALLBACK_ENV)
    return ([Path(override)] if override else []) + [
        Path.home() / ".local" / "state" / "optbench" / "unsaved-records",
        Path(tempfile.gettempdir()) / "optbench-unsaved-records"]


def write_record_or_fallback(results_dir: str | Path, record: dict[str, Any]) -> tuple[Path, str | None]:
    """(path, None) when the record is in `results_dir`; (path elsewhere, why) when it could not be
    written there but was saved in a fallback folder. Raises RecordError, naming every reason, only if
    no place at all took it."""
    try:
        return write_record(results_dir, record), None
    except RecordError as exc:
        reason = str(exc)
    reasons = [reason]
    for folder in fallback_dirs():
        try:
            return write_record(folder, record), reason
        except RecordError as exc:
            reasons.append(str(exc))
    raise RecordError("; ".join(reasons) + f"; set {FALLBACK_ENV} to a folder with space")


@dataclass
class LoadedRecords:
    records: list[dict[str, Any]]
    problems: list[str]  # one line per file that could not be used


def _check(record: Any, path: Path) -> str | None:
    problem = record_problem(record)
    return f"{path.name}: {problem}" if problem else None


KNOWN_SCHEMA_VERSIONS = (SCHEMA_VERSION,)
# Non-negative, finite, or null: seconds and rates.
NONNEGATIVE_FIELDS = ("train_wall_time_s", "eval_wall_time_s", "total_wall_time_s", "throughput_images_per_s",
                      "achieved_tflops", "final_test_loss", "final_val_loss", "final_train_loss")
# Whole numbers >= 0, or null: counts and bytes.
COUNT_FIELDS = ("peak_memory_bytes", "peak_memory_reserved_bytes", "optimizer_state_bytes", "param_count",
                "param_bytes", "dataset_device_bytes", "training_flops_per_image", "steps", "epochs_completed",
                "images_seen", "total_steps_planned", "hessian_updates", "hessian_steps_planned", "warmup_steps",
                "diverged_at_step", "peak_memory_without_dataset_bytes", "bn_warmup_batches")
# Whole numbers >= 0 (or null) inside the `model` and `dataset` blocks, which titles print.
BLOCK_COUNTS = {"model": ("patch_size", "image_size", "depth", "width", "tokens", "param_count"),
                "dataset": ("train_images", "test_images", "validation_images", "num_classes", "image_size")}
TEXT_FIELDS = ("peak_memory_source", "status_detail", "started_at", "finished_at", "evaluated_on",
               "final_weights_sha256", "run_id")
OBJECT_FIELDS = ("environment", "dataset", "model", "optimizer_implementation", "memory_breakdown")
BREAKDOWN_COUNTS = ("peak_bytes", "params", "grads", "optimizer_state", "activations")


def record_problem(record: Any) -> str | None:
    """What makes `record` unusable as a run record, in a few words, or None if it is usable.

    Types and meaning: a known schema version; finite, non-negative times, sizes and counts; accuracies
    that are fractions; a history of consecutive epochs whose clock never runs backwards; and a status
    that agrees with the rest (an `ok` run has its final accuracy, equal to its last epoch's, and all
    its epochs; a run that did not finish has no final accuracy). Anything a report prints is checked
    here, so a record that passes cannot put a nonsense figure in a report.
    """
    if not isinstance(record, dict):
        return "not a run record (top level is not an object)"
    missing = [f for f in REQUIRED_FIELDS if f not in record]
    if missing:
        return f"not a run record (missing {', '.join(missing)})"
    version = record.get("schema_version")
    if type(version) is not int or version not in KNOWN_SCHEMA_VERSIONS:
        return (f"schema_version {version!r} is not one this optbench reads "
                f"({', '.join(map(str, KNOWN_SCHEMA_VERSIONS))})")
    if not isinstance(record["status"], str) or record["status"] not in STATUSES:
        return f"unknown status {record['status']!r}"
    if not isinstance(record["optimizer"], str) or not record["optimizer"] \
            or not isinstance(record["config_hash"], str):
        return "optimizer and config_hash must be text"
    config = record["config"]
    if not isinstance(config, dict):
        return "config is not an object"
    problem = _config_problem(config)
    if problem:
        return problem
    for key in ("final_test_acc", "final_val_acc"):
        acc = record.get(key)
        if acc is not None and not (_is_finite(acc) and 0.0 <= acc <= 1.0):
            return f"{key} {acc!r} is not a fraction in [0, 1]"
    for key in NONNEGATIVE_FIELDS:
        value = record.get(key)
        if value is not None and not (_is_finite(value) and value >= 0):
            return f"{key} {value!r} is not a finite number >= 0"
    for key in COUNT_FIELDS:
        value = record.get(key)
        if value is not None and not _is_count(value):
            return f"{key} {value!r} is not a whole number >= 0"
    for key in TEXT_FIELDS:
        if record.get(key) is not None and not isinstance(record[key], str):
            return f"{key} {record[key]!r} is not text"
    for key in OBJECT_FIELDS:
        if record.get(key) is not None and not isinstance(record[key], dict):
            return f"{key} is not an object"
    for block, keys in BLOCK_COUNTS.items():
        for key in keys:
            value = (record.get(block) or {}).get(key)
            if value is not None and not _is_count(value):
                return f"{block}.{key} {value!r} is not a whole number >= 0"
    peak, without, data = (record.get(k) for k in ("peak_memory_bytes", "peak_memory_without_dataset_bytes",
                                                   "dataset_device_bytes"))
    if peak is not None and without is not None and without > peak:
        return f"peak_memory_without_dataset_bytes {without} exceeds peak_memory_bytes {peak}"
    if peak is not None and data is not None and "cuda" in str(record.get("peak_memory_source")) and data > peak:
        return f"dataset_device_bytes {data} exceed the CUDA peak_memory_bytes {peak} that held them"
    warnings = record.get("warnings")
    if warnings is not None and not (isinstance(warnings, list) and all(isinstance(w, str) for w in warnings)):
        return "warnings is not a list of text"
    if record.get("evaluated_on", "test") not in ("test", "validation"):
        return f"evaluated_on {record['evaluated_on']!r} is neither test nor validation"
    problem = _history_problem(record.get("history", []), record.get("evaluated_on") == "validation")
    if problem:
        return problem
    problem = _breakdown_problem(record.get("memory_breakdown"))
    if problem:
        return problem
    return _status_problem(record)


def _config_problem(config: dict[str, Any]) -> str | None:
    seed = config.get("seed")
    if not _is_count(seed):
        return f"config.seed {seed!r} is not a whole number >= 0"
    for key in ("epochs", "batch_size", "dataset"):  # the workload every report names
        if config.get(key) is None:
            return f"config.{key} is missing"
    for key in ("epochs", "batch_size", "depth", "patch_size", "subset", "test_subset"):
        value = config.get(key)
        if value is not None and not (_is_count(value) and value >= 1):
            return f"config.{key} {value!r} is not a whole number >= 1"
    for key in ("dataset", "model", "device", "precision"):
        if config.get(key) is not None and not isinstance(config[key], str):
            return f"config.{key} {config[key]!r} is not text"
    hparams = config.get("hparams")
    if hparams is not None:
        if not isinstance(hparams, dict):
            return "config.hparams is not an object"
        for key in ("lr", "weight_decay"):
            value = hparams.get(key)
            if value is not None and not (_is_finite(value) and value >= 0):
                return f"config.hparams.{key} {value!r} is not a finite number >= 0"
    return None


def _history_problem(history: Any, validation: bool) -> str | None:
    acc_key = "val_acc" if validation else "test_acc"
    if not isinstance(history, list):
        return "history is not a list of epochs"
    clock, steps = 0.0, 0
    for i, row in enumerate(history, 1):
        if not isinstance(row, dict):
            return f"history epoch {i} is not an object"
        if row.get("epoch") != i or isinstance(row.get("epoch"), bool):
            return f"history row {i} says epoch {row.get('epoch')!r} (epochs must run 1, 2, 3, ...)"
        acc = row.get(acc_key)
        if not (_is_finite(acc) and 0.0 <= acc <= 1.0):
            return f"history epoch {i}: {acc_key} {acc!r} is not a fraction in [0, 1]"
        time_s = row.get("train_time_s")
        if not (_is_finite(time_s) and time_s >= clock):
            return f"history epoch {i}: train_time_s {time_s!r} is not a finite number >= the epoch before's"
        clock = time_s
        for key in ("train_loss", "test_loss", "val_loss"):
            value = row.get(key)
            if value is not None and not (_is_finite(value) and value >= 0):
                return f"history epoch {i}: {key} {value!r} is not a finite number >= 0"
        if "steps" in row:
            if not (_is_count(row["steps"]) and row["steps"] >= steps):
                return f"history epoch {i}: steps {row['steps']!r} is not a whole number >= the epoch before's"
            steps = row["steps"]
        if row.get("lr") is not None and not _is_finite(row["lr"]):
            return f"history epoch {i}: lr {row['lr']!r} is not a finite number"
        diagnostics = row.get("diagnostics")
        if diagnostics is not None and not (isinstance(diagnostics, dict) and all(
                v is None or _is_finite(v) for v in diagnostics.values())):
            return f"history epoch {i}: diagnostics must map names to finite numbers"
    return None


def _breakdown_problem(breakdown: Any) -> str | None:
    if breakdown is None:
        return None
    if not _is_count(breakdown.get("peak_bytes", 0)):
        return "memory_breakdown.peak_bytes is not a whole number >= 0"
    for name, step in breakdown.items():
        if not name.endswith("_step"):
            continue
        if not isinstance(step, dict) or not _is_count(step.get("peak_bytes")):
            return f"memory_breakdown.{name} is malformed (no peak_bytes)"
        for key, value in step.items():
            if key in BREAKDOWN_COUNTS and not _is_count(value):
                return f"memory_breakdown.{name}.{key} {value!r} is not a whole number >= 0"
            if not (value is None or isinstance(value, str) or _is_finite(value)):
                return f"memory_breakdown.{name}.{key} {value!r} is not a finite number"
    return None


def _status_problem(record: dict[str, Any]) -> str | None:
    status, history = record["status"], record.get("history", [])
    validation = record.get("evaluated_on") == "validation"
    acc_key = "final_val_acc" if validation else "final_test_acc"
    if "epochs_completed" in record and record["epochs_completed"] != len(history):
        return f"epochs_completed {record['epochs_completed']!r} but the history has {len(history)} epochs"
    if status == "ok":
        if record.get(acc_key) is None:
            return f"status ok but {acc_key} is null"
        if not _is_finite(record.get("train_wall_time_s")):
            return "status ok but train_wall_time_s is missing"
        epochs = record["config"].get("epochs")
        if epochs is not None and len(history) != epochs:
            return f"status ok but the history has {len(history)} of the config's {epochs} epochs"
        if history and history[-1]["val_acc" if validation else "test_acc"] != record[acc_key]:
            return f"{acc_key} {record[acc_key]!r} is not the last epoch's accuracy"
    else:
        for key in ("final_test_acc", "final_val_acc"):
            if record.get(key) is not None:
                return f"status {status} but {key} is {record[key]!r} (only a finished run has one)"
    if validation and record.get("final_test_acc") is not None:
        return "a run scored on the validation split has a final_test_acc"
    return None


def _is_finite(value: Any) -> bool:
    return _is_number(value) and math.isfinite(value)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def load_records(results_dir: str | Path) -> LoadedRecords:
    directory = Path(results_dir)
    if not directory.is_dir():
        raise RecordError(f"results directory {directory} does not exist: run `optbench compare` first "
                          "or pass the folder that holds the run records")
    records, problems = [], []
    for path in sorted(directory.glob("[!.]*.json")):  # dot files are records still being written
        try:
            record = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            problems.append(f"{path.name}: unreadable ({exc.__class__.__name__}); skipped")
            continue
        problem = _check(record, path)
        if problem:
            problems.append(problem + "; skipped")
            continue
        record["_path"] = str(path)
        records.append(record)
    return LoadedRecords(records, problems)


DEFAULT_RESULTS_ROOT = Path("results")  # `run`, `compare` and `tune` write to results/PRESET by default


@dataclass
class LatestResults:
    directory: Path
    newest_record: Path  # the run record whose write made this folder the latest
    written_at: float  # its modification time (seconds since the epoch)


def latest_results_dir(root: str | Path = DEFAULT_RESULTS_ROOT) -> LatestResults:
    """The results folder `report` reads when given none: of `root` itself and the folders directly in it
    (results/smoke, results/homework, ...), the one holding the most recently written run record
    (newest file modification time of a readable record). Raises RecordError when there is none."""
    root = Path(root)
    if not root.is_dir():
        raise RecordError(f"no results folder {root}/ here: pass the folder of run records "
                          "(e.g. optbench report results/smoke), or run `optbench compare` first")
    candidates = []
    for folder in [root, *sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))]:
        for path in folder.glob("[!.]*.json"):  # dot files are records still being written
            try:
                candidates.append((path.stat().st_mtime, path))
            except OSError:
                continue
    for mtime, path in sorted(candidates, reverse=True):  # the newest file that is really a run record
        try:
            record = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if _check(record, path) is None:
            return LatestResults(path.parent, path, mtime)
    raise RecordError(f"no run records in {root}/ or its folders: pass the folder of run records, "
                      "or run `optbench compare` first")


def config_mismatch(record: dict[str, Any]) -> str | None:
    """Why a usable record cannot stand for the run its `config_hash` names, or None: its `config` must
    still be the config that hash was made from (the same identity fields, config.identity_of). A record
    whose config was edited by hand after the run would otherwise be reused as the edited config's run."""
    from optbench.config import identity_hash, identity_of  # no torch; only the reuse paths need it

    made_from = identity_hash(identity_of(record["config"]))
    if made_from == record["config_hash"]:
        return None
    folder = Path(record["_path"]).parent if "_path" in record else "the results folder"
    return (f"its config is not the one its config_hash {record['config_hash']} was made from (edited after the "
            f"run?), so it is not reused: put its config back, or move the file out of {folder}")


def finished_runs(results_dir: str | Path, skipped: Callable[[str], None] | None = None) -> dict[str, dict[str, Any]]:
    """Config hash -> the newest record of a completed (ok or diverged) run, read in one pass. Files that
    are not usable records, records whose config is not their hash's (`config_mismatch`) and records
    renamed so that their name no longer holds their hash are never reused; `skipped` is told of each
    (one line: file and problem)."""
    directory = Path(results_dir)
    if not directory.is_dir():
        return {}
    of_run: dict[str, list[dict[str, Any]]] = {}
    loaded = load_records(directory)
    for problem in loaded.problems if skipped is not None else ():
        skipped(problem)
    for rec in loaded.records:
        if rec["status"] not in ("ok", "diverged"):
            continue
        problem = reuse_problem(rec)
        if problem:
            if skipped is not None:
                skipped(f"{Path(rec['_path']).name}: {problem}")
        else:
            of_run.setdefault(rec["config_hash"], []).append(rec)
    return {config_hash: newest_record(found) for config_hash, found in of_run.items()}


def reuse_problem(record: dict[str, Any]) -> str | None:
    """Why a usable record loaded from a folder (`_path` set) stands for no run, or None: its config is not
    its hash's (`config_mismatch`), or its name does not hold its hash. The look under a run's lock
    (records_of_runs) finds a run's records by name, so every whole-folder look (compare's first look,
    `optbench status`) must leave out what that look cannot see."""
    problem = config_mismatch(record)
    if problem is None and _named_hash(Path(record["_path"]).name, {record["config_hash"]}) is None:
        problem = (f"its name does not hold its config_hash {record['config_hash']}, by which a run's records "
                   f"are found, so it is not reused: name it {record_filename(record)}")
    return problem


def _named_hash(name: str, hashes: set[str]) -> str | None:
    """Which of `hashes` a record's file name holds (record_filename: DATASET-OPT-seedN-HASH-STAMP[-k].json)."""
    return next((part for part in name[:-len(".json")].split("-") if part in hashes), None)


def records_of_runs(results_dir: str | Path, config_hashes: set[str] | list[str],
                    warn: Callable[[str], None] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Config hash -> the usable records of that run, for `config_hashes` only, read from the files whose
    names hold one of them: the folder is listed, not read, so a run's look costs its own records, not
    every record of the folder (compare and tune look once per run). A record named for another
    run than its content says, or whose config is not its hash's (`config_mismatch`, told to `warn` in
    one line), is left out; unusable files are left out silently (`load_records` and `finished_runs`
    name them, once per command)."""
    directory = Path(results_dir)
    wanted = set(config_hashes)
    out: dict[str, list[dict[str, Any]]] = {h: [] for h in wanted}
    if not directory.is_dir():
        return out
    for path in sorted(directory.glob("[!.]*.json")):  # dot files are records still being written
        named = _named_hash(path.name, wanted)
        if named is None:
            continue
        try:
            record = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if record_problem(record) is not None or record["config_hash"] != named:
            continue
        record["_path"] = str(path)
        problem = config_mismatch(record)
        if problem:
            if warn is not None:
                warn(f"{path.name}: {problem}")
            continue
        out[named].append(record)
    return out


def newest_record(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The newest of `records` (of one run), the one rule every look uses: the latest `finished_at`; of
    equal times (one clock tick, or clocks of two hosts), the one whose file name comes last -- the later
    start stamp, then write_record's attempt number (-1, -2, ... for a name already taken), so the same
    files always give the same answer, whatever order the folder lists them in."""
    return max(records, key=record_newness) if records else None


def record_newness(record: dict[str, Any]) -> tuple[str, str, int]:
    """`newest_record`'s order, as a sort key (analysis picks a run's record by it too)."""
    name = Path(record.get("_path") or "").name
    stem, _, attempt = name.removesuffix(".json").rpartition("-")
    if not attempt.isdigit():
        stem, attempt = name.removesuffix(".json"), "0"
    return record.get("finished_at") or "", stem, int(attempt)


def newest_finished(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The newest completed (ok or diverged) record of `records` (of one run): `newest_record`'s rule."""
    return newest_record([rec for rec in records if rec["status"] in ("ok", "diverged")])


def find_finished(results_dir: str | Path, config_hash: str,
                  warn: Callable[[str], None] | None = None) -> dict[str, Any] | None:
    """The newest record of a completed (ok or diverged) run with this config, if any (records_of_runs)."""
    return newest_finished(records_of_runs(results_dir, {config_hash}, warn)[config_hash])
