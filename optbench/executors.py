"""Where `compare`'s planned runs and `tune`'s trials execute: in this process, in N worker processes, or in
a SLURM job array.

The run records in the results directory are the one contract. A grid (the planned configs) is handed
to an executor; whoever executes it -- this process (`--executor local`, the default), `--workers N`
processes on this machine, or the tasks of one submitit job array (`--executor slurm`, or
`submitit-local` to run the same submission and requeue machinery as local processes) -- runs
`run_worker`: it claims runs one at a time through the run locks (`runlock.acquire_run_lock`),
trains or resumes each, and writes records. The parent then collects the report from the records.
`tune` hands its trials to the same two machineries (`run_local_workers`, `run_array`) with its own
worker, `tune.tune_worker`.

How an attempt ends (finished, failed, stopped, error, lost) and what follows is one rule for every
executor, stated in `optbench/attempts.py`. Nothing here schedules: workers take the next unclaimed run
in plan order.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from optbench.attempts import EXIT_ERROR, EXIT_STOPPED, outcome, records_by_hash, settling_record
from optbench.config import RunConfig
from optbench.errors import ConfigError, OptbenchError

EXECUTORS = ("local", "slurm", "submitit-local")
POLL_S = 2.0  # how often a worker with nothing to claim looks again, and the parent reports progress


class ExecutorError(OptbenchError):
    """An executor that cannot start or whose workers could not finish the grid."""


@dataclass(frozen=True)
class Grid:
    """The planned runs and how to judge them settled; picklable (it crosses process and job boundaries)."""

    configs: tuple[RunConfig, ...]
    rerun: bool = False
    since: str = ""  # UTC time the grid was planned: records from then on settle failed (and, with rerun, all) runs
    track: tuple[str, ...] = ()
    track_uri: str | None = None

    @property
    def results_dirs(self) -> list[str]:
        return sorted({c.results_dir for c in self.configs})

    def unique(self) -> list[RunConfig]:
        seen, out = set(), []
        for config in self.configs:
            if (config.results_dir, config.config_hash) not in seen:
                seen.add((config.results_dir, config.config_hash))
                out.append(config)
        return out


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


# --- reading where the grid stands, from the records -----------------------------------------------------


def settled_record(grid: Grid, records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The record that settles a run for `grid` among `records` (one config hash's), or None (attempts.py)."""
    return settling_record(records, grid.since, grid.rerun)


def grid_state(grid: Grid, configs: list[RunConfig] | None = None) -> dict[tuple[str, str], dict[str, Any] | None]:
    """(results dir, config hash) -> the record that settles the run, or None, read in one pass; for
    `configs` only (default: the whole grid), whose records alone are read."""
    configs = grid.unique() if configs is None else configs
    by_dir = {d: records_by_hash(d, {c.config_hash for c in configs if c.results_dir == d})
              for d in {c.results_dir for c in configs}}
    return {(c.results_dir, c.config_hash): settled_record(grid, by_dir[c.results_dir].get(c.config_hash, []))
            for c in configs}


class Unsettled:
    """The grid's runs not settled yet, for a loop that asks again and again (a worker after each run, the
    SLURM parent every POLL_S): a settled run stays settled (records are added, never removed), so only
    the runs not settled at the last look have their records read again, not the whole grid's."""

    def __init__(self, grid: Grid):
        self.grid, self.settled = grid, set()

    def __call__(self) -> list[RunConfig]:
        todo = [c for c in self.grid.unique() if (c.results_dir, c.config_hash) not in self.settled]
        state = grid_state(self.grid, todo)
        self.settled |= {run for run, record in state.items() if record is not None}
        return [c for c in todo if state[(c.results_dir, c.config_hash)] is None]


def collect(grid: Grid) -> tuple[list[dict[str, Any]], list[RunConfig]]:
    """The grid's records in plan order (one per run), and the runs that have none that settles them."""
    state = grid_state(grid)
    records, missing = [], []
    for config in grid.unique():
        record = state[(config.results_dir, config.config_hash)]
        if record is None:
            missing.append(config)
        else:
            records.append(record)
    return records, missing


# --- the worker: the same loop in a process, a spawned process or a SLURM task -----------------------------


def _label(config: RunConfig) -> str:
    return f"{config.optimizer} seed {config.seed}"


def run_worker(grid: Grid, name: str | None = None, visible_devices: str | None = None,
               quiet: bool = False, announce: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Claim and run the grid's unsettled runs until none is left. Returns {"worker", "runs", "interrupted",
    "error"}: it ends early when a run was stopped (`interrupted`) or an attempt met an error (its message
    in `error`), as attempts.py says.

    `visible_devices`: this worker's CUDA_VISIBLE_DEVICES (one GPU per worker), set before CUDA starts.
    Runs held by another live worker are left to it; when every unsettled run is held, the worker waits
    and looks again: a holder that dies leaves a stale lock, and its run is taken over and resumed here.
    """
    if visible_devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible_devices
    from optbench.compare import data_key
    from optbench.console import RichReporter, console
    from optbench.data import load_dataset
    from optbench.experiment import RunBusy, run_experiment
    from optbench.tracking import reporter_factory

    name = name or worker_name()
    os.environ["OPTBENCH_WORKER"] = name  # written into the run locks it takes, for `optbench status`
    say = announce or (lambda text: None if quiet else console.print(f"[dim]{name}[/dim] {text}", soft_wrap=True))
    warn = announce or (lambda text: console.print(f"[dim]{name}[/dim] [yellow]warning:[/yellow] {text}",
                                                   soft_wrap=True))  # shown even when quiet
    make_reporter = reporter_factory(lambda c: RichReporter(f"{name} {c.optimizer} s{c.seed}", quiet=True),
                                     list(grid.track), grid.track_uri)
    datasets: dict[tuple, Any] = {}
    done: dict[str, Any] = {"worker": name, "runs": [], "interrupted": False, "error": None}
    unsettled = Unsettled(grid)
    while True:
        pending = unsettled()
        if not pending:
            return done
        progressed = False
        for config in pending:
            key = data_key(config)

            def settled_now(config=config) -> dict[str, Any] | None:  # asked once the run's lock is held
                return settled_record(grid, records_by_hash(config.results_dir, {config.config_hash},
                                                             warn)[config.config_hash])

            try:
                if key not in datasets:
                    datasets[key] = load_dataset(*key)
                with make_reporter(config) as reporter:
                    record, path = run_experiment(config, reporter, data=datasets[key], resume=not grid.rerun,
                                                  settled=settled_now)
            except RunBusy:
                continue  # another worker holds it
            except OptbenchError as exc:  # an error ends the command (attempts.py): no second attempt here
                done["error"] = str(exc)
                return done
            progressed = True
            if record.get("_reused"):
                continue  # another worker settled it between our reading and our lock
            done["runs"].append(config.config_hash)
            acc = record.get("final_test_acc")
            say(f"{_label(config)}: {record['status']}, test acc " + (f"{acc:.2%}" if acc is not None else "-")
                + f", {record['train_wall_time_s']:.1f}s -> {path}")
            if outcome(record) == "stopped":  # a submitit task then requeues itself (ArrayTask)
                done["interrupted"] = True
                return done
            break  # read the records again: others may have settled runs meanwhile
        if not progressed:
            time.sleep(POLL_S)  # every unsettled run is held by a live worker: wait for them (or their stale locks)


def requeue_if_preempted() -> None:
    """Under submitit, a run stopped by the preemption/time-limit signal has saved its checkpoint: now hand
    the signal to submitit's own handler, which calls our `checkpoint()` and requeues the task."""
    from optbench import interrupt

    handler = interrupt.deferred_handler()
    if handler is not None:
        handler(interrupt.last_stop_signal, None)


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def threads_per_worker(workers: int) -> int:
    """Each of N local workers' torch threads: the cores shared out (at least one each)."""
    return max(1, (os.cpu_count() or 1) // workers)


def _local_task(work: Callable[..., dict[str, Any]], payload: Any, name: str, visible_devices: str | None,
                quiet: bool, results: Any) -> None:
    """One `--workers` process: `work` (run_worker or tune.tune_worker), its result to the parent, and the
    exit code of its outcome (attempts.py). A spawned process does not start in the CLI's `main`: SIGTERM is
    made Ctrl-C here as there, so a signal that finds the worker outside a run (waiting for a run another
    holds, loading data, between trials) stops it too (exit 130), not the signal's default action (a tune
    trial left RUNNING, judged lost) or a KeyboardInterrupt traceback (exit 1, taken for an error)."""
    from optbench.interrupt import sigterm_as_ctrl_c

    sigterm_as_ctrl_c()
    try:
        result = work(payload, name, visible_devices=visible_devices, quiet=quiet)
    except KeyboardInterrupt:
        result = {"worker": name, "interrupted": True, "error": None}
    # The work is over and only its report and the exit remain: a stop signal now (the parent stopping the
    # siblings of a worker that met an error, or Ctrl-C) has nothing to stop, and raising it in the
    # interpreter's exit handlers printed an "Exception ignored ... KeyboardInterrupt" traceback.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    results.put(result)
    raise SystemExit(EXIT_STOPPED if result.get("interrupted") else EXIT_ERROR if result.get("error") else 0)


def run_local_workers(work: Callable[..., dict[str, Any]], payload: Any, count: int, label: str,
                      quiet: bool = False) -> list[int]:
    """`count` spawned processes, worker i running `work(payload, "worker<i>", visible_devices=..., quiet=...)`
    (one GPU each when there are several); waits for all and returns their exit codes. The rule of
    attempts.py: a worker that met an error stops the others (SIGTERM: they save and stop) and this raises
    ExecutorError with its message; 130 is a stopped worker; a negative code a lost one (killed by that
    signal), whose work the caller finishes in its own process.

    Ctrl-C reaches the workers too (same process group): each stops after its step and saves; this
    waits for them instead of leaving orphans."""
    context = multiprocessing.get_context("spawn")
    results = context.SimpleQueue()
    gpus = gpu_count()
    names = [f"worker{i}" for i in range(count)]
    procs = [context.Process(target=_local_task, args=(work, payload, names[i], device_for_worker(i, gpus), quiet,
                                                       results), name=f"optbench-{label}-{i}") for i in range(count)]
    for proc in procs:
        proc.start()
    got: dict[str, dict[str, Any]] = {}
    stopped: set[int] = set()

    def errors_so_far() -> list[str]:
        while not results.empty():
            result = results.get()
            got[result["worker"]] = result
        errors = [got[n]["error"] for n in names if (got.get(n) or {}).get("error")]
        return errors + [f"{n} ended with exit code {p.exitcode} (its traceback is above)" for n, p in zip(names, procs)
                         if p.exitcode not in (None, 0, EXIT_STOPPED) and p.exitcode > 0 and n not in got]

    while True:
        try:
            errors = errors_so_far()
            alive = [p for p in procs if p.is_alive()]
            for proc in alive if errors else ():
                if proc.pid not in stopped:  # once: a second SIGTERM would stop it without a checkpoint
                    stopped.add(proc.pid)
                    proc.terminate()  # SIGTERM: the run in progress stops after its step and saves
            if not alive:
                break
            alive[0].join(timeout=0.5)
        except KeyboardInterrupt:
            continue  # the workers got it too: wait for them to save and stop
    errors = errors_so_far()  # a result put just before its worker ended, after the last look
    if errors:
        raise ExecutorError("; ".join(dict.fromkeys(errors)))
    return [p.exitcode for p in procs]


def device_for_worker(index: int, gpus: int) -> str | None:
    """One GPU per worker, round robin, when there are several; None leaves CUDA_VISIBLE_DEVICES alone."""
    return str(index % gpus) if gpus > 1 else None


# --- SLURM through submitit ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlurmOptions:
    """What a lab writes once in the `slurm:` section of cluster.yaml; command-line options win."""

    partition: str | None = None
    gpus_per_task: int = 1
    cpus_per_task: int | None = None  # also each run's torch threads; None: the threads the plan resolved
    time_min: int = 60  # per array task; a task reaching it is requeued and resumes from its checkpoint
    array_parallelism: int = 16
    mem_gb: int | None = None
    sbatch: tuple[tuple[str, Any], ...] = ()  # extra sbatch settings, e.g. (("account", "lab"), ("qos", "high"))
    setup: tuple[str, ...] = ()  # shell lines run before the task (module load ..., source venv)
    signal_delay_s: int = 120  # USR2 this long before the time limit: the run stops, saves, requeues
    max_requeues: int = 3


SLURM_KEYS = {f for f in SlurmOptions.__dataclass_fields__}


def slurm_options(section: dict[str, Any] | None, overrides: dict[str, Any]) -> SlurmOptions:
    """The `slurm:` section of cluster.yaml with the command line's options over it, checked."""
    raw = dict(section or {})
    unknown = sorted(set(raw) - SLURM_KEYS)
    if unknown:
        raise ConfigError(f"cluster.yaml slurm section: unknown setting(s) {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(SLURM_KEYS))}")
    raw.update({k: v for k, v in overrides.items() if v is not None and v != () and v != {}})
    for key in ("gpus_per_task", "time_min", "array_parallelism", "signal_delay_s", "max_requeues"):
        value = raw.get(key, getattr(SlurmOptions, key))
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key in ("gpus_per_task", "max_requeues") else 1):
            raise ConfigError(f"slurm {key} must be a whole number >= "
                              f"{0 if key in ('gpus_per_task', 'max_requeues') else 1}, got {value!r}")
    for key in ("cpus_per_task", "mem_gb"):
        value = raw.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"slurm {key} must be a whole number >= 1, got {value!r}")
    sbatch = raw.get("sbatch", ())
    if isinstance(sbatch, dict):
        sbatch = tuple(sbatch.items())
    if not all(isinstance(k, str) and k for k, _ in sbatch):
        raise ConfigError("slurm sbatch settings must be KEY: VALUE pairs (e.g. account: mylab)")
    setup = raw.get("setup", ())
    if isinstance(setup, str) or not all(isinstance(line, str) for line in setup):
        raise ConfigError("slurm setup must be a list of shell lines, e.g. [\"module load cuda\"]")
    raw["sbatch"], raw["setup"] = tuple(sbatch), tuple(setup)
    return SlurmOptions(**raw)


def cluster_section() -> dict[str, Any]:
    """The `slurm:` section of cluster.yaml (OPTBENCH_CONFIG_DIR first, then the package's)."""
    from optbench.settings import find_settings_file, read_yaml

    path = find_settings_file("cluster.yaml")
    section = read_yaml(path).get("slurm") if path is not None else None
    if section is not None and not isinstance(section, dict):
        raise ConfigError(f"{path}: the slurm section must be a mapping of settings")
    return section or {}


def slurm_parameters(options: SlurmOptions, tasks: int) -> dict[str, Any]:
    """submitit SlurmExecutor parameters (its names are sbatch's) for an array of `tasks` workers."""
    params: dict[str, Any] = {"time": options.time_min, "nodes": 1, "ntasks_per_node": 1, "job_name": "optbench",
                              "array_parallelism": min(options.array_parallelism, tasks),
                              "signal_delay_s": options.signal_delay_s}
    if options.cpus_per_task:
        params["cpus_per_task"] = options.cpus_per_task
    if options.mem_gb:
        params["mem"] = f"{options.mem_gb}GB"
    if options.partition:
        params["partition"] = options.partition
    if options.gpus_per_task:
        params["gpus_per_task"] = options.gpus_per_task
    if options.sbatch:
        params["additional_parameters"] = dict(options.sbatch)
    if options.setup:
        params["setup"] = list(options.setup)
    return params


def make_submitit_executor(folder: Path, options: SlurmOptions, cluster: str, tasks: int):
    """A submitit executor for one job array of `tasks` worker tasks: `SlurmExecutor`, or `LocalExecutor`
    (the same pickling, signals and requeue machinery, as local processes)."""
    try:
        import submitit
    except ImportError:
        raise ExecutorError("--executor slurm needs submitit: pip install submitit") from None
    if cluster == "slurm":
        try:
            executor = submitit.SlurmExecutor(folder=str(folder), max_num_timeout=options.max_requeues)
        except RuntimeError as exc:  # submitit: 'Could not detect "srun"'
            raise ExecutorError(f"no SLURM here ({exc}): run the command on the cluster's login node, or try the same "
                                "machinery locally with --executor submitit-local") from None
        params = slurm_parameters(options, tasks)
    else:
        executor = submitit.LocalExecutor(folder=str(folder), max_num_timeout=options.max_requeues)
        params = {"timeout_min": options.time_min, "signal_delay_s": min(options.signal_delay_s, options.time_min * 60 - 1)}
        if options.setup:
            params["setup"] = list(options.setup)
    executor.update_parameters(**params)
    return executor


try:
    from submitit.helpers import Checkpointable
except ImportError:  # submitit is a dependency; this keeps `import optbench.executors` cheap to reason about
    Checkpointable = object  # type: ignore[assignment,misc]


def start_submitit_task() -> str:
    """In a submitit task: make its preemption/time-limit signal stop the run in progress first (it saves
    its checkpoint; `requeue_if_preempted` then hands the signal to submitit). Returns the worker's name."""
    import submitit

    from optbench import interrupt

    environment = submitit.JobEnvironment()
    interrupt.defer_to_previous(environment._usr_sig())  # stop and checkpoint first, then submitit's requeue
    os.environ.setdefault("OPTBENCH_JOB_ID", str(environment.job_id))  # shown by `optbench status`
    return f"{environment.job_id}@{socket.gethostname()}"


class ArrayTask(Checkpointable):
    """One array task: `work(payload, name)` -- `run_worker` over a grid, or `tune.tune_worker` on a study.
    Checkpointable: when the task gets submitit's preemption/time-limit signal, the run in progress stops
    after its step and saves its checkpoint (the usual stop path), then the signal goes on to submitit,
    which requeues this same callable; the requeued task claims the run (or the re-queued trial) and
    resumes it. Returns the worker's result ({"interrupted", "error", ...}: attempts.py)."""

    def __call__(self, work: Callable[..., dict[str, Any]], payload: Any, index: int) -> dict[str, Any]:
        result = work(payload, start_submitit_task())
        if result.get("interrupted"):
            requeue_if_preempted()
        return result


def submit_array(target: Any, args_per_task: list[tuple], folder: Path, options: SlurmOptions, cluster: str):
    """Submit one job array (on SLURM; separate local jobs with submitit's local executor)."""
    executor = make_submitit_executor(folder, options, cluster, len(args_per_task))
    jobs = []
    try:
        with executor.batch():
            for args in args_per_task:
                jobs.append(executor.submit(target, *args))
    except Exception as exc:  # sbatch missing or refusing: submitit raises several kinds
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
        raise ExecutorError(f"could not submit the job array ({exc.__class__.__name__}: {first}): check the "
                            "slurm section of cluster.yaml and the --partition/--sbatch options") from None
    return jobs


def held_by_live_worker(config: RunConfig) -> bool:
    from optbench.runlock import lock_is_stale, lock_path, read_lock

    owner = read_lock(lock_path(config.results_dir, config.config_hash))
    return owner is not None and not lock_is_stale(owner)


def run_array(work: Callable[..., dict[str, Any]], payload: Any, todo: int, folder: Path, spec: "ExecutorSpec",
              announce: Callable[[str], None], progress: Callable[[], str], busy: Callable[[], bool] = lambda: False,
              what: str = "run(s)", status_dir: str | Path = "RESULTS") -> None:
    """The one SLURM (or submitit-local) path, compare's and tune's: submit one job array whose tasks each
    run `work(payload, name)` (`ArrayTask`; `--workers N` tasks, else one per item `todo`), add the job ids
    to FOLDER/jobs.json for `optbench status`, then wait for the jobs and while `busy()` (work held by live
    workers of earlier jobs), announcing `progress()`. A task's error cancels the others and raises
    ExecutorError (attempts.py); tasks that failed otherwise are announced, and the caller judges what is
    left from the records or the study. Nothing is submitted when `todo` is 0."""
    jobs = []
    if todo:
        tasks = min(spec.workers, todo) if spec.workers > 1 else todo
        jobs = submit_array(ArrayTask(), [(work, payload, i) for i in range(tasks)], folder,
                            spec.slurm or SlurmOptions(), "slurm" if spec.kind == "slurm" else "local")
        write_job_ids(folder, jobs)
        announce(f"submitted {len(jobs)} task(s) for {todo} {what}: job {array_id(jobs)}; logs in {folder}; "
                 f"`optbench status {status_dir}` shows where they stand")
    try:
        for line in await_jobs(jobs, announce, progress, busy):
            announce(line)
    except KeyboardInterrupt:
        announce(f"stopped waiting; the jobs go on: `optbench status {status_dir}` shows them, and this command run "
                 "again waits for them and carries on (it submits tasks only for what is not settled)")
        raise


def await_jobs(jobs: list, announce: Callable[[str], None], progress: Callable[[], str],
               busy: Callable[[], bool] = lambda: False) -> list[str]:
    """Wait until the jobs are done and nothing is `busy`, announcing `progress()` when it changes; returns
    one line per job that failed. A job whose worker met an error (its result's `error`) ends the wait:
    the other jobs are cancelled (their runs stop and save, as on SIGTERM), waited for, and ExecutorError
    carries the error (attempts.py)."""
    last, errors, cancelled, looked = None, [], False, set()
    while not all(job.done() for job in jobs) or (busy() and not errors):
        for job in jobs:
            if job.job_id not in looked and job.done():
                looked.add(job.job_id)
                result = _job_result(job)
                if isinstance(result, dict) and result.get("error"):
                    errors.append(result["error"])
        if errors and not cancelled:
            cancelled = True
            for job in jobs:
                if not job.done():
                    job.cancel(check=False)
        line = progress()
        if line != last:
            last = line
            announce(f"{line}; jobs {', '.join(j.job_id for j in jobs)}")
        time.sleep(POLL_S)
    for job in jobs:
        if job.job_id not in looked:
            result = _job_result(job)
            if isinstance(result, dict) and result.get("error"):
                errors.append(result["error"])
    if errors:
        raise ExecutorError("; ".join(dict.fromkeys(errors)))
    failures = []
    for job in jobs:
        state = job.state
        if state not in ("FINISHED", "COMPLETED"):
            try:
                job.result()
            except Exception as exc:
                failures.append(f"job {job.job_id}: {state}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else exc}")
    return failures


def _job_result(job) -> Any:
    try:
        return job.result()
    except Exception:  # failed or lost: reported by await_jobs from its state
        return None


# --- the dispatcher --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExecutorSpec:
    kind: str = "local"
    workers: int = 1
    slurm: SlurmOptions | None = None

    def check(self) -> None:
        if self.kind not in EXECUTORS:
            raise ConfigError(f"unknown --executor '{self.kind}': choose local, slurm or submitit-local")
        if self.workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {self.workers}")

    def target_device(self, requested: str | None) -> str | None:
        """The device runs get on SLURM nodes: the one asked for, else CUDA when tasks get GPUs."""
        if self.kind != "slurm":
            return None
        if requested in ("cpu", "cuda"):
            return requested
        return "cuda" if (self.slurm or SlurmOptions()).gpus_per_task else "cpu"


def slurm_spec(kind: str, overrides: dict[str, Any]) -> SlurmOptions | None:
    """The SLURM options for a submitit executor (cluster.yaml, then the command line); None otherwise."""
    if kind not in ("slurm", "submitit-local"):
        given = [k for k, v in overrides.items() if v not in (None, (), {})]
        if given:
            raise ConfigError(f"--slurm-{given[0].replace('_', '-')} applies to --executor slurm (or submitit-local)")
        return None
    return slurm_options(cluster_section(), overrides)


def plan_threads(spec: ExecutorSpec, requested: int | None) -> int | None:
    """The torch threads each run gets (part of its identity): asked for, or what its worker has --
    cores/N for N local workers, cpus_per_task (default 1) for a SLURM task; None: this process's count."""
    if requested is not None:
        return requested
    if spec.kind == "slurm":
        return (spec.slurm or SlurmOptions()).cpus_per_task or 1
    if spec.workers > 1:
        return threads_per_worker(spec.workers)
    return None


def execute(grid: Grid, spec: ExecutorSpec, make_reporter: Callable[[RunConfig], Any],
            announce: Callable[[str], None], quiet: bool = False, datasets: dict[tuple, Any] | None = None
            ) -> tuple[list[dict[str, Any]], bool]:
    """Run the grid's unsettled runs with the chosen executor. Returns (its records in plan order,
    whether a run was interrupted: then the records are those that exist). Raises ExecutorError when
    the workers ended with runs unsettled."""
    from optbench.compare import run_comparison

    spec.check()
    from optbench.status import record_plan

    for results_dir in grid.results_dirs:  # for `optbench status`: what was planned, beside what exists
        record_plan(results_dir, [{"config_hash": c.config_hash, "optimizer": c.optimizer, "seed": c.seed}
                                  for c in grid.unique() if c.results_dir == results_dir])
    if spec.kind == "local" and spec.workers == 1:
        records = run_comparison(list(grid.configs), grid.rerun, make_reporter, announce, datasets)
        return records, any(outcome(r) == "stopped" for r in records)
    records, pending = collect(grid)
    if not pending:
        for record in records:
            announce(f"{_label_of(record)}: reusing {record['_path']} ({record['status']})")
        return records, False
    announce(f"{len(pending)} of {len(grid.unique())} runs to do, {len(grid.unique()) - len(pending)} reused")
    interrupted = False
    if spec.kind == "local":
        codes = run_local_workers(run_worker, grid, min(spec.workers, len(pending)), "compare", quiet)
        interrupted = any(c == EXIT_STOPPED for c in codes)
        if any(c not in (0, EXIT_STOPPED) for c in codes):
            announce(f"worker exit codes {codes}: finishing what they left in this process")
    else:
        free = [c for c in pending if not held_by_live_worker(c)]  # the rest run in jobs submitted earlier
        if not free:
            announce(f"all {len(pending)} runs to do are held by live workers (earlier jobs): waiting for them")
        unsettled = Unsettled(grid)  # polled every POLL_S: the settled runs' records are not read again
        run_array(run_worker, grid, len(free), Path(grid.configs[0].results_dir) / "slurm", spec, announce,
                  progress=lambda: f"{len(grid.unique()) - len(unsettled())}/{len(grid.unique())} runs settled",
                  busy=lambda: any(held_by_live_worker(c) for c in unsettled()), what="run(s)",
                  status_dir=grid.configs[0].results_dir)
    if not interrupted and spec.kind == "local":
        # A worker killed outright (SIGKILL, OOM killer) left its run: finish it here. Not for submitit
        # executors: the parent may be on a login node, where nothing should train.
        result = run_worker(grid, f"{worker_name()} (parent)", quiet=quiet, announce=announce)
        if result["error"]:
            raise ExecutorError(result["error"])
        interrupted = result["interrupted"]
    records, missing = collect(grid)
    if missing and not interrupted:
        raise ExecutorError(f"{len(missing)} run(s) did not finish: {', '.join(_label(c) for c in missing)}; "
                            "run the same command again to resume them")
    return records, interrupted


def _label_of(record: dict[str, Any]) -> str:
    return f"{record['optimizer']} seed {record['config'].get('seed')}"


def array_id(jobs: list) -> str:
    ids = sorted({str(j.job_id).split("_")[0] for j in jobs})
    return ", ".join(ids)


def write_job_ids(folder: Path, jobs: list) -> None:
    """Job ids for `optbench status` (the records and locks say the rest)."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "jobs.json"
    try:
        known = json.loads(path.read_text()) if path.exists() else []
    except (OSError, ValueError):
        known = []
    known.append({"submitted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "jobs": [str(j.job_id) for j in jobs]})
    path.write_text(json.dumps(known, indent=1))


__all__ = ["EXECUTORS", "ExecutorError", "ExecutorSpec", "Grid", "SlurmOptions", "collect", "execute",
           "run_worker", "slurm_options", "cluster_section"]
