"""How long planned runs will take on this machine, from a few real training steps timed here.

Used before a long CPU run starts (CIFAR on a CPU: hours), so the user can decide knowing the cost.
Per optimizer in the plan: the run's own model, optimizer and schedule, made by the run's own builder
(experiment.build_training), its batch size, precision and data (a trial's: the training split minus its
validation share); one untimed step (lazy optimizer state, first-call overheads), then two timed plain steps and, for an optimizer with
Hessian steps (Sophia), one timed Hessian step, weighted by the entry's `hessian_period` as in training. A small
evaluation batch is timed and scaled to the test split. The planned steps and evaluations of every run
are then multiplied out. Each step is a real step (on a loaded 2-core CPU, ViT-Tiny at batch 128 takes
seconds per step), so the estimate itself takes a minute or more there; it is small beside the hours.
Set-up (data loading, memory probe, FLOP count) is not included, and the steps run eager even for a
--compile run (compiling for a few steps would cost minutes). Random streams are left as they were.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from statistics import mean

import torch

from optbench.config import RunConfig
from optbench.data import ImageData, steps_per_epoch, train_batches, validation_size
from optbench.experiment import build_training, training_data
from optbench.optimizers import get_entry
from optbench.train import training_step

LONG_ON_CPU = ("cifar10", "cifar100")  # datasets whose full runs take hours on a CPU
EVAL_IMAGES_TIMED = 64


def needs_confirmation(config: RunConfig) -> bool:
    """A CIFAR run on a CPU: it runs for hours, so it is started only when confirmed (or with --yes)."""
    return config.device == "cpu" and config.dataset in LONG_ON_CPU


@dataclass
class OptimizerPace:
    seconds_per_step: float  # amortised: Hessian steps weighted at their cadence
    timed_steps: int
    hessian_steps_timed: int
    eval_seconds_per_epoch: float
    plain_step_s: float  # mean of the timed plain steps
    hessian_step_s: float | None  # mean of the timed Hessian steps (None: the optimizer has none)
    eval_seconds_per_image: float = 0.0


@dataclass
class PlanEstimate:
    runs: int
    steps: int  # training steps planned over all runs
    seconds: float
    paces: dict[str, OptimizerPace] = field(default_factory=dict)

    def sentence(self) -> str:
        from optbench.console import duration_text

        paces = "; ".join(f"{name} {p.seconds_per_step:.2f} s/step" for name, p in self.paces.items())
        return (f"estimated {duration_text(self.seconds)} for {self.runs} run(s) of {self.steps:,} training steps "
                f"in all on this CPU, from steps timed here ({paces}; evaluation included, set-up not)")


def _pace(config: RunConfig, data: ImageData, plain_steps: int) -> OptimizerPace:
    entry = get_entry(config.optimizer)
    data = training_data(config, data)  # a tuning trial trains on the training split minus its validation share
    setup = build_training(config, entry, data, torch.device(config.device))  # what the run builds, built as it does
    model, optimizer, scheduler, amp = setup.model, setup.built.optimizer, setup.scheduler, setup.amp
    model.train()
    entry.train_mode(optimizer)
    batches = _endless_batches(data, config)
    times: dict[bool, list[float]] = {False: [], True: []}  # Hessian step? -> seconds

    def step(timed: bool) -> None:  # as the loop steps (optbench/train.py), without its bookkeeping
        x, y = next(batches)
        hessian = entry.hessian_due(optimizer)
        start = time.perf_counter()
        training_step(model, optimizer, entry, x, y, amp, hessian)
        if scheduler is not None:
            scheduler.step()
        if timed:
            times[hessian].append(time.perf_counter() - start)

    step(timed=False)  # lazy optimizer state and first-call overheads
    while len(times[False]) < plain_steps:
        step(timed=True)
    period = entry.hessian_period(config.hparams)  # one step in `period` is a Hessian step
    if entry.force_hessian_next is not None and period is not None and period >= 1:
        if not times[True]:
            entry.force_hessian_next(optimizer)
            step(timed=True)
        per_step = mean(times[False]) * (period - 1) / period + mean(times[True]) / period
    else:
        per_step = mean(times[False] + times[True])
    entry.eval_mode(optimizer)
    model.eval()
    # Evaluation is forward only and linear in the images: one small batch, scaled to the test split.
    eval_batch = data.test_x[:min(EVAL_IMAGES_TIMED, config.eval_batch_size, data.test_x.shape[0])]
    start = time.perf_counter()
    with torch.inference_mode(), amp:
        model(data.normalize(eval_batch))
    eval_image = (time.perf_counter() - start) / eval_batch.shape[0]
    return OptimizerPace(per_step, len(times[False]) + len(times[True]), len(times[True]),
                         eval_image * data.test_x.shape[0], mean(times[False]),
                         mean(times[True]) if times[True] else None, eval_image)


def _endless_batches(data: ImageData, config: RunConfig):
    epoch = 1
    while True:
        yield from train_batches(data, config.batch_size, config.seed, epoch, config.augment)
        epoch += 1


def estimate_plan(configs: list[RunConfig], data: ImageData, plain_steps: int = 2) -> PlanEstimate:
    """Time a few real steps per optimizer of `configs` (all on one dataset, `data`) and extrapolate to
    every run's planned steps and evaluations."""
    data = data.to(torch.device(configs[0].device))
    paces: dict[str, OptimizerPace] = {}
    with torch.random.fork_rng(devices=[]):  # timing must not move the runs' random streams
        for config in configs:
            if config.optimizer not in paces:
                paces[config.optimizer] = _pace(config, data, plain_steps)
    steps = seconds = 0.0
    for config in configs:
        train_images, eval_images = data.train_x.shape[0], data.test_x.shape[0]
        if config.validation_fraction:  # a tuning trial: trains on the rest, evaluates the held-out share
            eval_images = validation_size(config.validation_fraction, train_images)
            train_images -= eval_images
        run_steps = config.epochs * steps_per_epoch(train_images, config.batch_size)
        pace = paces[config.optimizer]
        steps += run_steps
        seconds += run_steps * pace.seconds_per_step + config.epochs * eval_images * pace.eval_seconds_per_image
    return PlanEstimate(len(configs), int(steps), seconds, paces)
