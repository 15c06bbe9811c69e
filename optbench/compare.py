"""`compare`: every optimizer x every seed on one workload, reusing runs that already have a record."""

from __future__ import annotations

import time
from statistics import mean
from typing import Any, Callable

from optbench.attempts import outcome
from optbench.config import RunConfig, resolve_config
from optbench.console import duration_text
from optbench.data import ImageData, load_dataset
from optbench.experiment import RunBusy, resolve_runtime, run_experiment
from optbench.records import find_finished, finished_runs


def plan_runs(preset: str, optimizers: list[str], seeds: list[int], overrides: dict[str, Any],
              hparams: dict[str, dict[str, Any]] | None = None, elsewhere: bool = False,
              target_device: str | None = None) -> list[RunConfig]:
    """One resolved config per (optimizer, seed): same workload, each optimizer's own hyperparameters
    (its defaults, or `hparams[optimizer]` over them: the settings `tune` chose). `elsewhere`: the runs
    execute on other machines (SLURM), so device and precision are resolved for `target_device`, not
    for this one."""
    configs = [resolve_runtime(resolve_config(opt, preset, {**overrides, "seed": seed}, (hparams or {}).get(opt)),
                               target_device if elsewhere else None)
               for seed in seeds for opt in optimizers]
    # `--optimizers adamw,adamw` or `--seeds 0,0` name one run twice: it is one run, trained once, counted once.
    unique = {(c.results_dir, c.config_hash): c for c in reversed(configs)}
    return [c for c in configs if unique[(c.results_dir, c.config_hash)] is c]


def data_key(config: RunConfig) -> tuple:
    """Runs with equal keys train and evaluate on the same loaded dataset."""
    return (config.dataset, config.data_dir, config.download, config.subset, config.test_subset)


HELD_POLL_S = 2.0  # how often a run another live process holds is asked for again (as the workers do)


def run_comparison(configs: list[RunConfig], rerun: bool, make_reporter: Callable[[RunConfig], Any],
                   announce: Callable[[str], None], datasets: dict[tuple, ImageData] | None = None
                   ) -> list[dict[str, Any]]:
    """Run what has no finished record (ok or diverged) yet, or everything with `rerun`: the serial executor,
    following attempts.py's rule as the workers do. Returns the records in plan order.

    A run that was interrupted or killed has no finished record: it continues from its checkpoint, so
    a killed comparison resumes where it stopped; an out-of-memory run is tried again. A run another
    live process holds is left to it and, once the others are done, waited for as the workers wait: its
    record is reused when the holder finishes it, and the run is taken over here when the holder stops or
    dies, so the report never lacks it. The dataset is loaded once and shared by all runs (`datasets` may
    hold it already). The records read
    at the start only spare loading data for runs already done; whether a run is trained is decided
    again under its lock (`claim_run`), so a run another process finished meanwhile is reused, not retrained.
    """
    records: dict[int, dict[str, Any]] = {}  # plan position -> record
    trained_seconds: dict[str, list[float]] = {}  # optimizer -> wall-times of its runs trained here
    datasets = dict(datasets or {})  # data_key -> dataset already loaded (e.g. to estimate the time)
    finished: dict[str, dict[str, dict[str, Any]]] = {}  # results dir -> config hash -> record, read once

    def attempt(i: int, config: RunConfig, label: str) -> dict[str, Any] | None:
        """The run's record (reused, or trained here), or None while another live process holds it."""
        key = data_key(config)
        if key not in datasets:
            datasets[key] = load_dataset(config.dataset, config.data_dir, config.download, config.subset,
                                         config.test_subset)
        started = time.perf_counter()
        try:
            # the look under the run's lock, silent: the look above named every file it skipped
            settled = None if rerun else (lambda c=config: find_finished(c.results_dir, c.config_hash))
            with make_reporter(config) as reporter:
                record, path = run_experiment(config, reporter, data=datasets[key], resume=not rerun,
                                              settled=settled)
        except RunBusy:
            return None
        if record.get("_reused"):  # another process finished it after the records above were read
            announce(f"{label}: reusing {record['_path']} ({record['status']}), finished meanwhile by another process")
            return record
        trained_seconds.setdefault(config.optimizer, []).append(time.perf_counter() - started)
        record["_path"] = str(path)
        to_train = [c.optimizer for c in configs[i:]
                    if rerun or c.config_hash not in finished.get(c.results_dir, {})]
        left = remaining_seconds(trained_seconds, to_train)
        announce(f"{label}: {record['status']}, test acc "
                 + (f"{record['final_test_acc']:.2%}" if record["final_test_acc"] is not None else "-")
                 + f", {record['train_wall_time_s']:.1f}s -> {path}"
                 + (f"; ETA {duration_text(left)} for the {len(to_train)} run(s) still to train" if to_train else ""))
        return record

    def ordered() -> list[dict[str, Any]]:
        return [records[i] for i in sorted(records)]

    held: dict[int, tuple[RunConfig, str]] = {}  # plan position -> a run another live process holds
    for i, config in enumerate(configs, 1):
        label = f"[{i}/{len(configs)}] {config.optimizer} seed {config.seed}"
        if not rerun and config.results_dir not in finished:
            finished[config.results_dir] = finished_runs(config.results_dir,
                                                         skipped=lambda problem: announce(f"skipped: {problem}"))
        existing = None if rerun else finished[config.results_dir].get(config.config_hash)
        if existing is not None:
            announce(f"{label}: reusing {existing['_path']} ({existing['status']})")
            records[i] = existing
            continue
        record = attempt(i, config, label)
        if record is None:
            announce(f"{label}: held by another live process ({config.config_hash}); waiting for it once the other "
                     "runs are done")
            held[i] = (config, label)
            continue
        records[i] = record
        if outcome(record) == "stopped":  # attempts.py: a stop ends the command; an error raised ends it too
            return ordered()
    if held:
        announce(f"waiting for {len(held)} run(s) other live processes hold: their records are reused when they "
                 "finish, a run whose holder stops or dies is taken over here (Ctrl-C stops waiting)")
    while held:
        time.sleep(HELD_POLL_S)
        for i, (config, label) in list(held.items()):
            record = attempt(i, config, label)
            if record is None:
                continue
            del held[i]
            records[i] = record
            if outcome(record) == "stopped":
                return ordered()
    return ordered()


def remaining_seconds(trained_seconds: dict[str, list[float]], to_train: list[str]) -> float:
    """Wall-time the runs still to train will take, from the runs trained so far: each at the mean time of
    its own optimizer's runs (Sophia's Hessian steps make its runs longer), or of all runs if none of its
    optimizer has run yet."""
    overall = mean(t for times in trained_seconds.values() for t in times)
    return sum(mean(trained_seconds[name]) if name in trained_seconds else overall for name in to_train)


def runs_to_train(configs: list[RunConfig], rerun: bool) -> list[RunConfig]:
    """The configs without a finished record (all with `rerun`): what a comparison will train."""
    if rerun:
        return list(configs)
    finished: dict[str, dict[str, dict[str, Any]]] = {}
    out = []
    for config in configs:
        if config.results_dir not in finished:
            finished[config.results_dir] = finished_runs(config.results_dir)
        if config.config_hash not in finished[config.results_dir]:
            out.append(config)
    return out
