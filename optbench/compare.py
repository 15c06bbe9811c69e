"""`compare`: every optimizer x every seed on one workload, reusing runs that already have a record."""

from __future__ import annotations

from typing import Any, Callable

from optbench.config import RunConfig, resolve_config
from optbench.data import ImageData, load_dataset
from optbench.experiment import RunBusy, resolve_runtime, run_experiment
from optbench.records import finished_runs


def plan_runs(preset: str, optimizers: list[str], seeds: list[int], overrides: dict[str, Any],
              hparams: dict[str, dict[str, Any]] | None = None) -> list[RunConfig]:
    """One resolved config per (optimizer, seed): same workload, each optimizer's own hyperparameters
    (its defaults, or `hparams[optimizer]` over them: the settings `tune` chose)."""
    configs = [resolve_runtime(resolve_config(opt, preset, {**overrides, "seed": seed}, (hparams or {}).get(opt)))
               for seed in seeds for opt in optimizers]
    # `--optimizers adamw,adamw` or `--seeds 0,0` name one run twice: it is one run, trained once, counted once.
    unique = {(c.results_dir, c.config_hash): c for c in reversed(configs)}
    return [c for c in configs if unique[(c.results_dir, c.config_hash)] is c]


def run_comparison(configs: list[RunConfig], rerun: bool, make_reporter: Callable[[RunConfig], Any],
                   announce: Callable[[str], None]) -> list[dict[str, Any]]:
    """Run what has no finished record (ok or diverged) yet, or everything with `rerun`.

    A run that was interrupted or killed has no finished record: it continues from its checkpoint, so
    a killed comparison resumes where it stopped; an out-of-memory run is tried again. A run another
    live process holds is skipped. The dataset is loaded once and shared by all runs. The records read
    at the start only spare loading data for runs already done; whether a run is trained is decided
    again under its lock (`claim_run`), so a run another process finished meanwhile is reused, not retrained.
    """
    records = []
    datasets: dict[tuple, ImageData] = {}
    finished: dict[str, dict[str, dict[str, Any]]] = {}  # results dir -> config hash -> record, read once
    for i, config in enumerate(configs, 1):
        label = f"[{i}/{len(configs)}] {config.optimizer} seed {config.seed}"
        if not rerun and config.results_dir not in finished:
            finished[config.results_dir] = finished_runs(config.results_dir)
        existing = None if rerun else finished[config.results_dir].get(config.config_hash)
        if existing is not None:
            announce(f"{label}: reusing {existing['_path']} ({existing['status']})")
            records.append(existing)
            continue
        key = (config.dataset, config.data_dir, config.download, config.subset, config.test_subset)
        if key not in datasets:
            datasets[key] = load_dataset(config.dataset, config.data_dir, config.download, config.subset,
                                         config.test_subset)
        try:
            with make_reporter(config) as reporter:
                record, path = run_experiment(config, reporter, data=datasets[key], resume=not rerun)
        except RunBusy as exc:
            announce(f"{label}: skipped, {exc}")
            continue
        if record.get("_reused"):  # another process finished it after the records above were read
            announce(f"{label}: reusing {record['_path']} ({record['status']}), finished meanwhile by another process")
            records.append(record)
            continue
        record["_path"] = str(path)
        announce(f"{label}: {record['status']}, test acc "
                 + (f"{record['final_test_acc']:.2%}" if record["final_test_acc"] is not None else "-")
                 + f", {record['train_wall_time_s']:.1f}s -> {path}")
        records.append(record)
        if record["status"] == "interrupted":
            break
    return records
