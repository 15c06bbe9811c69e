"""The training loop: matched epochs, synchronised timing, evaluation booked apart, divergence caught.

One step is forward, loss, backward, `optimizer.step()`, schedule, `zero_grad(set_to_none=True)`.
What differs between optimizers comes from their registry entry (Sophia's Hessian steps,
Schedule-Free's train/eval modes); the loop itself names no optimizer.

The loop never reads a number back from the device per step: the running loss and the first
non-finite step are kept on the device and read every `log_every` steps and at the end of an epoch.
Optimizer diagnostics (optbench/diagnostics.py) are measured on the step that ends at such a log
point only and read there, with the same read.
"""

from __future__ import annotations

import math
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from optbench.data import ImageData, train_batches
from optbench.diagnostics import StepDiagnostics
from optbench.measure import Stopwatch
from optbench.optimizers import OptimizerEntry


class Reporter(Protocol):
    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None: ...
    def progress(self, steps_done_in_epoch: int, loss: float, images_per_s: float) -> None: ...
    def log_point(self, step: int, values: dict[str, Any]) -> None: ...
    def epoch_end(self, row: dict[str, Any]) -> None: ...


class StopRequested(Exception):
    """A stop (Ctrl-C, SIGTERM) was requested; raised between steps, where the state is consistent."""


@dataclass
class TrainResult:
    """Progress and outcome of training; also what a checkpoint saves to resume from."""

    status: str = "ok"  # ok | diverged | interrupted | oom | failed
    detail: str = ""
    diverged_at_step: int | None = None
    steps: int = 0
    images_seen: int = 0
    hessian_steps: int = 0  # steps that fed a Hessian estimate (the optimizer counts its estimates itself)
    train_time_s: float = 0.0
    train_cpu_time_s: float = 0.0  # process CPU time (all threads) over the same intervals as train_time_s
    eval_time_s: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    # Where to continue: epochs fully done, and steps already taken in the next one.
    epochs_done: int = 0
    step_in_epoch: int = 0
    epoch_loss_sum: float = 0.0


def autocast_for(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def training_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, entry: OptimizerEntry,
                  x: torch.Tensor, y: torch.Tensor, amp, hessian: bool,
                  diagnostics: StepDiagnostics | None = None) -> torch.Tensor:
    """One optimizer step; returns the detached loss. `hessian`: this step feeds a Hessian estimate.
    `diagnostics`: measure this step (gradients before `step()`, the change it made after).

    The estimate is either the entry's own (e.g. on a sub-batch, made before this step's forward so the
    two graphs never coexist) or, when the entry gives none, the optimizer's, from this backward's graph.
    """
    estimate = entry.hessian_estimate(model, optimizer, x, y, amp) if hessian else None
    second_order = hessian and estimate is None
    # Double backward through attention needs the math kernel; plain steps keep the fused one.
    with amp, (sdpa_kernel(SDPBackend.MATH) if second_order else nullcontext()):
        loss = F.cross_entropy(model(x), y)
    with warnings.catch_warnings():
        # create_graph=True warns about a param<->grad reference cycle; zero_grad(set_to_none) breaks it.
        warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
        loss.backward(create_graph=second_order)
    if diagnostics is not None:
        diagnostics.before_step()
    optimizer.step(**({} if estimate is None else {"hessian": estimate}))
    if diagnostics is not None:
        diagnostics.after_step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


@torch.inference_mode()
def evaluate(model: torch.nn.Module, data: ImageData, batch_size: int, amp) -> tuple[float, float]:
    """Mean test loss and accuracy (a fraction in [0, 1]) over the whole test split."""
    model.eval()
    loss_sum = torch.zeros((), device=data.test_x.device)
    correct = torch.zeros((), device=data.test_x.device, dtype=torch.int64)
    for start in range(0, data.test_x.shape[0], batch_size):
        x = data.normalize(data.test_x[start:start + batch_size])
        y = data.test_y[start:start + batch_size]
        with amp:
            logits = model(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(dim=1) == y).sum()
    n = data.test_x.shape[0]
    return loss_sum.item() / n, correct.item() / n


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, entry: OptimizerEntry,
          scheduler: torch.optim.lr_scheduler.LRScheduler | None, data: ImageData, *, epochs: int,
          batch_size: int, eval_batch_size: int, seed: int, augment: bool, precision: str, log_every: int,
          reporter: Reporter, resume: TrainResult | None = None,
          checkpoint: Callable[[TrainResult], None] | None = None,
          stop_requested: Callable[[], bool] = lambda: False,
          eager_model: torch.nn.Module | None = None, diagnostics: StepDiagnostics | None = None,
          before_eval: Callable[[int], None] | None = None) -> TrainResult:
    """Train for `epochs` (continuing from `resume`), evaluating after each epoch.

    `checkpoint(result)` is called after each epoch's evaluation (Schedule-Free then in eval mode, as the
    next epoch starts from) and when a stop is requested (then in train mode, as the next step needs);
    `stop_requested()` is polled once per step (a Python flag, no device sync).
    `eager_model`: the uncompiled module when `model` is torch.compile'd; Hessian steps use it, since
    compiled graphs cannot be differentiated twice. `diagnostics`: measured on log-point steps, sent
    to `reporter.log_point` and averaged per epoch into the history row's "diagnostics".
    `before_eval(epoch)`: called with the evaluated weights in place, before each epoch's evaluation and
    on its clock (Schedule-Free with BatchNorm: its statistics are recomputed there, optbench/experiment.py).
    """
    device = data.train_x.device
    amp = autocast_for(device, precision)
    result = resume or TrainResult()
    train_clock, eval_clock = Stopwatch(device), Stopwatch(device)
    train_clock.total, eval_clock.total = result.train_time_s, result.eval_time_s
    train_clock.cpu_total = result.train_cpu_time_s
    steps_dev = torch.full((), result.steps, dtype=torch.int64, device=device)  # step counter, on the device
    first_bad_step = torch.full((), -1, dtype=torch.int64, device=device)
    steps_per_epoch = -(-data.train_x.shape[0] // batch_size)

    def close_books() -> None:
        if train_clock.running_now:
            train_clock.stop()
        result.train_time_s, result.eval_time_s = train_clock.total, eval_clock.total
        result.train_cpu_time_s = train_clock.cpu_total

    try:
        for epoch in range(result.epochs_done + 1, epochs + 1):
            model.train()
            entry.train_mode(optimizer)
            reporter.epoch_start(epoch, epochs, steps_per_epoch)
            loss_sum = torch.full((), result.epoch_loss_sum, device=device)
            epoch_steps, epoch_images = result.step_in_epoch, 0
            step_lr = entry.current_lr(optimizer)
            train_clock.start()
            for x, y in train_batches(data, batch_size, seed, epoch, augment, start_step=result.step_in_epoch):
                hessian = entry.hessian_due(optimizer)
                step_model = eager_model if hessian and eager_model is not None else model
                ends_at_log_point = (epoch_steps + 1) % log_every == 0 or epoch_steps + 1 == steps_per_epoch
                loss = training_step(step_model, optimizer, entry, x, y, amp, hessian,
                                     diagnostics if ends_at_log_point else None)
                if ends_at_log_point:  # the lr this step used: read before the schedule moves on to the next
                    step_lr = entry.current_lr(optimizer)
                if scheduler is not None:
                    scheduler.step()
                steps_dev += 1
                first_bad_step = torch.where((first_bad_step < 0) & ~torch.isfinite(loss), steps_dev, first_bad_step)
                loss_sum += loss
                epoch_steps += 1
                result.steps += 1
                result.hessian_steps += int(hessian)
                result.images_seen += y.shape[0]
                epoch_images += y.shape[0]
                at_log_point = epoch_steps % log_every == 0 or epoch_steps == steps_per_epoch
                if at_log_point or stop_requested():
                    bad = int(first_bad_step.item())  # device reads happen only here: every log_every steps
                    if bad >= 0:
                        result.status, result.diverged_at_step = "diverged", bad
                        result.detail = f"non-finite loss at step {bad}"
                        break
                    elapsed = train_clock.peek()
                    running_loss, images_per_s = loss_sum.item() / epoch_steps, \
                        epoch_images / elapsed if elapsed > 0 else float("nan")
                    reporter.progress(epoch_steps, running_loss, images_per_s)
                    reporter.log_point(result.steps, {"loss": loss.item(), "running_loss": running_loss,
                                                      "lr": step_lr, "images_per_s": images_per_s,
                                                      **(diagnostics.read() if diagnostics is not None else {})})
                if stop_requested():  # between steps: the state is consistent, so it can be saved
                    result.step_in_epoch, result.epoch_loss_sum = epoch_steps, loss_sum.item()
                    raise StopRequested
            train_clock.stop()
            if result.status == "diverged":
                break
            with eval_clock.running():
                entry.eval_mode(optimizer)  # Schedule-Free: evaluate the averaged weights x, not y
                if before_eval is not None:
                    before_eval(epoch)
                test_loss, test_acc = evaluate(model, data, eval_batch_size, amp)
            row = {
                "epoch": epoch,
                "train_loss": loss_sum.item() / epoch_steps,
                "test_loss": test_loss,
                "test_acc": test_acc,
                "train_time_s": train_clock.total,
                "train_cpu_time_s": train_clock.cpu_total,  # process CPU time, cumulative like train_time_s
                "steps": result.steps,
                "lr": step_lr,  # the lr of the epoch's last step
            }
            if diagnostics is not None:
                row["diagnostics"] = diagnostics.epoch_summary()
            result.history.append(row)
            result.epochs_done, result.step_in_epoch, result.epoch_loss_sum = epoch, 0, 0.0
            if not math.isfinite(test_loss):
                result.status, result.diverged_at_step = "diverged", result.steps
                result.detail = f"non-finite test loss after epoch {epoch}"
                break
            reporter.epoch_end(row)
            if checkpoint is not None and epoch < epochs:
                close_books()
                checkpoint(result)
    except StopRequested:
        close_books()
        result.status, result.detail = "interrupted", f"stopped on request after {result.steps} steps"
        if checkpoint is not None:
            # Saved as training left it (Schedule-Free in train mode, holding y): an eval()/train() round
            # trip is not exact in floating point, and the uninterrupted run makes none mid-epoch.
            checkpoint(result)
    except KeyboardInterrupt:
        # Raised mid-step: weights and counters may disagree, so no checkpoint; the last epoch's stays.
        close_books()
        result.status, result.detail = "interrupted", f"interrupted after {result.steps} steps (not checkpointed)"
    except torch.OutOfMemoryError as exc:
        result.status = "oom"
        result.detail = f"out of memory at batch size {batch_size}: {str(exc).splitlines()[0]}"
    except Exception as exc:  # e.g. a torch.compile backend failure: keep the history, say what happened
        result.status = "failed"
        result.detail = f"{exc.__class__.__name__} after {result.steps} steps: {(str(exc).splitlines() or [''])[0]}"
    finally:
        close_books()
    entry.eval_mode(optimizer)  # leave the model holding the weights that were evaluated
    return result
