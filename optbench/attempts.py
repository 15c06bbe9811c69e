"""How an attempt at a run ends, and what follows: the one rule of every executor.

Whoever makes the attempt -- `compare` in this process, a `--workers` process, a submitit array task, a
`tune` worker running a trial -- it ends one of five ways, and each is treated alike everywhere:

- **finished** (a record with status ok or diverged): settled for good; every later command reuses it.
- **failed** (a record with status oom or failed: the run itself broke or ran out of memory): settled for
  the plan that tried it, which never tries it twice. compare's plan is one command: the next command
  tries it again (from its last checkpoint). tune's plan is the study: the trial scores the worst score
  and counts against the budget.
- **stopped** (a record with status interrupted: Ctrl-C, SIGTERM, submitit's preemption or time-limit
  signal): not a failure, and it spends nothing. The run saved its checkpoint; the executor that was
  stopped ends (exit 130; a submitit task hands the signal to submitit, which requeues the task), and
  whoever takes the run next resumes it. A trial is re-queued at once without spending a retry.
- **error** (an `OptbenchError` raised, no record: a checkpoint refused, data missing, a full disk, a
  setting the optimizer's library rejects): bad input or environment, not a result. The command ends
  with its one-line message (exit 1), whatever the executor, as the serial compare always did: the worker
  or task that met it reports it and its siblings are stopped (SIGTERM, or the jobs cancelled: they save
  their checkpoints), so nothing makes a second attempt in that command; the same command run after the
  fix resumes everything. A trial that met one is failed in the study and re-queued, spending one retry.
- **lost** (no record: the worker was killed outright, by SIGKILL, the OOM killer or a lost node): its run
  lock goes stale (`runlock.py`) and the next worker that looks takes the run over and resumes it from its
  checkpoint -- another `--workers` process or, once all are gone, the parent; another array task; or the
  next command. compare keeps no count. A trial spends one retry (Optuna's heartbeat notices the loss on
  an RDB storage, the trial's run lock on a journal storage), because the run itself may be what kills
  its worker (the OOM killer) and a slot must settle for the budget to complete. A preemption is not a
  loss: it comes with a signal and ends as stopped.

A trial has MAX_RETRY retries; a slot whose newest trial failed (error or lost) with none left is settled
with the worst score (`tune_analysis.budget_status`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

FINISHED = ("ok", "diverged")
STOPPED = "interrupted"
MAX_RETRY = 3  # a trial failed by errors or lost workers this many times more is settled with the worst score
EXIT_ERROR, EXIT_STOPPED = 1, 130  # a worker process's exit code after an error, after a stop


def outcome(record: dict[str, Any]) -> str:
    """finished, failed or stopped: how the attempt that wrote `record` ended (errors and losses leave none)."""
    status = record["status"]
    if status in FINISHED:
        return "finished"
    return "stopped" if status == STOPPED else "failed"


def records_by_hash(results_dir: str | Path, config_hashes: set[str] | None = None,
                    warn: Callable[[str], None] | None = None) -> dict[str, list[dict[str, Any]]]:
    """The usable records of a results directory grouped by config hash (one group per run). With
    `config_hashes`, of those runs only, read from the files named for them (records.records_of_runs,
    which tells `warn` of a record whose config was edited). A record whose config is not the one its
    hash was made from, or whose name does not hold its hash (records.reuse_problem), stands for no run:
    the whole folder's grouping (`optbench status`) and the look by name agree."""
    from optbench.records import load_records, records_of_runs, reuse_problem

    if config_hashes is not None:
        return records_of_runs(results_dir, config_hashes, warn)
    if not Path(results_dir).is_dir():
        return {}
    out: dict[str, list[dict[str, Any]]] = {}
    for record in load_records(results_dir).records:
        if reuse_problem(record) is None:
            out.setdefault(record["config_hash"], []).append(record)
    return out


def newest(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The newest of a run's records, by the rule records.newest_record gives every look (ties by file name)."""
    from optbench.records import newest_record

    return newest_record(records)


def settling_record(records: list[dict[str, Any]], since: str = "", rerun: bool = False) -> dict[str, Any] | None:
    """The record that settles a run (one config hash's `records`) for a plan made at `since` (UTC), or None:
    its newest finished record (with `rerun`, only one written since), else its newest failed record
    written since (a failed run is tried once per plan)."""
    def fresh(r: dict[str, Any]) -> bool:
        return (r.get("finished_at") or "") >= since

    finished = [r for r in records if outcome(r) == "finished" and (fresh(r) or not rerun)]
    if finished:
        return newest(finished)
    return newest([r for r in records if outcome(r) == "failed" and fresh(r)])
