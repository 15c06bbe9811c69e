"""`tune`: the same tuning budget for every optimizer, chosen on a validation split, then fresh seeds.

Protocol (README, "A fair contest"):
1. Plan. One Optuna study per workload x optimizer x space. Its N trials are drawn up front by Optuna's
   own samplers (`GridSampler` over the YAML's grid, or one seeded scrambled Sobol sequence from
   `QMCSampler` mapped into each optimizer's ranges) and enqueued as slots 0..N-1; slot 0 is always the
   optimizer's defaults. Drawing up front is what makes the budget exact with any number of workers:
   workers only pop queued trials (Optuna's atomic WAITING -> RUNNING), they never ask the sampler, so
   no race can add an (N+1)-th trial.
2. Trials. A trial is an ordinary run (`run_experiment`) whose config trains on the training split
   minus a fixed class-balanced validation split and is scored on that split's accuracy at the last
   epoch; the test split is never loaded into it. Its record lives in RESULTS/tune/trials; the trial's
   user attributes point at it (config hash, record path): the study indexes runs, it stores no
   results of its own. A finished record with the trial's config hash is reused, a checkpoint resumed.
3. Scale-out. Workers (this process, `--workers N` processes, the tasks of one submitit job array with
   `--executor slurm|submitit-local`, or `optbench tune` started on other machines with the same
   `--storage`) share the study. A trial whose worker was lost is failed and re-queued with the same
   parameters (one retry spent), so its run resumes from its checkpoint: with an RDB storage (SQLite,
   PostgreSQL) Optuna's heartbeat notices, after the grace period; with Optuna's journal storage, which
   has no heartbeat, the trial's run lock does (`fail_lost_trials`). A trial stopped and checkpointed
   (Ctrl-C, SIGTERM, a SLURM task's preemption signal) is re-queued at once without spending one of its
   retries: it failed nothing, and its run resumes where it stopped. The rule: optbench/attempts.py.
4. Final runs. Each optimizer's best setting (ties go to the defaults) and its defaults run on the full
   training set with K fresh seeds and are scored on the test split by compare's own planning, running
   and report code; the verdicts come from those.

`tune_worker` is a top-level function of picklable arguments so an executor (processes, SLURM) can run it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

from optbench.config import RunConfig, resolve_config
from optbench.optimizers import get_entry
from optbench.errors import ConfigError, OptbenchError
from optbench.attempts import EXIT_STOPPED, MAX_RETRY
from optbench.attempts import outcome as attempt_outcome
from optbench.executors import ExecutorSpec, worker_name
from optbench.study_storage import (DEFAULT_HEARTBEAT_S, _quiet_optuna, _redact, default_storage,
                                     heartbeat_enabled, open_storage)
from optbench.search_space import SearchSpace, check_equal_grids, parse_search_space
from optbench.tune_analysis import Budget, budget_status, best_trial, trial_dicts, trial_process

SPACES = ("grid", "sobol")


class TuneError(OptbenchError):
    """A tuning run that cannot start or finish as asked."""


class TrialInterrupted(Exception):
    """The trial's run was stopped (Ctrl-C, SIGTERM) and checkpointed: it is re-queued, not scored."""


# --- storage ---------------------------------------------------------------------------------------


def check_shared_storage(spec: ExecutorSpec, url: str) -> None:
    """SLURM tasks on several nodes share the study: SQLite's file locking is not safe on a shared (NFS)
    filesystem, so `--executor slurm` needs a database server or Optuna's journal file, which locks
    without fcntl. submitit-local runs on one machine and may keep SQLite."""
    if spec.kind == "slurm" and url.startswith("sqlite"):
        raise ConfigError("--executor slurm needs a study storage every node can share safely (SQLite on a shared "
                          "filesystem is not): pass --storage postgresql://USER@HOST:PORT/DB or "
                          "--storage journal:PATH (a file on the shared filesystem)")


# --- the plan --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StudySpec:
    optimizer: str
    name: str  # the Optuna study name
    base: RunConfig  # the trial config at the defaults (hparams are replaced per trial)
    space: SearchSpace
    defaults: dict[str, float]  # the tuned hyperparameters' default values (slot 0)


@dataclass(frozen=True)
class TunePlan:
    """Everything a worker needs, picklable (it crosses process boundaries)."""

    preset: str
    optimizers: tuple[str, ...]
    overrides: dict[str, Any]  # compare's workload overrides, results_dir included
    space: str  # grid | sobol
    budget: int
    seed: int  # trials' seed and the Sobol scramble seed
    validation_fraction: float
    storage: str
    heartbeat_s: int
    studies: tuple[StudySpec, ...]
    track: tuple[str, ...] = ()  # --track: trackers every trial and final run also logs to
    track_uri: str | None = None

    @property
    def results_dir(self) -> Path:
        return Path(self.overrides["results_dir"])

    @property
    def tune_dir(self) -> Path:
        return self.results_dir / "tune"

    @property
    def trials_dir(self) -> Path:
        return self.tune_dir / "trials"

    @property
    def tag(self) -> str:
        return f"{self.space}-{self.budget}"


def load_search_space(optimizer: str, hparams: dict[str, Any]) -> SearchSpace:
    raw = get_entry(optimizer).search_space() or None
    if raw is None:
        raise ConfigError(f"{optimizer} has no search_space in its YAML (optimizers/{optimizer}.yaml): "
                          "add one to tune it")
    return parse_search_space(optimizer, raw, hparams)


def trial_config(base: RunConfig, params: dict[str, float]) -> RunConfig:
    """The run of one trial: the base trial config with the trial's hyperparameters."""
    return replace(base, hparams={**base.hparams, **params})


def make_plan(preset: str, optimizers: list[str], overrides: dict[str, Any], space: str, budget: int, seed: int,
              validation_fraction: float, storage: str | None, heartbeat_s: int = DEFAULT_HEARTBEAT_S,
              target_device: str | None = None) -> TunePlan:
    """Resolve and check everything before any training: configs, search spaces, budget, storage URL.
    `target_device`: the trials run on other machines (SLURM nodes) with this device (`resolve_runtime`)."""
    from optbench.experiment import resolve_runtime

    if space not in SPACES:
        raise ConfigError(f"unknown --space '{space}': choose grid or sobol")
    if budget < 1:
        raise ConfigError(f"--trials must be at least 1 (slot 0 is the defaults), got {budget}")
    if not 0 < validation_fraction <= 0.5:
        raise ConfigError(f"--validation must be a fraction in (0, 0.5], e.g. 0.1; got {validation_fraction}")
    if heartbeat_s < 1:
        raise ConfigError(f"--heartbeat must be at least 1 second, got {heartbeat_s}")
    results_dir = overrides["results_dir"]
    trials_dir = str(Path(results_dir) / "tune" / "trials")
    studies = []
    for opt in optimizers:
        base = resolve_runtime(resolve_config(opt, preset, {
            **overrides, "seed": seed, "validation_fraction": validation_fraction, "validation_seed": 0,
            "memory_probe": False, "results_dir": trials_dir}), target_device)
        search = load_search_space(opt, base.hparams)
        if space == "grid" and budget > search.grid_size:
            raise ConfigError(f"--trials {budget} exceeds {opt}'s grid of {search.grid_size} points: use at most "
                              f"{search.grid_size}, or --space sobol")
        identity = {k: v for k, v in base.identity.items() if k != "hparams"}
        key = json.dumps({"run": identity, "space": search.to_dict(), "kind": space, "seed": seed}, sort_keys=True,
                         default=str)
        name = f"optbench-{opt}-{space}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
        studies.append(StudySpec(opt, name, base, search, {p: float(base.hparams[p]) for p in search.names}))
    if space == "grid":
        check_equal_grids([s.space for s in studies])
    return TunePlan(preset, tuple(optimizers), dict(overrides), space, budget, seed, validation_fraction,
                    storage or default_storage(results_dir), heartbeat_s, tuple(studies))


def draw_points(spec: StudySpec, kind: str, budget: int, seed: int) -> list[dict[str, float]]:
    """The study's trials in slot order: the defaults, then `budget - 1` distinct points from Optuna's
    sampler (GridSampler over the grid in its seeded order, or the scrambled Sobol sequence of
    QMCSampler). Drawn in a throwaway in-memory study, so the same seed gives the same points on every
    machine and on every re-plan. The grid point equal to the defaults is not drawn twice."""
    import optuna

    _quiet_optuna()
    if kind == "grid":
        sampler = optuna.samplers.GridSampler({p.name: list(p.grid) for p in spec.space.params}, seed=seed)
    else:
        sampler = optuna.samplers.QMCSampler(qmc_type="sobol", scramble=True, seed=seed)
    scratch = optuna.create_study(direction="maximize", sampler=sampler)
    # Slot 0, the defaults, goes first: QMCSampler takes its search space from the first finished trial,
    # so the Sobol points start at the sequence's first point.
    scratch.enqueue_trial(spec.defaults)
    points: list[dict[str, float]] = []

    def draw(trial) -> float:
        params = {p.name: float(trial.suggest_float(p.name, p.low, p.high, log=p.log)) for p in spec.space.params}
        if params not in points:
            points.append(params)
        if len(points) == budget:
            trial.study.stop()
        return 0.0

    # GridSampler stops the study itself when the grid is exhausted; n_trials bounds the Sobol case.
    scratch.optimize(draw, n_trials=budget + spec.space.grid_size + 1)
    return points


@contextmanager
def _plan_lock(tune_dir: Path) -> Iterator[None]:
    """Serialises planning between `optbench tune` processes sharing the results directory."""
    tune_dir.mkdir(parents=True, exist_ok=True)
    with open(tune_dir / "plan.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def prepare_studies(plan: TunePlan, storage=None) -> None:
    """Create each study (or load it) and enqueue the slots it does not have yet. Idempotent: a second
    `tune` (another worker, a resume, a larger --trials) adds only what is missing; a smaller --trials
    than a study was planned with is refused (it would leave the optimizers' budgets unequal)."""
    import optuna

    storage = storage or open_storage(plan.storage, plan.heartbeat_s)
    with _plan_lock(plan.tune_dir):
        for spec in plan.studies:
            study = optuna.create_study(study_name=spec.name, storage=storage, direction="maximize",
                                        load_if_exists=True)
            planned = study.user_attrs.get("budget", 0)
            if planned > plan.budget:
                raise TuneError(f"study {spec.name} ({spec.optimizer}) was planned with {planned} trials; --trials "
                                f"{plan.budget} would leave the optimizers' budgets unequal: use --trials {planned} "
                                "or another --results-dir / --storage")
            study.set_user_attr("budget", plan.budget)
            for key, value in (("optimizer", spec.optimizer), ("space", plan.space), ("seed", plan.seed),
                               ("search_space", spec.space.to_dict()), ("validation_fraction", plan.validation_fraction),
                               ("trials_dir", str(plan.trials_dir))):
                study.set_user_attr(key, value)
            have = {t.user_attrs.get("slot") for t in study.get_trials(deepcopy=False)}
            for slot, params in enumerate(draw_points(spec, plan.space, plan.budget, plan.seed)):
                if slot not in have:
                    study.enqueue_trial(params, user_attrs={"slot": slot, "defaults": slot == 0})
        from optbench.status import record_studies

        record_studies(plan.tune_dir, _redact(plan.storage), {  # for `optbench status`: which studies, where
            spec.name: {"optimizer": spec.optimizer, "budget": plan.budget, "space": plan.space} for spec in plan.studies})


def study_status(plan: TunePlan, storage) -> dict[str, tuple[Budget, list[dict[str, Any]]]]:
    import optuna

    out = {}
    for spec in plan.studies:
        study = optuna.load_study(study_name=spec.name, storage=storage)
        trials = trial_dicts(study, spec.optimizer)
        out[spec.optimizer] = (budget_status(trials, plan.budget, MAX_RETRY), trials)
    return out


# --- the worker ------------------------------------------------------------------------------------


BUSY_POLL_S = 2.0  # how often a trial whose run another live process holds looks again


def _run_trial_run(config: RunConfig, data, say: Callable[[str], None], track: tuple[str, ...] = (),
                   track_uri: str | None = None) -> tuple[dict[str, Any], Path]:
    """The trial's run: its finished record if there is one, else the run (resumed from its checkpoint).
    If another live process holds the run (a worker that missed its heartbeats), wait for its record."""
    from optbench.experiment import RunBusy, run_experiment
    from optbench.records import find_finished
    from optbench.runlock import lock_path, read_lock

    warn = say  # a record of this run whose config was edited is named once, not at every look
    waited_for: object = None  # the holder last named (its lock's token): named once, again when it changes
    while True:
        existing = find_finished(config.results_dir, config.config_hash, warn)
        warn = None
        if existing is not None:
            return existing, Path(existing["_path"])

        def settled() -> dict[str, Any] | None:  # the look under the lock, silent: the one above named it
            return find_finished(config.results_dir, config.config_hash)

        try:
            if not track:
                return run_experiment(config, None, data=data, resume=True, settled=settled)
            from optbench.console import RichReporter
            from optbench.tracking import reporter_factory

            with reporter_factory(lambda c: RichReporter(c.optimizer, quiet=True), list(track), track_uri)(config) \
                    as reporter:
                return run_experiment(config, reporter, data=data, resume=True, settled=settled)
        except RunBusy:
            holder = read_lock(lock_path(config.results_dir, config.config_hash)) or {}
            if waited_for is None or holder.get("token") != waited_for:
                who = ", ".join(str(holder[k]) for k in ("host", "pid", "worker", "job_id") if holder.get(k))
                say(f"{config.optimizer} {config.config_hash}: {'held' if waited_for is None else 'taken over'} by "
                    f"another live process{f' ({who})' if who else ''}; waiting for it")
                waited_for = holder.get("token", "")
            time.sleep(BUSY_POLL_S)


def tune_worker(plan: TunePlan, name: str | None = None, visible_devices: str | None = None,
                quiet: bool = False) -> dict[str, Any]:
    """Run queued trials of the plan's studies until every study has settled its budget.

    Top-level and picklable (an executor can run it anywhere the storage and the results directory are
    reachable); its runs take their thread count from their configs. `visible_devices`: its
    CUDA_VISIBLE_DEVICES (one GPU per worker). Returns {"worker", "trials", "interrupted", "error"}: a stop
    or an error ends it early (attempts.py). While trials run in other workers it waits; a trial whose
    worker was lost is failed and re-queued (`fail_lost_trials`) and may be taken up here.
    """
    if visible_devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible_devices  # before torch initialises CUDA
    import optuna

    from optbench.compare import data_key
    from optbench.console import console
    from optbench.data import load_dataset

    name = name or worker_name()
    storage = open_storage(plan.storage, plan.heartbeat_s)
    beating = heartbeat_enabled(storage)
    studies = {spec.optimizer: optuna.load_study(study_name=spec.name, storage=storage) for spec in plan.studies}
    datasets: dict[tuple, Any] = {}
    done_here = {"worker": name, "trials": 0, "interrupted": False, "error": None}
    try:  # before taking a trial, so that a trial's worker is without its run's lock only briefly (trial_lost)
        for spec in plan.studies:
            if data_key(spec.base) not in datasets:  # a trial differs from its base in hyperparameters only
                datasets[data_key(spec.base)] = load_dataset(*data_key(spec.base))
    except OptbenchError as exc:  # an error ends the command (attempts.py)
        done_here["error"] = str(exc)
        return done_here

    def say(text: str) -> None:
        if not quiet:
            console.print(f"[dim]{name}[/dim] {text}", soft_wrap=True)

    trial_seconds: dict[str, list[float]] = {}  # optimizer -> wall-times of its trials run by this worker

    def queued_eta() -> str:
        """The trials still queued in every study, each at this worker's mean time for its optimizer."""
        from optbench.compare import remaining_seconds
        from optbench.console import duration_text

        queued = [s.optimizer for s in plan.studies
                  for _ in range(budget_status(trial_dicts(studies[s.optimizer], s.optimizer), plan.budget,
                                               MAX_RETRY).waiting)]
        if not queued:
            return ""
        return (f"; ETA {duration_text(remaining_seconds(trial_seconds, queued))} for the {len(queued)} queued "
                "trial(s) at this worker's pace (less with other workers)")

    def objective_for(spec: StudySpec, current: dict[str, Any]):
        def objective(trial) -> float:
            slot = trial.user_attrs.get("slot")
            if slot is None:  # another worker took the last queued trial first: nothing planned is left
                raise optuna.TrialPruned("no planned trial was waiting")
            mark_taken(trial)
            current["number"] = trial.number
            params = {p.name: trial.suggest_float(p.name, p.low, p.high, log=p.log) for p in spec.space.params}
            config = trial_config(spec.base, params)
            trial.set_user_attr("config_hash", config.config_hash)
            trial.set_user_attr("worker", name)
            key = data_key(config)
            if key not in datasets:
                datasets[key] = load_dataset(*key)
            started = time.perf_counter()
            record, path = _run_trial_run(config, datasets[key], say, plan.track, plan.track_uri)
            trial.set_user_attr("record", str(path))
            trial.set_user_attr("status", record["status"])
            if attempt_outcome(record) == "stopped":
                raise TrialInterrupted(f"trial {trial.number} stopped and checkpointed")
            value = record["final_val_acc"] if record["status"] == "ok" else 0.0  # worst score: counts against
            shown = ", ".join(f"{k} {v:.3g}" for k, v in params.items())
            trial_seconds.setdefault(spec.optimizer, []).append(time.perf_counter() - started)
            say(f"{spec.optimizer} slot {slot + 1}/{plan.budget} ({shown}"
                + (", the defaults" if slot == 0 else "") + f"): {record['status']}, val acc {value:.2%} "
                + f"[{time.perf_counter() - started:.1f}s, trial {trial.number}]" + (queued_eta() if not quiet else ""))
            done_here["trials"] += 1
            return value
        return objective

    while True:
        progressed, all_done = False, True
        for spec in plan.studies:
            study = studies[spec.optimizer]
            fail_lost_trials(study, beating, plan.trials_dir)  # FAIL, then re-queued (a retry spent)
            status = budget_status(trial_dicts(study, spec.optimizer), plan.budget, MAX_RETRY)
            if status.done:
                continue
            all_done = False
            if not status.waiting and not status.running and status.retry_pending:
                # Failed trials whose re-queueing was lost (the process died between the two): re-queue.
                for t in _lost_retries(study, plan.budget):
                    retry(study, t)
                continue
            if status.waiting:
                current: dict[str, Any] = {}
                try:
                    study.optimize(objective_for(spec, current), n_trials=1)
                except BaseException as exc:
                    # Optuna marked the trial FAIL (stopped, or an error such as missing data): re-queue it
                    # (`retry`; a stop spends no retry), so the slot is not lost and its run resumes later.
                    stopped = isinstance(exc, (TrialInterrupted, KeyboardInterrupt))
                    if "number" in current:
                        retry(study, next(t for t in study.get_trials(deepcopy=False) if t.number == current["number"]),
                              counted=not stopped)
                    if isinstance(exc, TrialInterrupted):
                        done_here["interrupted"] = True
                        return done_here
                    if isinstance(exc, OptbenchError):  # an error ends the command (attempts.py)
                        done_here["error"] = str(exc)
                        return done_here
                    raise
                progressed = True
                break  # back to the first study: workers finish the optimizers in the same order
        if all_done:
            return done_here
        if not progressed:
            time.sleep(min(1.0, plan.heartbeat_s / 2))  # others' trials run, or a dead one goes stale


def fail_lost_trials(study, beating: bool, trials_dir: Path) -> None:
    """Fail the RUNNING trials whose worker was lost (killed outright: attempts.py) and re-queue them, each
    spending one retry. With an RDB storage Optuna's heartbeat judges (`fail_stale_trials`, whose callback
    re-queues). Optuna's journal storage has no heartbeat, but every trial's run holds optbench's run lock,
    which has one (runlock.py): `trial_lost` judges from it. When two workers fail the same trial, the
    journal orders their writes and only the first succeeds, so it is re-queued once."""
    import optuna

    if beating:
        optuna.storages.fail_stale_trials(study)
        return
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if not trial_lost(trial, trials_dir):
            continue
        try:
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        except (ValueError, RuntimeError):  # finished meanwhile, or failed first by another worker
            continue
        retry(study, next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number))


def trial_lost(trial, trials_dir: Path) -> bool:
    """Whether a RUNNING trial's worker is gone (journal storage), from its run's lock: `runlock.run_lost`
    with the trial's run (config hash), its worker's host and pid, and its start. A trial takes its run's
    lock just after it starts (its data is loaded before it is taken) and lets go just before it is told."""
    from optbench.runlock import run_lost

    start = trial.datetime_start.timestamp() if trial.datetime_start is not None else None
    return run_lost(trials_dir, trial.user_attrs.get("config_hash"), trial_process(trial.number, trial.user_attrs),
                    start)


def mark_taken(trial) -> None:
    """Say which process runs the trial (for `trial_lost` and `optbench status`), first thing in its objective:
    one user attribute, so a reader never sees this host with the pid of the lost worker a retry inherits."""
    from optbench.runlock import this_process

    trial.set_user_attr("process", {"trial": trial.number, **this_process()})


def retry(study, trial, counted: bool = True) -> None:
    """Re-queue a FAIL trial as Optuna's heartbeat does for a stale one (same parameters and slot,
    `retry_history` extended, at most MAX_RETRY times): after an error or a lost worker (attempts.py). Not
    `counted`: the trial was stopped and checkpointed (a SLURM task's time limit may stop a long trial many
    times); its retry keeps the retry history it had, so stops never use up the retries a failure gets."""
    import optuna

    if trial.state != optuna.trial.TrialState.FAIL:
        return
    if counted:
        optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(study, trial)
        return
    study.add_trial(optuna.create_trial(state=optuna.trial.TrialState.WAITING, params=trial.params,
                                        distributions=trial.distributions, user_attrs=trial.user_attrs,
                                        system_attrs={**trial.system_attrs, "failed_trial": trial.number}))


def _lost_retries(study, budget: int) -> list:
    """FAIL trials that are the newest of their slot, with retries left and no retry queued."""
    newest: dict[int, Any] = {}
    for t in study.get_trials(deepcopy=False):
        slot = t.user_attrs.get("slot")
        if slot is not None and slot < budget and (slot not in newest or t.number > newest[slot].number):
            newest[slot] = t
    return [t for t in newest.values() if t.state.name == "FAIL"
            and len(t.system_attrs.get("retry_history", [])) + 1 <= MAX_RETRY]


def run_trials_array(plan: TunePlan, spec: ExecutorSpec, storage, announce: Callable[[str], None]) -> None:
    """The trials as one submitit job array of `tune_worker` tasks (compare's path, `executors.run_array`):
    one task per trial not yet settled, or --workers tasks; then wait for them."""
    from optbench.executors import run_array

    def settled() -> int:
        return sum(len(budget.settled) for budget, _ in study_status(plan, storage).values())

    total = len(plan.studies) * plan.budget
    run_array(tune_worker, plan, total - settled(), plan.tune_dir / "slurm", spec, announce,
              progress=lambda: f"{settled()}/{total} trials settled", what="trial(s)", status_dir=plan.results_dir)


# --- the whole command -----------------------------------------------------------------------------


@dataclass
class TuneOutcome:
    plan: TunePlan
    status: dict[str, tuple[Budget, list[dict[str, Any]]]]
    chosen: dict[str, dict[str, float]] = field(default_factory=dict)
    final_seeds: list[int] = field(default_factory=list)
    default_records: list[dict[str, Any]] = field(default_factory=list)
    tuned_records: list[dict[str, Any]] = field(default_factory=list)
    interrupted: bool = False


TUNING_SEED = 1000  # the trials' seed by default: far from the seeds compare and the final runs use


def final_seeds(tune_seed: int, count: int, preferred: list[int] | None = None) -> list[int]:
    """K seeds never used in tuning (every trial uses `tune_seed`): compare's seeds first (the preset's,
    then 0, 1, 2, ...), so the defaults' final runs are compare's own runs and are reused both ways."""
    out: list[int] = []
    for s in [*(preferred or []), *range(count + len(preferred or []) + 1)]:
        if s != tune_seed and s not in out and len(out) < count:
            out.append(s)
    return out


def run_tune(plan: TunePlan, spec: ExecutorSpec, final_count: int, make_reporter: Callable[[RunConfig], Any],
             announce: Callable[[str], None], quiet: bool = False, preferred_seeds: list[int] | None = None
             ) -> TuneOutcome:
    """Plan, run the trials with the executor (this process, --workers processes, or a submitit job array),
    then the final runs with the same executor. With submitit nothing trains here (a login node)."""
    from optbench.compare import plan_runs

    spec.check()
    check_shared_storage(spec, plan.storage)
    storage = open_storage(plan.storage, plan.heartbeat_s)
    prepare_studies(plan, storage)
    announce(f"tuning {', '.join(plan.optimizers)}: {plan.budget} trials each ({plan.space}; slot 1 is the defaults), "
             f"validation split {plan.validation_fraction:.0%} of the training set, study storage {_redact(plan.storage)}")
    interrupted = False
    if spec.kind != "local":
        run_trials_array(plan, spec, storage, announce)
    elif spec.workers > 1:
        from optbench.executors import run_local_workers

        codes = run_local_workers(tune_worker, plan, spec.workers, "tune", quiet)
        interrupted = any(c == EXIT_STOPPED for c in codes)
        if any(c not in (0, EXIT_STOPPED) for c in codes):
            announce(f"worker exit codes {codes}: finishing the study in this process")
    if not interrupted and spec.kind == "local":  # also finishes what killed --workers processes left
        result = tune_worker(plan, worker_name(), quiet=quiet)
        if result["error"]:
            raise TuneError(result["error"])
        interrupted = result["interrupted"]
    status = study_status(plan, storage)
    outcome = TuneOutcome(plan, status, interrupted=interrupted)
    if interrupted:
        return outcome
    unfinished = [opt for opt, (budget, _) in status.items() if not budget.done]
    if unfinished:  # after a submitit array whose tasks failed (a local worker waits until every study is done)
        raise TuneError(f"the studies of {', '.join(unfinished)} are not complete after the jobs ended (see their "
                        f"logs in {plan.tune_dir / 'slurm'}); run this command again to resume them")
    outcome.chosen = {opt: dict(best_trial(budget.settled)["params"]) for opt, (budget, _) in status.items()}
    if final_count <= 0:
        return outcome
    outcome.final_seeds = final_seeds(plan.seed, final_count, preferred_seeds)

    def run_final(configs: list[RunConfig]) -> list[dict[str, Any]]:
        """Final runs go through compare's executor, the trials' one: --workers processes or array tasks."""
        from optbench.executors import Grid, execute
        from optbench.records import utc_now

        records, stopped = execute(Grid(tuple(configs), False, utc_now(), plan.track, plan.track_uri),
                                   spec, make_reporter, announce, quiet)
        outcome.interrupted = outcome.interrupted or stopped
        return records
    names = list(plan.optimizers)
    final_overrides = {k: v for k, v in plan.overrides.items() if k != "seed"}
    where = {"elsewhere": spec.kind == "slurm", "target_device": spec.target_device(plan.overrides.get("device"))}
    # The defaults on the full training set are compare's own runs (same directory: each reuses the other's).
    announce(f"final runs, seeds {', '.join(map(str, outcome.final_seeds))}: the defaults")
    outcome.default_records = run_final(plan_runs(plan.preset, names, outcome.final_seeds, final_overrides, **where))
    if outcome.interrupted:  # stopped (Ctrl-C, SIGTERM): the same command resumes from here
        return outcome
    announce("final runs: the tuned settings")
    # Where tuning kept the defaults, the tuned final runs are the defaults' runs (same config hash):
    # planned in the defaults' directory, they are reused instead of trained twice.
    kept = [opt for opt in names if outcome.chosen[opt] == {s.optimizer: s.defaults for s in plan.studies}[opt]]
    changed = [opt for opt in names if opt not in kept]
    tuned_overrides = {**final_overrides, "results_dir": str(plan.tune_dir / f"final-{plan.tag}")}
    configs = (plan_runs(plan.preset, changed, outcome.final_seeds, tuned_overrides, outcome.chosen, **where)
               + plan_runs(plan.preset, kept, outcome.final_seeds, final_overrides, **where))
    outcome.tuned_records = run_final(configs)
    return outcome
