"""Run records: the one contract between training and analysis.

One JSON file per run. Written to a temporary file in the same directory and then hard-linked to its
final name, which fails rather than replaces if that name exists: a record is never overwritten. Loading
never raises for one bad file: unreadable records are reported by name and skipped.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from optbench.errors import RecordError

SCHEMA_VERSION = 1
REQUIRED_FIELDS = ("optimizer", "status", "config", "config_hash")
STATUSES = ("ok", "diverged", "interrupted", "oom", "failed")
NUMERIC_FIELDS = ("train_wall_time_s", "peak_memory_bytes", "optimizer_state_bytes", "throughput_images_per_s",
                  "param_bytes", "dataset_device_bytes")
HISTORY_FIELDS = ("epoch", "test_acc", "train_time_s")  # losses may be null: non-finite ones are
# A run scored on a validation split (a tuning trial) has val_acc where others have test_acc.


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def record_filename(record: dict[str, Any]) -> str:
    cfg = record["config"]
    stamp = record.get("started_at", utc_now()).replace(":", "").replace("-", "")
    return f"{cfg['dataset']}-{record['optimizer']}-seed{cfg['seed']}-{record['config_hash']}-{stamp}.json"


def ensure_writable(results_dir: str | Path) -> Path:
    """Create the results directory and prove a file can be written there, before any training."""
    path = Path(results_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-", delete=True) as handle:
            handle.write(b"ok")
            handle.flush()
    except OSError as exc:
        raise RecordError(f"cannot write to results directory {path} ({exc.strerror or exc}): "
                          "choose another with --results-dir or fix its permissions") from None
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


def write_record(results_dir: str | Path, record: dict[str, Any]) -> Path:
    """Write `record` atomically under a new name; returns its path. Never replaces an existing file.

    Non-finite numbers are written as null."""
    directory = ensure_writable(results_dir)
    base = record_filename(record)
    text = json.dumps(_json_safe(record), indent=2, sort_keys=False, allow_nan=False, default=str)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text + "\n")
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
            except OSError:  # a file system without hard links (some network mounts): exclusive create
                try:
                    with open(target, "x") as handle:
                        handle.write(text + "\n")
                    return target
                except FileExistsError:
                    continue
        raise RecordError(f"could not find a free record name for {base} in {directory}")
    except OSError as exc:
        raise RecordError(f"could not write run record in {directory} ({exc.strerror or exc})") from None
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass


@dataclass
class LoadedRecords:
    records: list[dict[str, Any]]
    problems: list[str]  # one line per file that could not be used


def _check(record: Any, path: Path) -> str | None:
    if not isinstance(record, dict):
        return f"{path.name}: not a run record (top level is not an object)"
    missing = [f for f in REQUIRED_FIELDS if f not in record]
    if missing:
        return f"{path.name}: not a run record (missing {', '.join(missing)})"
    if record["status"] not in STATUSES:
        return f"{path.name}: unknown status {record['status']!r}"
    if not isinstance(record.get("config"), dict):
        return f"{path.name}: config is not an object"
    for key in ("final_test_acc", "final_val_acc"):
        acc = record.get(key)
        if acc is not None and not (_is_number(acc) and 0.0 <= acc <= 1.0):
            return f"{path.name}: {key} {acc!r} is not a fraction in [0, 1]"
    if not isinstance(record["optimizer"], str) or not isinstance(record["config_hash"], str):
        return f"{path.name}: optimizer and config_hash must be text"
    seed = record["config"].get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int):
        return f"{path.name}: config.seed {seed!r} is not a whole number"
    for key in NUMERIC_FIELDS:
        if record.get(key) is not None and not _is_number(record[key]):
            return f"{path.name}: {key} {record[key]!r} is not a number"
    for key in ("peak_memory_source", "status_detail", "finished_at"):
        if record.get(key) is not None and not isinstance(record[key], str):
            return f"{path.name}: {key} is not text"
    history = record.get("history", [])
    if not isinstance(history, list) or not all(
            isinstance(row, dict)
            and all(_is_number(row.get("val_acc" if k == "test_acc" and "val_acc" in row else k)) for k in HISTORY_FIELDS)
            and (row.get("train_loss") is None or _is_number(row["train_loss"])) for row in history):
        return f"{path.name}: history must be a list of epochs with numeric {', '.join(HISTORY_FIELDS)}"
    breakdown = record.get("memory_breakdown")
    if breakdown is not None:
        steps = [v for k, v in breakdown.items() if k.endswith("_step")] if isinstance(breakdown, dict) else None
        if steps is None or not all(isinstance(v, dict) and _is_number(v.get("peak_bytes"))
                                    and all(x is None or isinstance(x, str) or _is_number(x) for x in v.values())
                                    for v in steps):
            return f"{path.name}: memory_breakdown is malformed"
    return None


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


def finished_runs(results_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Config hash -> the newest record of a completed (ok or diverged) run, read in one pass."""
    directory = Path(results_dir)
    if not directory.is_dir():
        return {}
    newest: dict[str, dict[str, Any]] = {}
    for rec in load_records(directory).records:
        if rec["status"] in ("ok", "diverged") and rec.get("finished_at", "") >= \
                newest.get(rec["config_hash"], {}).get("finished_at", ""):
            newest[rec["config_hash"]] = rec
    return newest


def find_finished(results_dir: str | Path, config_hash: str) -> dict[str, Any] | None:
    """The newest record of a completed (ok or diverged) run with this config, if any."""
    return finished_runs(results_dir).get(config_hash)
