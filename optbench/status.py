"""`optbench status DIR`: where a grid stands, read from what is on disk (no torch, nothing trained).

Sources: the planned runs (`RESULTS/checkpoints/planned.json`, written by `compare` when it hands its grid to an
executor), the run records, the checkpoints and the run locks (`RESULTS/checkpoints/`), and the submitted
SLURM job ids (`RESULTS/slurm/jobs.json`). Each planned run is in one state:

- finished: a record with status ok or diverged;
- failed: its newest record says oom or failed (a new `compare` tries it again);
- running: a live lock (host, pid, for how long, job id);
- stale: a lock whose holder is gone (the next worker takes the run over from its checkpoint);
- stopped: a checkpoint and no lock (interrupted or killed; a new `compare` resumes it);
- planned: nothing yet.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optbench.runlock import lock_is_stale, read_lock
from optbench.errors import RecordError

GRID_FILE = "checkpoints/planned.json"  # beside the locks; not in RESULTS/, where every *.json is a record
STATES = ("finished", "failed", "running", "stale", "stopped", "planned")


def record_plan(results_dir: str | Path, runs: list[dict[str, Any]]) -> None:
    """Add the planned runs ({config_hash, optimizer, seed}) to GRID_FILE (earlier plans are kept)."""
    path = Path(results_dir) / GRID_FILE
    try:
        known = json.loads(path.read_text()).get("runs", []) if path.exists() else []
    except (OSError, ValueError, AttributeError):
        known = []
    by_hash = {r.get("config_hash"): r for r in known if isinstance(r, dict)}
    for run in runs:
        by_hash.setdefault(run["config_hash"], run)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.time_ns()}")
    tmp.write_text(json.dumps({"runs": list(by_hash.values())}, indent=1))
    tmp.replace(path)


@dataclass
class RunStatus:
    optimizer: str
    seed: Any
    config_hash: str
    state: str
    detail: str


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def grid_status(results_dir: str | Path) -> tuple[list[RunStatus], list[str]]:
    """Every planned run's state (plan order), then any other run found on disk; and the job ids submitted."""
    from optbench.records import load_records

    directory = Path(results_dir)
    if not directory.is_dir():
        raise RecordError(f"results directory {directory} does not exist: pass the folder `compare` writes to")
    try:
        planned = json.loads((directory / GRID_FILE).read_text()).get("runs", [])
    except (OSError, ValueError, AttributeError):
        planned = []
    records: dict[str, list[dict[str, Any]]] = {}
    for record in load_records(directory).records:
        records.setdefault(record["config_hash"], []).append(record)
    checkpoints = directory / "checkpoints"
    runs = {r["config_hash"]: r for r in planned if isinstance(r, dict) and "config_hash" in r}
    for config_hash, found in records.items():  # runs made without a recorded plan (older compare, run)
        runs.setdefault(config_hash, {"config_hash": config_hash, "optimizer": found[0]["optimizer"],
                                      "seed": found[0]["config"].get("seed")})
    for lock in checkpoints.glob("*.lock") if checkpoints.is_dir() else []:
        runs.setdefault(lock.stem, {"config_hash": lock.stem, "optimizer": "?", "seed": "?"})
    out = [_one(run, records.get(run["config_hash"], []), checkpoints) for run in runs.values()]
    try:
        jobs = [j for entry in json.loads((directory / "slurm" / "jobs.json").read_text()) for j in entry["jobs"]]
    except (OSError, ValueError, KeyError, TypeError):
        jobs = []
    return out, jobs


def _one(run: dict[str, Any], records: list[dict[str, Any]], checkpoints: Path) -> RunStatus:
    config_hash = run["config_hash"]
    make = lambda state, detail: RunStatus(run.get("optimizer", "?"), run.get("seed", "?"), config_hash, state, detail)
    newest = max(records, key=lambda r: r.get("finished_at") or "") if records else None
    finished = [r for r in records if r["status"] in ("ok", "diverged")]
    if finished:
        best = max(finished, key=lambda r: r.get("finished_at") or "")
        acc = best.get("final_test_acc", best.get("final_val_acc"))
        return make("finished", f"{best['status']}" + (f", acc {acc:.2%}" if isinstance(acc, (int, float)) else "")
                    + f", {best.get('finished_at', '?')}" + (", resumed" if best.get("resumed") else ""))
    owner = read_lock(checkpoints / f"{config_hash}.lock")
    checkpoint = checkpoints / f"{config_hash}.pt"
    if owner is not None:
        who = f"{owner.get('host', '?')} pid {owner.get('pid', '?')}"
        if owner.get("job_id"):
            who += f", job {owner['job_id']}"
        if owner.get("worker"):
            who += f", {owner['worker']}"
        if lock_is_stale(owner):
            return make("stale", f"lock of {who} (gone, heartbeat {_age(owner['age_s'])} ago): the next worker "
                        "resumes it")
        since = owner.get("started_at")
        held = f" for {_age(time.time() - since)}" if isinstance(since, (int, float)) else ""
        return make("running", f"{who}{held}, heartbeat {_age(owner['age_s'])} ago")
    if newest is not None and newest["status"] in ("oom", "failed"):
        return make("failed", f"{newest['status']}: {newest.get('status_detail') or ''}".strip())
    if checkpoint.exists():
        return make("stopped", f"checkpoint saved {_age(time.time() - checkpoint.stat().st_mtime)} ago; "
                    "compare resumes it")
    return make("planned", "")
