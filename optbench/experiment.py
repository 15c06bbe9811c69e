"""One run end to end: config -> data -> model -> optimizer -> memory probe -> training -> run record."""

from __future__ import annotations

import hashlib
import itertools
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from importlib import metadata
from typing import Any, Callable

import torch

from optbench import __version__
from optbench.config import RunConfig, resolved_warmup_steps, with_runtime
from optbench.checkpoints import (CheckpointError, RunLock, acquire_run_lock, capture_rng, check_checkpoint,
                                  checkpoint_path, checkpoint_refused, load_checkpoint, restore_rng, save_checkpoint)
from optbench.data import SPECS, ImageData, holdout_validation, load_dataset, steps_per_epoch, train_batches
from optbench.diagnostics import StepDiagnostics
from optbench.errors import ConfigError, DeviceError, OptbenchError, RecordError
from optbench.interrupt import StopOnSignal
from optbench.measure import (CALIBRATION_MATMULS, CALIBRATION_REPEATS, CALIBRATION_SIZE, calibration_kernel,
                              cuda_peaks, memory_probe, optimizer_state_bytes, reset_cuda_peak,
                              synchronize, training_flops_per_image)
from optbench.models import build_model, model_facts, model_title, param_count, resolve_patch_size
from optbench.timing import ADVICE as TIMING_ADVICE
from optbench.timing import DOES_NOT_STAND as TIMING_DOES_NOT_STAND
from optbench.timing import STANDS as TIMING_STANDS
from optbench.timing import assess as assess_timing
from optbench.timing import epoch_spread, epoch_times
from optbench.optimizers import Built, BuildContext, OptimizerEntry, RunSettings, get_entry, library_versions
from optbench.setup_cache import cached, flops_key, probe_key
from optbench.records import (SCHEMA_VERSION, ensure_writable, find_finished, record_filename, utc_now,
                              write_record_or_fallback)
from optbench.tempfiles import RESULTS_TEMPORARIES, remove_stale
from optbench.train import StopRequested, TrainResult, autocast_for, train, training_step

PACKAGES = ("torchvision", "numpy", "scikit-learn", "optuna")  # besides torch, timm and the optimizers' libraries


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda was asked for but no CUDA GPU is visible to torch: "
                          "use --device cpu, or run on a machine with a GPU and a CUDA build of torch")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def resolve_runtime(config: RunConfig, elsewhere_on: str | None = None) -> RunConfig:
    """Fix 'auto' device, precision, patch size and thread count to what will run (they are part of the
    run's identity).

    `elsewhere_on` ('cuda' or 'cpu'): the run executes on another machine (a SLURM node) with that
    device, so this machine's devices are not asked; 'auto' precision on CUDA is then bf16 (Ampere or
    later: pass --precision fp32 for older GPUs)."""
    threads = config.threads or torch.get_num_threads()
    # The patch a run uses is part of what ran: the record and its hash say 4, not "auto" (null).
    patch = resolve_patch_size(config.model, SPECS[config.dataset], config.patch_size)
    if elsewhere_on is not None:
        precision = config.precision if config.precision != "auto" else ("bf16" if elsewhere_on == "cuda" else "fp32")
        return with_runtime(config, device=elsewhere_on, precision=precision, patch_size=patch, threads=threads)
    device = resolve_device(config.device)
    precision = config.precision
    if precision == "auto":  # bf16 where the GPU has it natively (Ampere and later), else fp32
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False) \
            else "fp32"
    return with_runtime(config, device=device.type, precision=precision, patch_size=patch, threads=threads)


def environment(device: torch.device) -> dict[str, Any]:
    versions = library_versions()
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or platform.machine()
        try:
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    device_name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    return {
        "optbench": __version__, "python": sys.version.split()[0], "platform": platform.platform(),
        "device": device.type, "device_name": device_name, "cpu_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda if device.type == "cuda" else None, "packages": versions,
    }


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warmup to 1, then cosine to 0 at the last step."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


class _SilentReporter:
    def epoch_start(self, epoch, epochs, steps): pass
    def progress(self, steps_done_in_epoch, loss, images_per_s): pass
    def log_point(self, step, values): pass
    def epoch_end(self, row): pass
    def phase(self, text): pass
    def warn(self, text): pass


class RunBusy(OptbenchError):
    """Another live process is running this exact run in this results directory."""


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 over the model's parameters and buffers in state_dict order: equal digests, equal weights."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # 0-dim too
    return digest.hexdigest()


# Schedule-Free's README: "for batch in itertools.islice(train_loader, 50): model(batch)".
BN_WARMUP_BATCHES = 50


def has_batchnorm(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def batchnorm_warmup(model: torch.nn.Module, batches, amp) -> int:
    """Recompute BatchNorm's running statistics at the weights now in the model, as Schedule-Free's authors
    prescribe before evaluating (schedulefree README, "Caveats"): with the optimizer already in eval mode
    (the averaged weights x in the model), train-mode forwards without gradients over training batches,
    then `model.eval()`. Returns the batches used.

    Why: in train mode BatchNorm updates its running mean and variance on every forward, so after training
    they describe the activations of the gradient points y, while evaluation uses x. Only BatchNorm's
    buffers change: no gradient, no weight, and the global random streams are restored afterwards (a
    layer drawing random numbers in train mode, e.g. dropout, must not move the run's)."""
    used = 0
    devices = [d for d in {p.device for p in model.parameters()} if d.type == "cuda"]
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        model.train()
        for x, _ in batches:
            with amp:
                model(x)
            used += 1
    model.eval()
    return used


def compile_warmup(train_model, model, optimizer, scheduler, entry, data: ImageData, config: RunConfig, amp,
                   device: torch.device) -> float:
    """Compile before the clock starts (an untimed warm-up, as airbench and AlgoPerf do); returns its seconds.

    Runs COMPILE_WARMUP_STEPS real training steps through the compiled module (a Hessian step, when due,
    runs the eager module as in training, so Sophia gets a compiled plain step too) and one evaluation
    forward, then puts back everything they moved: weights, optimizer state and counters, the schedule and
    every random stream. Training then starts exactly where it would have without the warm-up."""
    import copy

    start = time.perf_counter()
    saved_model = copy.deepcopy(model.state_dict())
    saved_optimizer = copy.deepcopy(optimizer.state_dict())
    saved_scheduler = scheduler.state_dict() if scheduler is not None else None
    saved_estimates = getattr(optimizer, "hessian_estimates_made", None)
    saved_rng = capture_rng(device)
    # Every batch shape training and evaluation will meet (a smaller last batch recompiles otherwise).
    n_train, n_test = data.train_x.shape[0], data.test_x.shape[0]
    train_sizes = [min(config.batch_size, n_train)] * COMPILE_WARMUP_STEPS + (
        [n_train % config.batch_size] if n_train > config.batch_size and n_train % config.batch_size else [])
    eval_sizes = [min(config.eval_batch_size, n_test)] + (
        [n_test % config.eval_batch_size] if n_test > config.eval_batch_size and n_test % config.eval_batch_size else [])
    entry.train_mode(optimizer)
    for size in train_sizes:
        hessian = entry.hessian_due(optimizer)
        training_step(model if hessian else train_model, optimizer, entry, data.normalize(data.train_x[:size]),
                      data.train_y[:size], amp, hessian)
        if scheduler is not None:
            scheduler.step()
    entry.eval_mode(optimizer)
    train_model.eval()
    with torch.inference_mode(), amp:
        for size in eval_sizes:
            train_model(data.normalize(data.test_x[:size]))
    train_model.train()
    entry.train_mode(optimizer)
    model.load_state_dict(saved_model)
    optimizer.load_state_dict(saved_optimizer)
    if scheduler is not None:
        scheduler.load_state_dict(saved_scheduler)
    if saved_estimates is not None:
        optimizer.hessian_estimates_made = saved_estimates
    restore_rng(saved_rng, device)
    optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    return time.perf_counter() - start


COMPILE_WARMUP_STEPS = 3  # Sophia: its first step is a Hessian step (eager), the next two compile


def _build_optimizer(entry, model, hparams, context):
    try:
        return entry.make(model, hparams, context)
    except (ValueError, TypeError, NotImplementedError, AssertionError) as exc:
        # The library rejected a hyperparameter that passed our checks: say which, in one line.
        raise ConfigError(f"{entry.name} rejected its hyperparameters {hparams}: {exc}") from None


@dataclass
class TrainingSetup:
    """What a run trains: its model, the optimizer the registry built for it, the schedule, the steps."""

    model: torch.nn.Module
    built: Built  # the registry entry's build: the optimizer and its implementation facts
    scheduler: torch.optim.lr_scheduler.LambdaLR | None
    context: BuildContext
    epoch_steps: int
    total_steps: int
    warmup: int
    amp: Any  # the autocast context of the run's precision


def build_training(config: RunConfig, entry: OptimizerEntry, data: ImageData, device: torch.device) -> TrainingSetup:
    """The model, optimizer and schedule of `config` for `data` (the split it trains on), on `device`.
    The one builder of what a run trains: the run and the CPU time estimate (optbench/estimate.py) both
    call it, so the estimate times what the run will train."""
    model = build_model(config.model, data.spec, config.seed, config.patch_size, config.depth).to(device)
    epoch_steps = steps_per_epoch(data.train_x.shape[0], config.batch_size)
    total_steps = config.epochs * epoch_steps
    warmup = resolved_warmup_steps(config.warmup_steps, total_steps)
    context = BuildContext(device_type=device.type, total_steps=total_steps, warmup_steps=warmup)
    built = _build_optimizer(entry, model, config.hparams, context)
    scheduler = (torch.optim.lr_scheduler.LambdaLR(built.optimizer, warmup_cosine(total_steps, warmup))
                 if entry.external_schedule else None)
    return TrainingSetup(model, built, scheduler, context, epoch_steps, total_steps, warmup,
                         autocast_for(device, config.precision))


def training_data(config: RunConfig, data: ImageData) -> ImageData:
    """The splits `config` trains and evaluates on: a tuning trial's (validation_fraction) hold out its
    validation split from the training images and never see the test split; any other run's are `data`."""
    if config.validation_fraction:
        return holdout_validation(data, config.validation_fraction, config.validation_seed)
    return data


@dataclass
class RunClaim:
    """What claiming a run gave: the run's lock to train under, or (lock None) its finished record."""

    lock: RunLock | None
    finished: dict[str, Any] | None = None


def claim_run(config: RunConfig, reuse_finished: bool = True,
              settled: Callable[[], dict[str, Any] | None] | None = None,
              warn: Callable[[str], None] | None = None) -> RunClaim:
    """Claim one run for this process: take its lock, then look for a finished record again, under the lock.

    The one place that decides "train it or not". A look before the lock is only a shortcut: another
    process may finish the run between that look and the lock, so the look that counts is this one,
    made while no other process can start or finish the run. With `reuse_finished` a finished record
    (ok or diverged) is returned instead of the lock, and a checkpoint left beside it is removed (the
    record is the result). Raises RunBusy if another live process holds the run. `settled` replaces
    the look for a finished record (see run_experiment). `warn` is told of a record of this run whose
    config was edited after it ran (records.config_mismatch): it is not reused, so the run is trained.
    """
    lock = acquire_run_lock(config.results_dir, config.config_hash)
    if lock is None:
        raise RunBusy(f"{config.optimizer} seed {config.seed} ({config.config_hash}) is being run by another "
                      f"process in {config.results_dir}: wait for it or use another --results-dir")
    if not reuse_finished:
        return RunClaim(lock)
    try:
        finished = settled() if settled is not None else find_finished(config.results_dir, config.config_hash,
                                                                        warn)
        if finished is not None and finished["status"] in ("ok", "diverged"):
            leftover = checkpoint_path(config.results_dir, config.config_hash)
            if leftover.exists():
                leftover.unlink()
    except BaseException:
        lock.release()
        raise
    if finished is None:
        return RunClaim(lock)
    lock.release()
    finished["_reused"] = True
    return RunClaim(None, finished)


def run_experiment(config: RunConfig, reporter: Any = None, data: ImageData | None = None,
                   resume: bool = False, before_training: Callable[[ImageData], None] | None = None,
                   settled: Callable[[], dict | None] | None = None) -> tuple[dict, Any]:
    """Train one run and write its record. Returns (record, record path).

    `resume`: continue from this run's checkpoint if there is one (compare always does), and if the run
    has already finished, return its record without training (the record then has "_reused": True).
    `data` may be passed to reuse a dataset already loaded; it is read, never modified. Raises RunBusy
    if another process holds this run. `before_training(data)` is called once the warnings are given and the
    data is loaded, before anything is built or written (the CLI's estimate and confirmation of a long run);
    an error it raises ends the run without a record.
    `settled`: replaces the finished-record look made under the lock (an executor's workers judge a run
    settled by their grid's rules: a failed run is tried once per command, `--rerun` counts only new
    records).
    """
    reporter = reporter or _SilentReporter()
    started_at, wall_start = utc_now(), time.perf_counter()
    config = resolve_runtime(config)
    torch.set_num_threads(config.threads)  # the count the config (and its hash) says this run uses
    device = torch.device(config.device)
    entry = get_entry(config.optimizer)
    # Fail now, not after hours of training: the folder takes a file named as long as the record will be.
    ensure_writable(config.results_dir, longest_name=record_filename(
        {"config": config.to_dict(), "optimizer": config.optimizer, "config_hash": config.config_hash,
         "started_at": started_at}).replace(".json", "-999.json"))
    # Temporaries of processes killed while writing (records, checkpoints, cache entries) go now.
    remove_stale(config.results_dir, Path(config.results_dir) / "checkpoints", Path(config.results_dir) / "cache",
                 names=RESULTS_TEMPORARIES)
    claim = claim_run(config, reuse_finished=resume or settled is not None, settled=settled, warn=reporter.warn)
    if claim.finished is not None:
        reporter.phase(f"this run has finished already: reusing {claim.finished['_path']} (nothing trained)")
        return claim.finished, Path(claim.finished["_path"])
    # The stop handler covers set-up too: a SIGTERM while data loads or the probe runs ends the run as
    # `interrupted` (exit 130), not by the signal's default action.
    with claim.lock, StopOnSignal(reporter.warn) as stop:
        _tell(reporter, "run_start", config)  # trackers open their run with the resolved config
        try:
            record, path = _run_locked(config, entry, device, reporter, data, resume, started_at, wall_start, stop,
                                       before_training)
            _tell(reporter, "run_end", record, path)
            return record, path
        except StopRequested:
            record, path = _setup_failure(config, "interrupted", "stopped on request during set-up, before the "
                                          "first step", device, started_at, wall_start)
            _tell(reporter, "run_end", record, path)
            return record, path
        except torch.OutOfMemoryError as exc:
            # Out of memory before training started (data, model, FLOP count or memory probe): this
            # run ends as `oom` with a record, like one that runs out during training.
            if device.type == "cuda":
                torch.cuda.empty_cache()
            record, path = _setup_failure(config, "oom", f"out of memory during set-up at batch size "
                                          f"{config.batch_size}: {str(exc).splitlines()[0]}", device, started_at,
                                          wall_start)
            _tell(reporter, "run_end", record, path)
            return record, path


def _tell(reporter: Any, event: str, *args: Any) -> None:
    """Run-level events only trackers need (optbench/tracking.py); reporters without them ignore them."""
    handler = getattr(reporter, event, None)
    if handler is not None:
        handler(*args)


def _setup_failure(config: RunConfig, status: str, detail: str, device: torch.device, started_at: str,
                   wall_start: float) -> tuple[dict, Any]:
    """The record of a run that ended before its first training step."""
    record = {
        "schema_version": SCHEMA_VERSION, "run_id": f"{config.config_hash}-{started_at}",
        "config_hash": config.config_hash, "optimizer": config.optimizer, "status": status,
        "status_detail": detail, "diverged_at_step": None, "final_test_acc": None, "train_wall_time_s": 0.0,
        "eval_wall_time_s": 0.0, "total_wall_time_s": time.perf_counter() - wall_start, "resumed": False,
        "throughput_images_per_s": None, "steps": 0, "epochs_completed": 0, "images_seen": 0,
        "hessian_updates": None, "peak_memory_bytes": None, "peak_memory_source": "not measured (run failed in set-up)",
        "optimizer_state_bytes": None, "param_count": None, "history": [], "config": config.to_dict(),
        "environment": environment(device), "started_at": started_at, "finished_at": utc_now(),
    }
    return record, _write_or_keep(config, record, checkpoint_path(config.results_dir, config.config_hash))


def _run_locked(config, entry, device, reporter, data, resume, started_at, wall_start, stop, before_training=None):
    def setup_step_done() -> None:  # set-up is not resumable: a stop during it ends the run before training
        if stop():
            raise StopRequested

    warnings_given = entry.warnings(config.hparams, RunSettings(batch_size=config.batch_size))
    for text in warnings_given:
        reporter.warn(text)
    ckpt_path = checkpoint_path(config.results_dir, config.config_hash)
    saved = load_checkpoint(ckpt_path, config.config_hash) if resume and ckpt_path.exists() else None
    if ckpt_path.exists() and not resume:
        reporter.warn(f"a checkpoint of this run exists ({ckpt_path}); starting afresh replaces it at the first "
                      "epoch's end: pass --resume to continue it instead")

    reporter.phase(f"loading {config.dataset}")
    if data is None:
        data = load_dataset(config.dataset, config.data_dir, config.download, config.subset, config.test_subset)
    validation = bool(config.validation_fraction)  # a tuning trial: from here on the test split is gone
    data = training_data(config, data)
    if before_training is not None:
        before_training(data)
    data = data.to(device)
    setup_step_done()
    setup = build_training(config, entry, data, device)
    model, built, scheduler, context, amp = setup.model, setup.built, setup.scheduler, setup.context, setup.amp
    optimizer, epoch_steps, total_steps, warmup = built.optimizer, setup.epoch_steps, setup.total_steps, setup.warmup
    for group in built.implementation["param_groups"]:
        if not group["tensors"]:  # e.g. Muon on a ResNet: its convolutions are 4-D, the head goes to AdamW
            reporter.warn(f"{entry.title}: its parameter group '{group['role']}' holds no parameter of "
                          f"{config.model}, so that part of the optimizer never runs")
    if saved:  # before any of it is used: a checkpoint that is not this run's is refused, not half-loaded
        check_checkpoint(ckpt_path, saved, optimizer_name=config.optimizer, model=model, optimizer=optimizer,
                         scheduler=scheduler, total_steps=total_steps, steps_per_epoch=epoch_steps,
                         epochs=config.epochs, progress_fields=tuple(f.name for f in fields(TrainResult)),
                         hparams=config.hparams)

    sample_x = data.normalize(data.train_x[: min(config.batch_size, data.train_x.shape[0])])
    sample_y = data.train_y[: sample_x.shape[0]]
    # FLOP count and memory probe depend on the workload, not on the seed or lr: measured once per key
    # in RESULTS/cache and reused (setup_cache says what the keys hold).
    flops_per_image, flops_reused_from = cached(
        config.results_dir, flops_key(config.model, config.patch_size, config.depth, data.spec.num_classes,
                                      tuple(sample_x[:2].shape)),
        lambda: training_flops_per_image(model, sample_x[:2], sample_y[:2]), reporter.warn)

    probe = saved["memory_probe"] if saved else None
    probe_reused_from = saved.get("memory_probe_reused_from") if saved else None
    if config.memory_probe and probe is None:
        def probe_step(m, opt):
            entry.train_mode(opt)
            training_step(m, opt, entry, sample_x, sample_y, amp, entry.hessian_due(opt))

        def measure_probe():
            reporter.phase("measuring memory (probe on a copy)")
            # Sophia's Hutchinson draws from the global generators: a probe must not move the run's
            # random streams, or a run with a reused probe would train differently from one without.
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                return memory_probe(
                    model, lambda m: _build_optimizer(entry, m, config.hparams, context).optimizer,
                    probe_step, entry.force_hessian_next, (sample_x, sample_y))

        probe, probe_reused_from = cached(
            config.results_dir, probe_key(config.identity, tuple(sample_x.shape), str(sample_x.dtype)),
            measure_probe, reporter.warn)

    setup_step_done()
    progress = None
    earlier_wall = 0.0
    if saved:
        try:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            if scheduler is not None:
                scheduler.load_state_dict(saved["scheduler"])
            restore_rng(saved["rng"], device)
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as exc:  # what the checks above cannot see
            raise checkpoint_refused(ckpt_path, f"does not fit this run ({exc.__class__.__name__}: "
                                     f"{(str(exc).splitlines() or [''])[0][:200]})") from None
        progress = TrainResult(**saved["progress"])
        progress.status, progress.detail = "ok", ""
        earlier_wall = saved.get("wall_time_s", 0.0)
        reporter.phase(f"resuming from {ckpt_path}: epoch {progress.epochs_done} done, "
                       f"step {progress.step_in_epoch} of the next")

    def save(state: TrainResult) -> None:
        try:
            save_checkpoint(ckpt_path, {
                "config_hash": config.config_hash, "optimizer_name": config.optimizer, "total_steps": total_steps,
                "steps_per_epoch": epoch_steps, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None, "rng": capture_rng(device),
                "progress": asdict(state), "memory_probe": probe,
                "memory_probe_reused_from": probe_reused_from, "hessian_estimates": estimates_so_far(),
                "wall_time_s": earlier_wall + time.perf_counter() - wall_start,
            })
        except CheckpointError as exc:  # losing a checkpoint must not lose the run
            reporter.warn(f"{exc}; training goes on without it")

    def estimates_so_far() -> int | None:
        if entry.hessian_estimates is None:
            return None
        before = (saved or {}).get("hessian_estimates") or 0  # made before a resume
        return before + entry.hessian_estimates(optimizer)

    recompute_bn = None
    if entry.bn_warmup and has_batchnorm(model):
        def recompute_bn(epoch: int) -> None:  # the epoch's own training batches: same order, same augmentation
            batchnorm_warmup(model, itertools.islice(train_batches(data, config.batch_size, config.seed, epoch,
                                                                   config.augment), BN_WARMUP_BATCHES), amp)

    train_model = torch.compile(model) if config.compile else model
    compile_warmup_s = None
    if config.compile:
        reporter.phase("compiling (untimed warm-up, weights and state restored after it)")
        compile_warmup_s = compile_warmup(train_model, model, optimizer, scheduler, entry, data, config, amp, device)
    calibration_before = calibration_kernel(device)  # the machine's speed just before training
    reset_cuda_peak(device)
    setup_step_done()
    reporter.phase("training")
    result = train(train_model, optimizer, entry, scheduler, data, epochs=config.epochs,
                   batch_size=config.batch_size, eval_batch_size=config.eval_batch_size, seed=config.seed,
                   augment=config.augment, precision=config.precision, log_every=config.log_every,
                   reporter=reporter, resume=progress, checkpoint=save, stop_requested=stop,
                   eager_model=model if config.compile else None,
                   diagnostics=StepDiagnostics(list(model.parameters()), optimizer, entry, reporter.warn),
                   before_eval=recompute_bn)
    # The final state, kept until the record is safely written: a process that dies before the record
    # is written (or a record that cannot be written) loses nothing, and `--resume` writes the record
    # without training again. Not saved again when the checkpoint this run resumed from holds it already
    # (a run whose record could not be written before: nothing was trained since).
    resumed_finished = saved is not None and saved["progress"]["epochs_done"] == config.epochs \
        and saved.get("memory_probe") == probe
    if result.status == "ok" and not resumed_finished:
        save(result)
    if device.type == "cuda":
        peaks = cuda_peaks(device)
        peak, peak_source, reserved = peaks["allocated"], "torch.cuda.max_memory_allocated (whole training)", \
            peaks["reserved"]
    else:
        peak = probe["peak_bytes"] if probe else None
        peak_source = probe["source"] if probe else "not measured (memory probe off)"
        reserved = None
    calibration_after = calibration_kernel(device)  # ... and just after
    timing = {
        "train_wall_time_s": result.train_time_s, "train_cpu_time_s": result.train_cpu_time_s,
        "cpu_per_wall": result.train_cpu_time_s / result.train_time_s if result.train_time_s else None,
        "threads": torch.get_num_threads(),
        "calibration_kernel": f"{CALIBRATION_MATMULS} fp32 matmuls {CALIBRATION_SIZE.get(device.type, 256)}^2, "
                              f"median of {CALIBRATION_REPEATS}",
        "calibration_before_s": calibration_before["wall_s"], "calibration_after_s": calibration_after["wall_s"],
        "calibration_before_cpu_per_wall": calibration_before["cpu_per_wall"],
        "calibration_after_cpu_per_wall": calibration_after["cpu_per_wall"],
        "epoch_times_s": [seconds for _, seconds in epoch_times(result.history)],
        # slowest / fastest epoch of equal steps (the first left out from three epochs on), or None
        "epoch_spread": (epoch_spread(result.history) or (None,))[0],
    }
    disturbed = assess_timing(timing, result.history, device.type)
    timing.update(disturbed=bool(disturbed), disturbed_reasons=disturbed)
    if disturbed:
        reporter.warn(f"this run's timing was disturbed: {'; '.join(disturbed)}. Its {TIMING_STANDS}; its "
                      f"{TIMING_DOES_NOT_STAND}: {TIMING_ADVICE}")

    history = result.history
    final = history[-1] if history and result.status == "ok" else None
    if validation:  # the loop's "test" columns hold the validation split: name them so
        history = [{k.replace("test_", "val_"): v for k, v in row.items()} for row in history]
    record = {
        "schema_version": SCHEMA_VERSION,
        "run_id": f"{config.config_hash}-{started_at}",
        "config_hash": config.config_hash,
        "optimizer": config.optimizer,
        "status": result.status,
        "status_detail": result.detail,
        "diverged_at_step": result.diverged_at_step,
        "evaluated_on": "validation" if validation else "test",
        "final_test_acc": final["test_acc"] if final and not validation else None,
        "final_test_loss": final["test_loss"] if final and not validation else None,
        "final_val_acc": final["test_acc"] if final and validation else None,
        "final_val_loss": final["test_loss"] if final and validation else None,
        "final_train_loss": final["train_loss"] if final else None,
        "train_wall_time_s": result.train_time_s,
        "timing": timing,  # CPU time, calibration before/after, and whether the times were disturbed
        "compile_warmup_s": compile_warmup_s,  # --compile: compilation, booked apart from training
        "eval_wall_time_s": result.eval_time_s,
        "total_wall_time_s": earlier_wall + time.perf_counter() - wall_start,
        "resumed": saved is not None,
        "throughput_images_per_s": result.images_seen / result.train_time_s if result.train_time_s else None,
        "training_flops_per_image": flops_per_image,
        "training_flops_reused_from": flops_reused_from,
        "achieved_tflops": (flops_per_image * result.images_seen / result.train_time_s / 1e12
                            if result.train_time_s else None),
        "steps": result.steps,
        "epochs_completed": len(history),
        "images_seen": result.images_seen,
        "hessian_updates": estimates_so_far(),
        "hessian_steps_planned": result.hessian_steps if entry.hessian_estimates is not None else None,
        "peak_memory_bytes": peak,
        "peak_memory_source": peak_source,
        "peak_memory_reserved_bytes": reserved,
        # The course's situation (a DataLoader holds a batch, not the dataset): the CUDA peak minus the
        # dataset resident on the GPU the whole run; the CPU probe's step peak never held it.
        "peak_memory_without_dataset_bytes": (None if peak is None else
                                              peak - data.device_bytes if device.type == "cuda" else peak),
        "memory_breakdown": probe,
        "memory_breakdown_reused_from": probe_reused_from,  # a cache file of an earlier run, or None: measured here
        "optimizer_state_bytes": optimizer_state_bytes(optimizer),
        "final_weights_sha256": weights_digest(model),
        "param_count": param_count(model),
        "param_bytes": sum(p.nbytes for p in model.parameters()),
        "dataset_device_bytes": data.device_bytes,
        "warmup_steps": warmup,
        "total_steps_planned": total_steps,
        "lr_schedule": "warmup+cosine (external)" if entry.external_schedule else "none (built-in warmup)",
        # BatchNorm statistics recomputed at the evaluated weights before each evaluation, over this many
        # training batches (Schedule-Free's warm-up), or None: evaluated with the statistics training left.
        "bn_warmup_batches": (min(BN_WARMUP_BATCHES, epoch_steps)
                              if recompute_bn is not None else None),
        "optimizer_implementation": built.implementation,
        "dataset": {"name": data.spec.name, "title": data.spec.title, "train_images": int(data.train_x.shape[0]),
                    "test_images": None if validation else int(data.test_x.shape[0]),
                    "validation_images": int(data.test_x.shape[0]) if validation else None,
                    "num_classes": data.spec.num_classes, "image_size": data.spec.image_size},
        "history": history,
        "model": {"name": config.model, "title": model_title(config.model), **model_facts(model, config.patch_size),
                  "image_size": data.spec.image_size},
        "warnings": warnings_given,  # the course's common mistakes this run's settings make (reports repeat them)
        "config": config.to_dict(),
        "environment": environment(device),
        "started_at": started_at,
        "finished_at": utc_now(),
    }
    if record["hessian_updates"] is not None and record["hessian_updates"] != record["hessian_steps_planned"]:
        record["status_detail"] += (f" Hessian estimates made ({record['hessian_updates']}) differ from the steps "
                                    f"run with create_graph ({record['hessian_steps_planned']})").strip()
    if peak is not None and device.type == "cuda" and saved is not None:
        record["peak_memory_source"] += " (since the resume only)"
    path = _write_or_keep(config, record, ckpt_path)
    if result.status in ("ok", "diverged") and ckpt_path.exists():
        ckpt_path.unlink()  # finished and recorded: the record is the result; an interrupted run keeps its checkpoint
    return record, path


def _write_or_keep(config: RunConfig, record: dict[str, Any], ckpt_path: Path) -> Path:
    """Write the record; if the results directory cannot take it (a full disk, a path too long), save it
    in a fallback folder and stop with a message naming it and the file system's reason. The run's
    checkpoint (its final state, for a finished run) is kept until the record is in the results
    directory, so `--resume` can write it there later without training again."""
    path, reason = write_record_or_fallback(config.results_dir, record)
    if reason is None:
        return path
    resume = (" or, once there is room, run the same command with --resume (the final checkpoint is kept)"
              if ckpt_path.exists() else "")
    raise RecordError(f"the run ended ({record['status']}) but {reason}; its record was saved as {path} instead: "
                      f"move it into {config.results_dir}{resume}")
