"""What tuning did, from the study's trials and the run records they point at. Pure functions.

A trial here is a plain dict, as `trial_dicts` extracts it from an Optuna study:

    {"optimizer": "<name>", "number": 7, "slot": 3, "state": "COMPLETE", "value": 0.41,
     "params": {"lr": 1e-4, "weight_decay": 0.5}, "defaults": False, "config_hash": "…",
     "record": "path/to/record.json", "retry_history": [], "worker": "host:pid"}

Budget: every optimizer's study is planned with the same slots 0..N-1 (slot 0 is the optimizer's
defaults). A slot is *settled* when its newest trial is COMPLETE (a diverged, out-of-memory or
failed run is COMPLETE with the worst score, 0), or FAIL with no retry left (a worker died on it
more often than the retry limit; also scored 0). A FAIL that was retried does not count: its retry
(same slot, same parameters, same config hash, so the run resumes from its checkpoint) does.
PRUNED trials carry no slot (a worker that found no planned trial left) and never count.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from statistics import mean
from typing import Any

from optbench.analysis import Verdict, optimizer_order
from optbench.search_space import SearchSpace, on_edge

WORST_SCORE = 0.0  # validation accuracy of a trial that diverged, ran out of memory or failed


@dataclass
class Budget:
    """Where one optimizer's study stands against its budget of `budget` slots."""

    budget: int
    settled: dict[int, dict[str, Any]]  # slot -> the trial that settled it
    waiting: int  # trials queued (planned or retries)
    running: int
    retry_pending: int  # slots whose newest trial failed and will be retried
    unplanned: int  # trials beyond the plan (never counted)

    @property
    def done(self) -> bool:
        return len(self.settled) == self.budget


def trial_dicts(study, optimizer: str) -> list[dict[str, Any]]:
    """An Optuna study's trials as the plain dicts this module reads (module docstring)."""
    out = []
    for t in study.get_trials(deepcopy=False):
        out.append({"optimizer": optimizer, "number": t.number, "slot": t.user_attrs.get("slot"),
                    "state": t.state.name, "value": t.value if t.state.name == "COMPLETE" else None,
                    "params": dict(t.params or t.system_attrs.get("fixed_params", {})),
                    "defaults": bool(t.user_attrs.get("defaults")), "config_hash": t.user_attrs.get("config_hash"),
                    "record": t.user_attrs.get("record"), "status": t.user_attrs.get("status"),
                    "worker": t.user_attrs.get("worker"), "process": trial_process(t.number, t.user_attrs),
                    "started": t.datetime_start.timestamp() if t.datetime_start is not None else None,
                    "retry_history": list(t.system_attrs.get("retry_history", []))})
    return out


def trial_process(number: int, user_attrs: dict[str, Any]) -> dict[str, Any] | None:
    """The worker process running trial `number` ({host, pid, pid_space}: runlock.this_process), or None until
    that worker has said so (its "process" user attribute, one write). A retried trial starts with a copy of
    its failed predecessor's user attributes: their process, the one that was lost, is not this trial's."""
    process = user_attrs.get("process")
    if isinstance(process, dict) and process.get("trial") == number:
        return {k: v for k, v in process.items() if k != "trial"}
    return None


def retries_left(trial: dict[str, Any], max_retry: int | None) -> bool:
    """Whether Optuna's RetryHeartbeatStaleTrialCallback would retry this failed trial again."""
    return max_retry is None or len(trial.get("retry_history") or []) + 1 <= max_retry


def budget_status(trials: list[dict[str, Any]], budget: int, max_retry: int | None) -> Budget:
    """Count one study's trials against its budget (module docstring: what settles a slot)."""
    newest: dict[int, dict[str, Any]] = {}
    unplanned = 0
    for t in trials:
        slot = t.get("slot")
        if slot is None or not 0 <= slot < budget:
            unplanned += 1
            continue
        if slot not in newest or t["number"] > newest[slot]["number"]:
            newest[slot] = t
    settled, waiting, running, pending = {}, 0, 0, 0
    for slot, t in newest.items():
        if t["state"] == "COMPLETE" or (t["state"] == "FAIL" and not retries_left(t, max_retry)):
            settled[slot] = t
        elif t["state"] == "WAITING":
            waiting += 1
        elif t["state"] == "RUNNING":
            running += 1
        elif t["state"] == "FAIL":
            pending += 1
    return Budget(budget, settled, waiting, running, pending, unplanned)


def score(trial: dict[str, Any]) -> float:
    """A settled trial's score: its validation accuracy, the worst score if it has none."""
    value = trial.get("value")
    if trial["state"] != "COMPLETE" or value is None or not math.isfinite(value):
        return WORST_SCORE
    return float(value)


def best_trial(settled: dict[int, dict[str, Any]]) -> dict[str, Any] | None:
    """The highest score; on a tie the lowest slot, so the defaults (slot 0) win ties: tuning has to beat
    them to replace them."""
    if not settled:
        return None
    return max(sorted(settled.items()), key=lambda item: (score(item[1]), -item[0]))[1]


def tuning_curve(scores: list[float], resamples: int = 200, seed: int = 0, band: float = 0.8) -> dict[str, list[float]]:
    """Best score so far after 1..n trials, in the order the trials were planned (slot order), and the
    same curve over `resamples` random orders of those trials: median and the central `band` (80%).

    The band shows how much the curve owes to the order the sampler happened to draw; it is computed
    from the trials actually run (no new training).
    """
    n = len(scores)
    if n == 0:
        return {"trials": [], "observed": [], "median": [], "low": [], "high": []}

    def running_best(values: list[float]) -> list[float]:
        out, best = [], -math.inf
        for v in values:
            best = max(best, v)
            out.append(best)
        return out

    rng = random.Random(seed)
    curves = [running_best(rng.sample(scores, n)) for _ in range(resamples)]
    columns = [sorted(c[i] for c in curves) for i in range(n)]

    def quantile(sorted_values: list[float], q: float) -> float:
        pos = q * (len(sorted_values) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)

    tail = (1 - band) / 2
    return {"trials": list(range(1, n + 1)), "observed": running_best(scores),
            "median": [quantile(c, 0.5) for c in columns], "low": [quantile(c, tail) for c in columns],
            "high": [quantile(c, 1 - tail) for c in columns]}


def lr_sensitivity(settled: dict[int, dict[str, Any]]) -> dict[float | None, list[tuple[float, float]]]:
    """Weight decay -> [(lr, score)] sorted by lr: one line per weight decay (grid search gives each
    weight decay several learning rates; Sobol gives every point its own weight decay)."""
    lines: dict[float | None, list[tuple[float, float]]] = {}
    for t in settled.values():
        lr = t["params"].get("lr")
        if lr is None:
            continue
        lines.setdefault(t["params"].get("weight_decay"), []).append((float(lr), score(t)))
    return {wd: sorted(points) for wd, points in sorted(lines.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))}


def tuning_compute(trials: list[dict[str, Any]], records: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Compute the trials spent: epochs trained, device-seconds (training + evaluation wall-time of each
    trial's run, one device per run) and Hessian estimates (Sophia), summed over the distinct runs the
    trials point at (a retried trial resumes the same run, so it is counted once)."""
    hashes = {t.get("config_hash") for t in trials if t.get("config_hash") in records}
    runs = [records[h] for h in sorted(hashes)]
    seconds = sum((r.get("train_wall_time_s") or 0.0) + (r.get("eval_wall_time_s") or 0.0) for r in runs)
    return {"runs": len(runs), "epochs": sum(int(r.get("epochs_completed") or 0) for r in runs),
            "device_seconds": seconds,
            "hessian_updates": sum(int(r.get("hessian_updates") or 0) for r in runs)}


def edge_warnings(space: SearchSpace, params: dict[str, float], grid: bool) -> list[str]:
    """One line per tuned hyperparameter whose chosen value sits at the edge of what was searched."""
    out = []
    for p in space.params:
        if p.name in params:
            edge = on_edge(p, params[p.name], grid)
            if edge:
                searched = f"grid {', '.join(f'{v:g}' for v in p.grid)}" if grid else f"range [{p.low:g}, {p.high:g}]"
                out.append(f"{space.optimizer}: best {p.name} {params[p.name]:.3g} is at the {edge} edge of the "
                           f"{searched}: the optimum may lie outside; widen the search space")
    return out


@dataclass
class OptimizerTuning:
    optimizer: str
    budget: int
    trials_used: int  # settled slots (= budget once the study is done)
    defaults: dict[str, float]
    default_val: float | None
    chosen: dict[str, float]
    tuned_val: float | None
    default_test: float | None  # mean final test accuracy of the defaults over the final seeds
    tuned_test: float | None  # the same for the chosen setting
    compute: dict[str, float]
    warnings: list[str] = field(default_factory=list)


def summarise_optimizer(optimizer: str, budget: Budget, space: SearchSpace, grid: bool, defaults: dict[str, float],
                        trial_records: dict[str, dict[str, Any]], default_finals: list[dict[str, Any]],
                        tuned_finals: list[dict[str, Any]], trials: list[dict[str, Any]]) -> OptimizerTuning:
    """Defaults beside the chosen setting, on validation (the trials) and on test (the final seeds)."""
    best = best_trial(budget.settled)
    default_trial = next((t for s, t in budget.settled.items() if s == 0), None)

    def test_mean(records: list[dict[str, Any]]) -> float | None:
        values = [r["final_test_acc"] for r in records if r.get("status") == "ok" and r.get("final_test_acc") is not None]
        # A final seed that diverged counts against the setting, as in compare's verdicts.
        values += [WORST_SCORE for r in records if r.get("status") != "ok"]
        return mean(values) if values else None

    chosen = dict(best["params"]) if best else {}
    return OptimizerTuning(
        optimizer=optimizer, budget=budget.budget, trials_used=len(budget.settled), defaults=defaults,
        default_val=score(default_trial) if default_trial else None, chosen=chosen,
        tuned_val=score(best) if best else None, default_test=test_mean(default_finals),
        tuned_test=test_mean(tuned_finals), compute=tuning_compute(trials, trial_records),
        warnings=edge_warnings(space, chosen, grid) if best else [])


def verdict_change(default_verdicts: list[Verdict], tuned_verdicts: list[Verdict]) -> str:
    """One line: did tuning change either verdict (same criteria, defaults' finals vs tuned finals)?"""
    mark = {True: "PASS", False: "FAIL", None: "UNDECIDED"}
    changed = [f"'{d.name}' {mark[d.passed]} -> {mark[t.passed]}" for d, t in zip(default_verdicts, tuned_verdicts)
               if d.passed != t.passed]
    if not changed:
        return ("tuning changed no verdict: " + "; ".join(f"'{t.name}' {mark[t.passed]}" for t in tuned_verdicts))
    count = {1: "one verdict", 2: "two verdicts", 3: "three verdicts"}.get(len(changed), f"{len(changed)} verdicts")
    return "tuning changed " + count + ": " + "; ".join(changed)


def order(summaries: dict[str, Any]) -> list[str]:
    return optimizer_order(list(summaries))
