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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optbench.attempts import MAX_RETRY, newest, outcome, records_by_hash, settling_record
from optbench.checkpoint_header import read_header
from optbench.runlock import lock_is_stale, read_lock
from optbench.errors import RecordError
from optbench.tempfiles import temp_name

GRID_FILE = "checkpoints/planned.json"  # beside the locks; not in RESULTS/, where every *.json is a record
STATES = ("finished", "failed", "running", "stale", "stopped", "planned")


def _write_json(path: Path, document: dict[str, Any]) -> None:
    """Replace `path` with `document` atomically; the temporary is named as tempfiles names its own, so one a
    killed writer leaves is cleaned like the others."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / temp_name(".json")
    tmp.write_text(json.dumps(document, indent=1))
    tmp.replace(path)


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
    _write_json(path, {"runs": list(by_hash.values())})


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
    directory = Path(results_dir)
    if not directory.is_dir():
        raise RecordError(f"results directory {directory} does not exist: pass the folder `compare` writes to")
    try:
        planned = json.loads((directory / GRID_FILE).read_text()).get("runs", [])
    except (OSError, ValueError, AttributeError):
        planned = []
    records = records_by_hash(directory)  # the executors' grouping (attempts.py)
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
    latest = newest(records)
    best = settling_record(records)  # for a plan made before every record: the newest finished, else failed
    if best is not None and outcome(best) == "finished":
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
        reached = _reached(checkpoint)
        if lock_is_stale(owner):
            return make("stale", f"lock of {who} (gone, heartbeat {_age(owner['age_s'])} ago): the next worker "
                        "resumes it" + (f" from its checkpoint ({reached})" if reached else ""))
        since = owner.get("started_at")
        held = f" for {_age(time.time() - since)}" if isinstance(since, (int, float)) else ""
        return make("running", f"{who}{held}, heartbeat {_age(owner['age_s'])} ago"
                    + (f"; last checkpoint: {reached}" if reached else ""))
    if latest is not None and outcome(latest) == "failed":
        return make("failed", f"{latest['status']}: {latest.get('status_detail') or ''}".strip())
    try:  # one look: a checkpoint removed meanwhile (its run finished) is no checkpoint, not an error
        saved = checkpoint.stat().st_mtime
    except OSError:
        return make("planned", "")
    reached = _reached(checkpoint)
    return make("stopped", (f"{reached}; " if reached else "") + f"checkpoint saved "
                f"{_age(time.time() - saved)} ago; compare resumes it")


def _reached(checkpoint: Path) -> str:
    """How far a checkpoint's run got, from its first line only ('' without one, or for a version-2 header)."""
    header = read_header(checkpoint)
    if header is None or header.epochs_done is None:
        return ""
    return f"epoch {header.epochs_done} of {header.epochs} done, step {header.steps} of {header.total_steps}"


# --- a tune folder: its studies (read from their storage, never written) and its final runs ----------------

STUDY_INDEX = "studies.json"  # in RESULTS/tune: the studies `tune` made for this folder, and their storage


def record_studies(tune_dir: str | Path, storage: str, studies: dict[str, dict[str, Any]]) -> None:
    """Add {study name: {optimizer, budget, space}} and the storage URL (without its password) to STUDY_INDEX."""
    path = Path(tune_dir) / STUDY_INDEX
    try:
        known = json.loads(path.read_text()) if path.exists() else {}
        known = known if isinstance(known, dict) and isinstance(known.get("studies"), dict) else {}
    except (OSError, ValueError):
        known = {}
    index = {"studies": {**known.get("studies", {}), **{name: {**info, "storage": storage}
                                                          for name, info in studies.items()}}}
    _write_json(path, index)


def tune_folder(results_dir: str | Path) -> Path | None:
    """RESULTS/tune when `tune` wrote there (or the folder itself when it is one), else None."""
    directory = Path(results_dir)
    for candidate in (directory / "tune", directory):
        if (candidate / STUDY_INDEX).is_file() or (candidate / "trials").is_dir() and candidate.name == "tune":
            return candidate
    return None


@dataclass
class StudyStatus:
    optimizer: str
    study: str
    budget: int
    complete: int  # slots settled by a COMPLETE trial (scored_zero of them diverged, ran out of memory or failed)
    scored_zero: int
    running: int
    lost: int  # running trials whose worker is gone (journal storage): the next `tune` fails and re-queues them
    waiting: int
    failed: int  # slots settled by a FAIL trial with no retry left
    retrying: int  # slots whose newest trial failed and will be retried
    pruned: int  # trials that found no planned trial left (never counted)
    retries: int  # retries spent (errors and lost workers; stops spend none)
    workers: list[str]  # the workers of the running trials


def tune_status(tune_dir: Path, storage: str | None = None) -> tuple[str, list[StudyStatus], str]:
    """The storage read, each study `tune` made for this folder against its budget (read only), and why
    none is shown when the folder's index names studies the storage does not hold ('' otherwise)."""
    import optuna

    from optbench.runlock import run_lost
    from optbench.study_storage import STUDY_FILE, open_study_storage
    from optbench.tune_analysis import budget_status, trial_dicts

    try:
        index = json.loads((tune_dir / STUDY_INDEX).read_text()).get("studies", {})
    except (OSError, ValueError, AttributeError):
        index = {}
    urls = {info.get("storage") for info in index.values() if isinstance(info, dict)} - {None}
    default = tune_dir / STUDY_FILE
    url = storage or (urls.pop() if len(urls) == 1 else f"sqlite:///{default.resolve()}" if default.is_file() else None)
    if url is None:
        raise RecordError(f"{tune_dir} does not say which Optuna storage holds its studies: pass --storage")
    if "***" in url:
        raise RecordError(f"the tune's storage {url} needs its password: pass --storage with it")
    opened = open_study_storage(url)  # read only
    names = [s.study_name for s in optuna.get_all_study_summaries(opened, include_best_trial=False)]
    # No index (an older tune wrote none): every study of the storage. An index none of whose studies is
    # there: none (the storage holds someone else's studies: a shared database, the wrong --storage).
    ours = [n for n in names if n in index] if index else names
    missing = "" if ours or not index else (
        f"no study that {tune_dir / STUDY_INDEX} names ({', '.join(sorted(index)[:3])}"
        f"{', ...' if len(index) > 3 else ''}) is in this storage (it holds {len(names)} other"
        f"{' study' if len(names) == 1 else ' studies'}): pass the --storage the tune used")
    out = []
    trials_dir = tune_dir / "trials"
    for name in ours:
        study = optuna.load_study(study_name=name, storage=opened)
        optimizer = study.user_attrs.get("optimizer", (index.get(name) or {}).get("optimizer", "?"))
        budget = int(study.user_attrs.get("budget", (index.get(name) or {}).get("budget", 0)))
        trials = trial_dicts(study, optimizer)
        status = budget_status(trials, budget, MAX_RETRY)
        settled = list(status.settled.values())
        running = [t for t in trials if t["state"] == "RUNNING"]
        out.append(StudyStatus(
            optimizer, name, budget, complete=sum(t["state"] == "COMPLETE" for t in settled),
            scored_zero=sum(t["state"] == "COMPLETE" and t.get("status") not in (None, "ok") for t in settled),
            running=len(running),
            lost=sum(run_lost(trials_dir, t["config_hash"], t["process"], t["started"]) for t in running),
            waiting=status.waiting, failed=sum(t["state"] == "FAIL" for t in settled), retrying=status.retry_pending,
            pruned=sum(t["state"] == "PRUNED" for t in trials), retries=_retries_spent(trials),
            workers=[str(t.get("worker") or "?") for t in running]))
    return url, out, missing


def _retries_spent(trials: list[dict[str, Any]]) -> int:
    """Counted retries (errors, lost workers) over the slots: the retry history of each slot's newest trial."""
    newest_of: dict[int, dict[str, Any]] = {}
    for t in trials:
        if t.get("slot") is not None and (t["slot"] not in newest_of or t["number"] > newest_of[t["slot"]]["number"]):
            newest_of[t["slot"]] = t
    return sum(len(t.get("retry_history") or []) for t in newest_of.values())
