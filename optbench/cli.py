"""The `optbench` command line. Commands parse, call the library, print; nothing else lives here.

Heavy imports (torch, timm) happen inside commands so `optbench --help` answers at once.
Exit codes: 0 ok, 1 bad input or unusable environment, 2 usage error, 3 a run diverged or ran out of
memory, 4 a criterion failed under --strict, 130 interrupted.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from optbench.errors import OptbenchError
from optbench.models import ALIASES, DEFAULT_MODEL, model_names

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Benchmark AdamW, Lion, Sophia, Schedule-Free and newer optimizers on ViT-Tiny "
                       "(or ResNet-18), honestly measured.")

EXIT_RUN_FAILED, EXIT_CRITERIA, EXIT_INTERRUPTED = 3, 4, 130


@app.callback()
def _root() -> None:
    """Benchmark AdamW, Lion, Sophia, Schedule-Free and newer optimizers on ViT-Tiny (or ResNet-18), honestly
    measured."""


def fail(message: str, code: int = 1) -> None:
    from rich.markup import escape

    from optbench.console import console

    console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)  # escape: "optbench[wandb]" is no markup
    raise typer.Exit(code)


def parse_opt_args(items: list[str], option: str = "--opt") -> dict[str, Any]:
    from optbench.config import parse_value

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            example = "--opt p=0.02" if option == "--opt" else f"{option} account=mylab"
            fail(f"{option} expects KEY=VALUE (e.g. {example}), got '{item}'")
        out[key.strip()] = parse_value(value)
    return out


YES_HELP = "start a CIFAR run on a CPU (hours) without asking; the time estimate is still measured and printed"


def _stdin_is_tty() -> bool:
    return sys.stdin.isatty()


def confirm_long_run(configs: list, data: Any, yes: bool, note: str = "") -> None:
    """CIFAR on a CPU runs for hours: time a few real steps per optimizer, print the estimate for the
    planned runs, and go on only with --yes or a "yes" typed at a terminal. Without a terminal (a script,
    CI) and without --yes: one line saying to pass --yes, exit 1. Nothing is trained or written before."""
    from optbench.console import console
    from optbench.estimate import estimate_plan, needs_confirmation

    long_runs = [c for c in configs if needs_confirmation(c)]
    if not long_runs:
        return
    console.print(f"[dim]{len(long_runs)} CIFAR run(s) on a CPU: timing a few real training steps per optimizer "
                  "to estimate how long they take...[/dim]", soft_wrap=True)
    sentence = estimate_plan(long_runs, data).sentence() + note
    if yes:
        console.print(f"{sentence}; starting (--yes)", soft_wrap=True)
        return
    if not _stdin_is_tty():
        fail(f"{sentence}: not started without a terminal to confirm it; pass --yes to start it anyway "
             "(or use a GPU, or --preset smoke)")
    console.print(sentence, soft_wrap=True)
    if not typer.confirm("Start?", default=False, err=True):
        fail("not started (pass --yes to start without asking)")


TRACK_HELP = ("also log live to tensorboard, mlflow or wandb (repeatable; each needs its extra, "
              "e.g. pip install 'optbench[wandb]'; W&B runs offline unless WANDB_MODE=online)")
MODEL_HELP = (f"the model: {' or '.join(model_names())} (aliases {', '.join(ALIASES)}), or any timm ViT name "
              f"(default: the preset's, {DEFAULT_MODEL})")
TRACK_URI_HELP = "MLflow tracking URI (default: sqlite:///RESULTS/mlflow.db)"
THREADS_HELP = ("torch CPU threads per run; part of the run's identity, since they change the numbers "
                "(default: this process's count; with --workers N on a CPU, cores/N)")
EXECUTOR_HELP = ("where runs execute: local (this process, or --workers N processes), slurm (one submitit job "
                 "array; settings from cluster.yaml's slurm section and the --slurm-* options) or "
                 "submitit-local (the same submission and requeue machinery as local processes)")
WORKERS_HELP = ("worker processes (local: on this machine, one GPU each when there are several; slurm: array "
                "tasks, default one per run to do)")


# compare's and tune's executor options: one definition each, shared by both commands
EXECUTOR_OPTION = typer.Option("local", help=EXECUTOR_HELP)
WORKERS_OPTION = typer.Option(1, help=WORKERS_HELP)
SLURM_PARTITION_OPTION = typer.Option(None, help="SLURM partition (default: cluster.yaml's)")
SLURM_GPUS_OPTION = typer.Option(None, help="GPUs per array task (default 1)")
SLURM_CPUS_OPTION = typer.Option(None, help="CPUs per array task, also each run's threads")
SLURM_TIME_OPTION = typer.Option(None, help="time limit per task in minutes; a task reaching it saves its run's "
                                 "checkpoint and is requeued (default 60)")
SLURM_PARALLELISM_OPTION = typer.Option(None, help="array tasks running at once (default 16)")
SLURM_SBATCH_OPTION = typer.Option([], "--slurm-sbatch", help="extra sbatch setting KEY=VALUE, e.g. account=mylab "
                                   "(repeatable)")


# compare's and tune's workload options (run's say more about its defaults): one definition each
PRESET_OPTION = typer.Option("smoke", help="workload preset from optbench/configs/presets (smoke, cifar10, homework, ...)")
DATASET_OPTION = typer.Option(None, help="override the preset's dataset")
EPOCHS_OPTION = typer.Option(None, help="override the preset's epochs (matched for all)")
BATCH_SIZE_OPTION = typer.Option(None, help="override the preset's batch size")
DEPTH_OPTION = typer.Option(None, help="override the ViT depth (ViTs only)")
PRECISION_OPTION = typer.Option(None, help="auto, fp32 or bf16")
DATA_DIR_OPTION = typer.Option(None, help="folder holding the datasets")
# ... and those run shares with them
SUBSET_OPTION = typer.Option(None, help="train on a fixed class-balanced subset of N images")
TEST_SUBSET_OPTION = typer.Option(None, help="evaluate on a fixed class-balanced subset")
MODEL_OPTION = typer.Option(None, help=MODEL_HELP)
DEVICE_OPTION = typer.Option(None, help="auto, cpu or cuda")
DOWNLOAD_OPTION = typer.Option(None, "--download/--no-download", help="download missing datasets")
THREADS_OPTION = typer.Option(None, help=THREADS_HELP)
YES_OPTION = typer.Option(False, "--yes", "-y", help=YES_HELP)
TRACK_URI_OPTION = typer.Option(None, "--track-uri", help=TRACK_URI_HELP)
# The workload options as compare and tune pass them on (config overrides; None: the preset's).
WORKLOAD_OPTIONS = ("dataset", "epochs", "batch_size", "subset", "test_subset", "model", "depth", "device",
                    "precision", "data_dir", "download")

# the report's options, in compare, tune and report
MARGIN_OPTION = typer.Option(1.0, help="accuracy non-inferiority margin of the statistical reading, in "
                             "percentage points (0: a superiority-or-equal test)")
STRICT_OPTION = typer.Option(False, "--strict", help="exit 4 unless the memory criterion and the accuracy "
                             "reading(s) chosen by --rule pass")
RULE_OPTION = typer.Option("both", help="accuracy reading --strict enforces: literal (the course's rule as "
                           "written: mean accuracy >= AdamW's), statistical (non-inferiority within --margin, "
                           "95% lower bound) or both")


def executor_spec(options: dict[str, Any]) -> Any:
    """The checked ExecutorSpec of compare's and tune's executor options (`options`: the command's
    parameters; cluster.yaml's slurm section under the --slurm-* ones)."""
    from optbench.executors import ExecutorSpec, slurm_spec

    executor = options["executor"]
    spec = ExecutorSpec(executor, options["workers"], slurm_spec(executor, dict(
        partition=options["slurm_partition"], gpus_per_task=options["slurm_gpus_per_task"],
        cpus_per_task=options["slurm_cpus_per_task"], time_min=options["slurm_time_min"],
        array_parallelism=options["slurm_array_parallelism"],
        sbatch=tuple(parse_opt_args(options["slurm_sbatch"], "--slurm-sbatch").items()))))
    spec.check()
    return spec


def workload_overrides(options: dict[str, Any], spec: Any, results_dir: str) -> dict[str, Any]:
    """compare's and tune's workload options (`options`: the command's parameters) as config overrides,
    with the results folder and the threads each run gets from `spec`'s executor."""
    from optbench.executors import plan_threads

    return run_overrides(**{name: options[name] for name in WORKLOAD_OPTIONS}, results_dir=results_dir,
                         threads=plan_threads(spec, options["threads"]))


def checked_margin(margin: float, rule: str = "both") -> float:
    """--margin as a fraction, with --rule checked too: bad input ends in one line (exit 1) before anything
    runs or is read."""
    from optbench.analysis import RULES
    from optbench.config import margin_fraction

    try:
        fraction = margin_fraction(margin)
    except OptbenchError as exc:
        fail(str(exc), exc.exit_code)
    if rule not in RULES:
        fail(f"--rule must be one of {', '.join(RULES)}, got '{rule}'")
    return fraction


def run_overrides(**kwargs: Any) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if v is not None}


@app.command()
def run(
    optimizer: str = typer.Option(..., "--optimizer", "-o", help="an optimizer of the registry: adamw, lion, sophia, "
                                  "schedulefree, muon, ... (`optbench optimizers` lists them)"),
    preset: str = typer.Option("cifar10", help="a preset from optbench/configs/presets (smoke, cifar10, homework, ...)"),
    dataset: Optional[str] = typer.Option(None, help="cifar10, cifar100, fashion_mnist, digits or synthetic"),
    epochs: Optional[int] = typer.Option(None, help="training epochs"),
    batch_size: Optional[int] = typer.Option(None, help="training batch size"),
    lr: Optional[float] = typer.Option(None, help="learning rate (default: the optimizer's course value)"),
    weight_decay: Optional[float] = typer.Option(None, help="weight decay (default: the course value)"),
    opt: list[str] = typer.Option([], "--opt", help="other optimizer hyperparameter, KEY=VALUE (repeatable)"),
    seed: Optional[int] = typer.Option(None, help="seed for weights, batch order and augmentation"),
    subset: Optional[int] = SUBSET_OPTION,
    test_subset: Optional[int] = TEST_SUBSET_OPTION,
    model: Optional[str] = MODEL_OPTION,
    depth: Optional[int] = typer.Option(None, help="override the ViT depth (smaller = faster, not ViT-Tiny)"),
    device: Optional[str] = DEVICE_OPTION,
    precision: Optional[str] = typer.Option(None, help="auto (bf16 on CUDA, fp32 on CPU), fp32 or bf16"),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the model"),
    threads: Optional[int] = THREADS_OPTION,
    data_dir: Optional[str] = typer.Option(None, help="folder holding the datasets (default ./data)"),
    download: Optional[bool] = DOWNLOAD_OPTION,
    results_dir: Optional[str] = typer.Option(None, help="where run records go (default results/PRESET)"),
    resume: bool = typer.Option(False, "--resume", help="continue this run from its checkpoint, if it has one"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the resolved config as JSON and stop"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress output (warnings and errors only)"),
    yes: bool = YES_OPTION,
    track: list[str] = typer.Option([], "--track", help=TRACK_HELP),
    track_uri: Optional[str] = TRACK_URI_OPTION,
) -> None:
    """Train a model (ViT-Tiny unless --model says otherwise) with one optimizer and write a run record."""
    from optbench.config import resolve_config
    from optbench.console import RichReporter, console, run_summary
    from optbench.experiment import resolve_runtime, run_experiment
    from optbench.tracking import check_trackers, reporter_factory

    hparams = parse_opt_args(opt)
    if lr is not None:
        hparams["lr"] = lr
    if weight_decay is not None:
        hparams["weight_decay"] = weight_decay
    try:
        config = resolve_config(optimizer, preset, run_overrides(
            dataset=dataset, epochs=epochs, batch_size=batch_size, seed=seed, subset=subset,
            test_subset=test_subset, model=model, depth=depth, device=device, precision=precision, compile=compile,
            threads=threads, data_dir=data_dir, download=download, results_dir=results_dir or f"results/{preset}"),
            hparams)
        if dry_run:
            config = resolve_runtime(config)
            typer.echo(json.dumps({"config_hash": config.config_hash, **config.to_dict()}, indent=2))
            return
        make_reporter = reporter_factory(lambda c: RichReporter(optimizer, quiet=quiet),
                                         check_trackers(track, track_uri), track_uri)
        with make_reporter(config) as reporter:
            record, path = run_experiment(config, reporter, resume=resume,
                                          before_training=lambda data: confirm_long_run([config], data, yes))
    except OptbenchError as exc:
        fail(str(exc), exc.exit_code)
    console.print(run_summary(record, path), soft_wrap=True)
    if record["status"] == "interrupted":
        raise typer.Exit(EXIT_INTERRUPTED)
    if record["status"] != "ok":
        raise typer.Exit(EXIT_RUN_FAILED)


def _csv_list(text: str, what: str, cast=str) -> list:
    try:
        items = [cast(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        fail(f"{what} must be a comma-separated list, e.g. 0,1,2; got '{text}'")
    if not items:
        fail(f"{what} must not be empty")
    return items


@app.command()
def compare(
    ctx: typer.Context,
    preset: str = PRESET_OPTION,
    optimizers: Optional[str] = typer.Option(None, help="comma-separated optimizers, or 'all' (default: the course's "
                                             "four, adamw,lion,sophia,schedulefree)"),
    seeds: Optional[str] = typer.Option(None, help="comma-separated seeds (default: the preset's)"),
    dataset: Optional[str] = DATASET_OPTION,
    epochs: Optional[int] = EPOCHS_OPTION,
    batch_size: Optional[int] = BATCH_SIZE_OPTION,
    subset: Optional[int] = SUBSET_OPTION,
    test_subset: Optional[int] = TEST_SUBSET_OPTION,
    model: Optional[str] = MODEL_OPTION,
    depth: Optional[int] = DEPTH_OPTION,
    device: Optional[str] = DEVICE_OPTION,
    precision: Optional[str] = PRECISION_OPTION,
    data_dir: Optional[str] = DATA_DIR_OPTION,
    download: Optional[bool] = DOWNLOAD_OPTION,
    results_dir: Optional[str] = typer.Option(None, help="where records and the report go (default results/PRESET)"),
    rerun: bool = typer.Option(False, "--rerun", help="run again even where a finished record exists"),
    margin: float = MARGIN_OPTION,
    strict: bool = STRICT_OPTION,
    rule: str = RULE_OPTION,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
    yes: bool = YES_OPTION,
    track: list[str] = typer.Option([], "--track", help=TRACK_HELP),
    track_uri: Optional[str] = TRACK_URI_OPTION,
    threads: Optional[int] = THREADS_OPTION,
    executor: str = EXECUTOR_OPTION,
    workers: int = WORKERS_OPTION,
    slurm_partition: Optional[str] = SLURM_PARTITION_OPTION,
    slurm_gpus_per_task: Optional[int] = SLURM_GPUS_OPTION,
    slurm_cpus_per_task: Optional[int] = SLURM_CPUS_OPTION,
    slurm_time_min: Optional[int] = SLURM_TIME_OPTION,
    slurm_array_parallelism: Optional[int] = SLURM_PARALLELISM_OPTION,
    slurm_sbatch: list[str] = SLURM_SBATCH_OPTION,
) -> None:
    """Run every optimizer x seed on one workload (reusing finished runs) and report the comparison."""
    from optbench.compare import data_key, plan_runs, runs_to_train
    from optbench.config import preset_seeds
    from optbench.data import load_dataset
    from optbench.estimate import needs_confirmation
    from optbench.console import RichReporter, console, show_report
    from optbench.executors import Grid, execute
    from optbench.records import utc_now
    from optbench.tracking import check_trackers, reporter_factory

    from optbench.optimizers import select

    results = results_dir or f"results/{preset}"
    try:
        names = select(optimizers)
        seed_list = _csv_list(seeds, "--seeds", int) if seeds else preset_seeds(preset)
        if any(not 0 <= s < 2**31 for s in seed_list):
            fail("--seeds must be whole numbers in [0, 2**31)")
        margin_frac = checked_margin(margin, rule)
        spec = executor_spec(ctx.params)
        since = utc_now()
        configs = plan_runs(preset, names, seed_list, workload_overrides(ctx.params, spec, results),
                            elsewhere=spec.kind == "slurm", target_device=spec.target_device(device))
        trackers = check_trackers(track, track_uri)
        make_reporter = reporter_factory(lambda c: RichReporter(f"{c.optimizer} s{c.seed}", quiet=quiet),
                                         trackers, track_uri)
        datasets = {}
        long_runs = [c for c in runs_to_train(configs, rerun) if needs_confirmation(c) and spec.kind != "slurm"]
        if long_runs:  # the runs still to train, timed on their data before the first one starts
            first = long_runs[0]
            datasets[data_key(first)] = load_dataset(first.dataset, first.data_dir, first.download, first.subset,
                                                     first.test_subset)
            confirm_long_run(long_runs, datasets[data_key(first)], yes)
        records, interrupted = execute(Grid(tuple(configs), rerun, since, tuple(trackers), track_uri), spec,
                                       make_reporter, lambda text: console.print(text, soft_wrap=True), quiet,
                                       datasets)
        from optbench.report import build_report  # pandas: only once the runs are done, not before the first step

        report = build_report(records, Path(results), margin=margin_frac, expected_optimizers=names)
    except OptbenchError as exc:
        fail(str(exc), exc.exit_code)
    show_report(report)
    if interrupted:
        raise typer.Exit(EXIT_INTERRUPTED)
    _enforce_strict(report, strict, rule)


def _enforce_strict(report: Any, strict: bool, rule: str) -> None:
    """--strict: say which rule is enforced and its outcome, then exit 4 unless it passes."""
    if not strict:
        return
    from optbench.console import console

    passed = report.strict_passed(rule)
    console.print(("[green]" if passed else "[red]") + report.strict_text(rule) + ("[/green]" if passed else "[/red]"),
                  soft_wrap=True)
    if not passed:
        raise typer.Exit(EXIT_CRITERIA)


def _confirm_long_tune(plan: Any, final_seeds: int, yes: bool) -> None:
    """`confirm_long_run` for a tuning plan on CIFAR on a CPU: every trial of the budget (on the training
    split minus the validation share) and the final runs (defaults and tuned settings, `final_seeds` each),
    at most: trials and runs already finished are reused, so a resumed tune takes less."""
    from optbench.data import load_dataset
    from optbench.estimate import needs_confirmation

    bases = [spec.base for spec in plan.studies if needs_confirmation(spec.base)]
    if not bases:
        return
    finals = [dataclasses.replace(b, validation_fraction=0.0) for b in bases] * (2 * final_seeds)
    first = bases[0]
    data = load_dataset(first.dataset, first.data_dir, first.download, first.subset, first.test_subset)
    confirm_long_run(bases * plan.budget + finals, data, yes,
                     note=f" for {plan.budget} trial(s) per optimizer and {2 * final_seeds} final run(s) each, at most "
                          "(finished trials and runs are reused)")


@app.command()
def tune(
    ctx: typer.Context,
    preset: str = PRESET_OPTION,
    optimizers: str = typer.Option("adamw,lion,sophia,schedulefree", help="comma-separated optimizers"),
    trials: int = typer.Option(12, help="trials per optimizer, the same for all (trial 1 is the defaults)"),
    space: str = typer.Option("grid", help="grid (the YAML grids, 12 points) or sobol (one seeded scrambled "
                                           "Sobol sequence in each optimizer's ranges)"),
    final_seeds: int = typer.Option(3, help="fresh seeds for the final runs on the test split (0: trials only, "
                                            "e.g. for extra workers on a cluster)"),
    validation: float = typer.Option(0.1, help="share of the training set held out to score trials on"),
    seed: int = typer.Option(1000, help="trials' seed and Sobol seed; the final runs use other seeds (compare's)"),
    storage: Optional[str] = typer.Option(None, help="Optuna storage shared by all workers: sqlite:///PATH (default "
                                                      "RESULTS/tune/optuna.sqlite3; not with --executor slurm), "
                                                      "postgresql://USER@HOST/DB, journal:PATH"),
    heartbeat: int = typer.Option(10, help="seconds between a trial's heartbeats; silent for 3x this, it is retried"),
    dataset: Optional[str] = DATASET_OPTION,
    epochs: Optional[int] = EPOCHS_OPTION,
    batch_size: Optional[int] = BATCH_SIZE_OPTION,
    subset: Optional[int] = SUBSET_OPTION,
    test_subset: Optional[int] = TEST_SUBSET_OPTION,
    model: Optional[str] = MODEL_OPTION,
    depth: Optional[int] = DEPTH_OPTION,
    device: Optional[str] = DEVICE_OPTION,
    precision: Optional[str] = PRECISION_OPTION,
    data_dir: Optional[str] = DATA_DIR_OPTION,
    download: Optional[bool] = DOWNLOAD_OPTION,
    results_dir: Optional[str] = typer.Option(None, help="where records, the study and reports go (default "
                                                          "results/PRESET)"),
    margin: float = MARGIN_OPTION,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress output"),
    track: list[str] = typer.Option([], "--track", help=TRACK_HELP + "; trials and final runs alike"),
    track_uri: Optional[str] = TRACK_URI_OPTION,
    threads: Optional[int] = THREADS_OPTION,
    yes: bool = YES_OPTION,
    executor: str = EXECUTOR_OPTION,
    workers: int = WORKERS_OPTION,
    slurm_partition: Optional[str] = SLURM_PARTITION_OPTION,
    slurm_gpus_per_task: Optional[int] = SLURM_GPUS_OPTION,
    slurm_cpus_per_task: Optional[int] = SLURM_CPUS_OPTION,
    slurm_time_min: Optional[int] = SLURM_TIME_OPTION,
    slurm_array_parallelism: Optional[int] = SLURM_PARALLELISM_OPTION,
    slurm_sbatch: list[str] = SLURM_SBATCH_OPTION,
) -> None:
    """Tune every optimizer with the same budget on a validation split, then compare on fresh seeds."""
    from optbench.config import preset_seeds
    from optbench.console import RichReporter, console, show_tuning
    from optbench.tracking import check_trackers, reporter_factory
    from optbench.tune import make_plan, run_tune
    from optbench.tune_report import build_tuning_report

    names = _csv_list(optimizers, "--optimizers")
    if final_seeds < 0:
        fail("--final-seeds must be 0 or more")
    results = results_dir or f"results/{preset}"
    try:
        margin_frac = checked_margin(margin)
        if not 0 <= seed < 2**31:
            fail("--seed must be a whole number in [0, 2**31)")
        spec = executor_spec(ctx.params)
        trackers = check_trackers(track, track_uri)  # a missing extra fails before the study is made
        plan = make_plan(preset, names, workload_overrides(ctx.params, spec, results), space, trials,
                         seed, validation, storage, heartbeat, spec.target_device(device))
        plan = dataclasses.replace(plan, track=tuple(trackers), track_uri=track_uri)
        if spec.kind != "slurm":  # on SLURM the runs train on other machines: this one's pace says nothing
            _confirm_long_tune(plan, final_seeds, yes)
        outcome = run_tune(plan, spec, final_seeds,
                           reporter_factory(lambda c: RichReporter(f"{c.optimizer} s{c.seed}", quiet=True), trackers,
                                            track_uri),
                           lambda text: console.print(text, soft_wrap=True), quiet=quiet,
                           preferred_seeds=preset_seeds(preset))
        if outcome.interrupted:
            raise typer.Exit(EXIT_INTERRUPTED)
        report = build_tuning_report(outcome, margin_frac)
    except OptbenchError as exc:
        fail(str(exc), exc.exit_code)
    show_tuning(report)


def _local_time(timestamp: float) -> str:
    from datetime import datetime

    return datetime.fromtimestamp(timestamp).astimezone().strftime("%Y-%m-%d %H:%M %Z")


@app.command()
def status(
    results_dir: Path = typer.Argument(..., help="the results folder of a compare or a tune (local, workers or SLURM)"),
    storage: Optional[str] = typer.Option(None, help="a tune's Optuna storage, when it was not the default SQLite "
                                                      "file (e.g. postgresql://... with its password); read only"),
) -> None:
    """Where a grid or a tune stands: runs planned / running (host, for how long, job id) / stopped / failed /
    finished, per optimizer and seed, read from the records, checkpoints and run locks; for a tune also each
    study's trials against the budget, read from the study storage (nothing is trained or changed)."""
    from rich.console import Console
    from rich.table import Table

    from optbench.status import grid_status, tune_folder, tune_status

    tune_dir = tune_folder(results_dir)
    grid_dir = tune_dir.parent if tune_dir is not None and tune_dir.resolve() == results_dir.resolve() else results_dir
    try:
        runs, jobs = grid_status(grid_dir)
        studies = tune_status(tune_dir, storage) if tune_dir is not None else None
        finals = [(d, grid_status(d)[0]) for d in sorted(tune_dir.glob("final-*")) if d.is_dir()] if tune_dir else []
        if tune_dir is not None:
            jobs += grid_status(tune_dir)[1]  # the trials' job arrays (RESULTS/tune/slurm/jobs.json)
    except OptbenchError as exc:
        fail(str(exc), exc.exit_code)
    out = Console(highlight=False)
    if runs or studies is None:
        _print_runs(out, f"runs in {grid_dir}" + (" (the defaults' final runs)" if studies is not None else ""), runs,
                    "no runs planned or recorded here")
    if studies is not None:
        url, rows, missing = studies
        table = Table(title=f"tuning studies in {tune_dir} ({url})")
        for column in ("optimizer", "budget", "complete", "running", "waiting", "failed", "pruned", "detail"):
            table.add_column(column)
        for s in rows:
            detail = [f"running in {', '.join(s.workers)}" if s.workers else "",
                      f"{s.scored_zero} scored 0 (diverged, oom or failed run)" if s.scored_zero else "",
                      f"{s.lost} lost (worker gone): the next tune re-queues it" if s.lost else "",
                      f"{s.retrying} to be retried" if s.retrying else "",
                      f"{s.retries} retries spent" if s.retries else ""]
            table.add_row(s.optimizer, str(s.budget), f"{s.complete}/{s.budget}", str(s.running), str(s.waiting),
                          str(s.failed), str(s.pruned), "; ".join(d for d in detail if d))
        out.print(table)
        done = sum(s.complete + s.failed for s in rows)
        out.print(f"{done}/{sum(s.budget for s in rows)} trials settled" if rows else
                  missing or "no study found in the storage", soft_wrap=True)
        for folder, final_runs in finals:
            _print_runs(out, f"final runs of the tuned settings in {folder}", final_runs, "none yet")
    if jobs:
        out.print(f"SLURM jobs submitted: {', '.join(jobs)} (squeue -j ... / sacct -j ... for their state)",
                  soft_wrap=True)


def _print_runs(out: Any, title: str, runs: list, empty: str) -> None:
    from collections import Counter

    from rich.table import Table

    from optbench.status import STATES

    table = Table(title=title)
    for column in ("optimizer", "seed", "config", "state", "detail"):
        table.add_column(column)
    for run in runs:
        table.add_row(run.optimizer, str(run.seed), run.config_hash, run.state, run.detail)
    out.print(table)
    counts = Counter(run.state for run in runs)
    out.print(", ".join(f"{counts[s]} {s}" for s in STATES if counts[s]) or empty, soft_wrap=True)


@app.command()
def report(
    results_dir: Optional[Path] = typer.Argument(None, help="folder of run records (from this or another machine; "
                                                 "default: the folder under ./results holding the newest record)"),
    workload: Optional[str] = typer.Option(None, help="workload id, when the folder holds several"),
    out: Optional[Path] = typer.Option(None, help="where to write tables and figures (default RESULTS_DIR)"),
    margin: float = MARGIN_OPTION,
    strict: bool = STRICT_OPTION,
    rule: str = RULE_OPTION,
    diagnostics: bool = typer.Option(False, "--diagnostics", help="also plot the optimizer diagnostics recorded "
                                     "in the runs (gradient norm, update size, Sophia's clipping, ...)"),
    html: bool = typer.Option(False, "--html", help="also write one self-contained HTML page to hand in: table, "
                              "verdicts and why, figures embedded, config, hyperparameters, seeds, versions, device"),
) -> None:
    """Redraw the comparison table, criteria and figures from existing run records, without training."""
    from optbench.console import console, show_report
    from optbench.records import latest_results_dir, load_records
    from optbench.report import build_report

    margin_frac = checked_margin(margin, rule)  # before reading anything, as compare does
    try:
        if results_dir is None:
            latest = latest_results_dir()
            results_dir = latest.directory
            console.print(f"report: no folder given; reading {results_dir}, the folder under ./results with the "
                          f"newest run record ({latest.newest_record.name}, written "
                          f"{_local_time(latest.written_at)})", soft_wrap=True)
        loaded = load_records(results_dir)
        for problem in loaded.problems:
            console.print(f"[yellow]skipped:[/yellow] {problem}", soft_wrap=True)
        report = build_report(loaded.records, out or results_dir, workload=workload, margin=margin_frac,
                              problems=loaded.problems, diagnostics=diagnostics, html=html)
    except OptbenchError as exc:
        fail(str(exc), exc.exit_code)
    show_report(report)
    _enforce_strict(report, strict, rule)


@app.command()
def toy(
    function: str = typer.Option("rosenbrock", help="rosenbrock or quadratic (rotated, condition number 100)"),
    steps: Optional[int] = typer.Option(None, help="optimizer steps (default: the function's, from toy.yaml)"),
    start: Optional[str] = typer.Option(None, help="start point X,Y, e.g. --start=-1.2,1 (default: the function's)"),
    seed: Optional[int] = typer.Option(None, help="torch seed; Sophia's Hessian probes are random (default 0)"),
    out: Path = typer.Option(Path("results/toy"), help="folder for the two PNG figures"),
    optimizers: Optional[str] = typer.Option(None, help="comma-separated optimizers, or 'all' (default: the course's four)"),
) -> None:
    """Race the optimizers on a 2-D function: paths over its contours, loss per step, and a table."""
    from rich.console import Console

    from optbench.optimizers import select
    from optbench.toy import parse_start, run_notes, run_toy, summary_table
    from optbench.toy_plots import save_toy_plots

    try:
        result = run_toy(function, steps=steps, start=None if start is None else parse_start(start), seed=seed,
                         optimizers=select(optimizers))
        files = save_toy_plots(result, out)
    except OptbenchError as exc:
        fail(str(exc), exc.exit_code)
    except OSError as exc:
        fail(f"cannot write the figures to {out}: {exc.strerror or exc}")
    stdout = Console(highlight=False)
    for line in run_notes(result):
        stdout.print(line, soft_wrap=True)
    stdout.print(summary_table(result))
    stdout.print("written: " + ", ".join(str(p) for p in files), soft_wrap=True)


def memory_workload(preset: str, model: str | None, batch_size: int | None, image_size: int | None,
                    num_classes: int | None, patch_size: int | None, depth: int | None) -> dict[str, Any]:
    """`optbench memory`'s question with the preset's defaults filled in (as `compare` takes its workload
    from a preset): without --model, the preset's model at its dataset's image size, channels and classes,
    and its depth and patch size; without --batch-size, the preset's batch size. "said" names the choice."""
    from optbench.data import SPECS
    from optbench.models import get_model
    from optbench.settings import load_preset

    settings = load_preset(preset)
    out: dict[str, Any] = {"model": model, "batch_size": batch_size, "image_size": image_size,
                           "num_classes": num_classes or 1000, "patch_size": patch_size, "depth": depth, "in_chans": 3}
    said = []
    if model is None:
        data = SPECS.get(settings.get("dataset"))
        entry = get_model(settings.get("model", DEFAULT_MODEL))
        out["model"] = entry.name
        # The preset's ViT knobs (and the dataset's preferred patch) only for a model that has them.
        out["depth"] = depth if depth is not None else settings.get("depth") if entry.takes_depth else None
        out["patch_size"] = patch_size or ((settings.get("patch_size") or (data.patch_size if data else None))
                                           if entry.patched else None)
        if data is not None:
            out["image_size"] = image_size or data.image_size
            out["num_classes"] = num_classes or data.num_classes
            out["in_chans"] = data.channels
        said.append(f"the {preset} preset's model {out['model']}"
                    + (f" (depth {out['depth']})" if out["depth"] else "")
                    + (f" on {data.title}: {out['image_size']} px, {out['in_chans']} channel(s), "
                       f"{out['num_classes']} classes" if data else ""))
    if batch_size is None:
        out["batch_size"] = settings.get("batch_size", 128)
        said.append(f"the {preset} preset's batch size {out['batch_size']}")
    out["said"] = "measuring " + " and ".join(said)
    return out


@app.command()
def memory(
    preset: str = typer.Option("homework", help="without --model: measure this preset's workload (model, its "
                               "dataset's image size, channels and classes, depth, batch size)"),
    model: Optional[str] = typer.Option(None, help=f"the model: {' or '.join(model_names())}, or any timm ViT name "
                                        "(vit_base_patch16_224, ...) (default: the preset's, at its dataset's image "
                                        "size and classes)"),
    batch_size: Optional[int] = typer.Option(None, help="training batch size (default: the preset's)"),
    image_size: Optional[int] = typer.Option(None, help="input size in pixels (default: the preset's dataset's "
                                             "without --model, else the model's: 224 for timm ViTs, 32 for the CIFAR ResNet-18)"),
    patch_size: Optional[int] = typer.Option(None, help="ViT patch size (default: keeps >= 8x8 patches; 32px -> 4)"),
    num_classes: Optional[int] = typer.Option(None, help="classes of the head (default: the preset's dataset's "
                                              "without --model, else 1000)"),
    depth: Optional[int] = typer.Option(None, help="override the ViT depth (default: the model's)"),
    precision: str = typer.Option("fp32", help="fp32 or bf16 (autocast)"),
    method: str = typer.Option("auto", help="auto (cuda if present, else estimate), cuda, tracked or estimate"),
    adamw_impl: str = typer.Option("foreach", help="AdamW baseline: foreach (torch's CUDA default), fused, forloop"),
    optimizers: Optional[str] = typer.Option(None, help="comma-separated optimizers, or 'all' (default: the course's four)"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="also write the result as JSON here"),
) -> None:
    """Where a training step's memory goes per optimizer, and when Lion saves 30% against AdamW."""
    from rich.console import Console
    from rich.markup import escape

    from optbench.console import console
    from optbench.memory import check_json_path, measure_memory, resolve_spec, write_json
    from optbench.optimizers import select
    from optbench.render import render_memory_report

    measured = f"{model} at batch size {batch_size}"
    try:
        if json_path is not None:
            check_json_path(json_path)
        workload = memory_workload(preset, model, batch_size, image_size, num_classes, patch_size, depth)
        measured = f"{workload['model']} at batch size {workload['batch_size']}"
        if model is None or batch_size is None:
            console.print(f"[dim]memory: {escape(workload.pop('said'))} (--model, --batch-size, ... change it)[/dim]",
                          soft_wrap=True)
        workload.pop("said", None)
        spec = resolve_spec(**workload, precision=precision, method=method, adamw_impl=adamw_impl,
                            optimizers=select(optimizers))
        result = measure_memory(spec, progress=lambda text: console.print(f"[dim]{text}[/dim]", soft_wrap=True))
        if json_path is not None:
            write_json(result, json_path)
    except OptbenchError as exc:
        fail(str(exc), exc.exit_code)
    except (MemoryError, RuntimeError) as exc:  # torch.OutOfMemoryError is a RuntimeError
        if not isinstance(exc, MemoryError) and "memory" not in str(exc).lower():
            raise
        fail(f"out of memory measuring {measured} with --method {method}: "
             "use --method estimate (allocates nothing) or a smaller --batch-size")
    render_memory_report(result, Console(highlight=False))
    if json_path is not None:
        console.print(f"written: {json_path}", soft_wrap=True)


@app.command("optimizers")
def list_optimizers() -> None:
    """Every optimizer in the registry: library, class, defaults, state bytes per parameter, and what the
    harness does around it."""
    from rich.console import Console

    from optbench.optimizers import describe_all

    out = Console(highlight=False)
    try:
        for block in describe_all():
            out.print(block, soft_wrap=True)
            out.print()
    except OptbenchError as exc:
        fail(str(exc), exc.exit_code)


def main() -> None:
    from optbench.interrupt import sigterm_as_ctrl_c

    try:
        sigterm_as_ctrl_c()  # first: a SIGTERM during imports or set-up exits 130, as documented
        app()
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
