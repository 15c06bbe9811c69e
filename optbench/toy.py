"""`optbench toy`: the benchmarked optimizers raced on classic 2-D functions, where their paths can be seen.

Each benchmarked optimizer is built through its registry entry (optbench/optimizers.py) with its course
hyperparameters and driven the way the training loop drives it: Sophia's Hessian-due steps backpropagate
with `create_graph=True` (the real Hutchinson estimate), Schedule-Free is put in train mode before stepping
and read in eval mode. SGD with momentum runs beside them as a yardstick.

Only two things are toy-specific, both stated in the output: the learning rate, per function and optimizer
from toy.yaml and constant (no external schedule; Schedule-Free's internal warmup is 0 steps), and
weight decay, 0 for all (decay pulls a point towards the origin, not towards the function's minimum).

Points are float64 so that losses far below float32's resolution still show on a log scale.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from optbench.errors import ConfigError
from optbench.optimizers import BASELINE, COURSE_SET, BuildContext, Built, get_entry
from optbench.settings import find_settings_file, toy_file

REFERENCE = "sgd"  # not benchmarked: plain SGD with momentum, for scale
REFERENCE_TITLE = "SGD+momentum (ref.)"
APPENDIX = "appendix_adam"  # the course appendix's Adam, written by hand in NumPy (a reference path)
APPENDIX_TITLE = "Adam by hand (course appendix, NumPy)"


# --- Objectives ------------------------------------------------------------------------------------
# Each takes points of shape [..., 2] and returns values of shape [...], so the same definition serves
# the optimizers (one point, differentiated twice for Sophia) and the contour plot (a whole grid).


def rosenbrock(points: torch.Tensor) -> torch.Tensor:
    x, y = points[..., 0], points[..., 1]
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


def rotated_quadratic(points: torch.Tensor) -> torch.Tensor:
    # Curvature 100 across the diagonal x = y and 1 along it (condition number 100). The axes are turned
    # 45 degrees so that per-coordinate scaling (Adam, Lion's sign, Sophia's diagonal) cannot undo them.
    x, y = points[..., 0], points[..., 1]
    return ((x + y) ** 2 + 100 * (x - y) ** 2) / 4


@dataclass(frozen=True)
class Objective:
    name: str
    title: str
    formula: str
    minimum: tuple[float, float]
    value: Callable[[torch.Tensor], torch.Tensor]


OBJECTIVES: dict[str, Objective] = {
    "rosenbrock": Objective("rosenbrock", "Rosenbrock", "(1-x)^2 + 100 (y-x^2)^2", (1.0, 1.0), rosenbrock),
    "quadratic": Objective("quadratic", "Rotated quadratic (condition number 100)",
                           "((x+y)^2 + 100 (x-y)^2) / 4", (0.0, 0.0), rotated_quadratic),
}


def get_objective(name: str) -> Objective:
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ConfigError(f"unknown function '{name}': choose one of {', '.join(OBJECTIVES)}") from None


# --- Settings (toy.yaml) -------------------------------------------------------------------


@dataclass(frozen=True)
class ToySettings:
    """One function's defaults from toy.yaml."""

    start: tuple[float, float]
    steps: int
    loss_threshold: float
    view: tuple[tuple[float, float], tuple[float, float]]  # (x range, y range) of the plot
    lr: dict[str, float]  # per contender; an optimizer without one races at its own default lr
    seed: int
    reference: dict[str, Any]  # SGD's hyperparameters other than lr
    appendix: dict[str, Any] | None = None  # the appendix Adam's betas and eps, on its function only


def _positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _pair(value: Any) -> tuple[float, float] | None:
    if (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)):
        return float(value[0]), float(value[1])
    return None


def toy_settings(function: str) -> ToySettings:
    get_objective(function)  # unknown names fail here with the list of known ones
    data = toy_file()
    where = str(find_settings_file("toy.yaml") or "toy.yaml")
    spec = (data.get("functions") or {}).get(function)
    if not isinstance(spec, dict):
        raise ConfigError(f"{where} has no settings for function '{function}'")
    start = _pair(spec.get("start"))
    if start is None:
        raise ConfigError(f"{where}: {function}.start must be two numbers [x, y]")
    steps = spec.get("steps")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"{where}: {function}.steps must be a whole number >= 1")
    threshold = spec.get("loss_threshold")
    if not _positive_number(threshold):
        raise ConfigError(f"{where}: {function}.loss_threshold must be a positive number")
    view = spec.get("view") or {}
    xs, ys = _pair(view.get("x")), _pair(view.get("y"))
    if xs is None or ys is None or xs[0] >= xs[1] or ys[0] >= ys[1]:
        raise ConfigError(f"{where}: {function}.view needs x: [low, high] and y: [low, high]")
    lrs = spec.get("lr") or {}
    if not isinstance(lrs, dict):
        raise ConfigError(f"{where}: {function}.lr must map optimizer names to learning rates")
    for key in (*COURSE_SET, REFERENCE):
        if not _positive_number(lrs.get(key)):
            raise ConfigError(f"{where}: {function}.lr.{key} must be a positive number")
    for key, value in lrs.items():
        if not _positive_number(value):
            raise ConfigError(f"{where}: {function}.lr.{key} must be a positive number")
    seed = spec.get("seed", data.get("seed", 0))  # the function's own seed, else the file's
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
        raise ConfigError(f"{where}: seed must be a whole number in [0, 2**31)")
    appendix = data.get("appendix_adam")
    if appendix is not None:
        betas, eps = (appendix.get("betas"), appendix.get("eps")) if isinstance(appendix, dict) else (None, None)
        if _pair(betas) is None or not all(0 <= b < 1 for b in betas) or not _positive_number(eps):
            raise ConfigError(f"{where}: appendix_adam needs betas: [b1, b2] in [0, 1) and a positive eps")
        appendix = ({"betas": _pair(betas), "eps": float(eps)} if appendix.get("function") == function else None)
    reference = data.get("reference") or {}
    momentum = reference.get("momentum") if isinstance(reference, dict) else None
    if (not isinstance(reference, dict) or set(reference) != {"momentum"} or isinstance(momentum, bool)
            or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1):
        raise ConfigError(f"{where}: reference must be {{momentum: M}} with M in [0, 1), SGD's momentum")
    return ToySettings(start, steps, float(threshold), (xs, ys), {k: float(v) for k, v in lrs.items()},
                       seed, dict(reference), appendix)


def parse_start(text: str) -> tuple[float, float]:
    """'X,Y' -> (X, Y), both finite."""
    parts = text.split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        x, y = float(parts[0]), float(parts[1])
    except ValueError:
        raise ConfigError(f"--start expects two numbers X,Y (e.g. --start -1.2,1), got '{text}'") from None
    if not (math.isfinite(x) and math.isfinite(y)):
        raise ConfigError(f"--start must be finite numbers, got '{text}'")
    return x, y


# --- Contenders ------------------------------------------------------------------------------------


def _noop(optimizer: torch.optim.Optimizer) -> None:
    return None


def _never(optimizer: torch.optim.Optimizer) -> bool:
    return False


@dataclass(frozen=True)
class Contender:
    """One optimizer as the toy drives it: built and handled by its registry entry, or the SGD reference."""

    key: str
    title: str
    hparams: dict[str, Any]  # exactly what it is built with
    build: Callable[[list[torch.Tensor]], Built]
    train_mode: Callable[[torch.optim.Optimizer], None] = _noop
    eval_mode: Callable[[torch.optim.Optimizer], None] = _noop
    hessian_due: Callable[[torch.optim.Optimizer], bool] = _never
    averaged: bool = False  # reports an averaged point in eval mode (Schedule-Free's x)


class _Point(torch.nn.Module):
    """The 2-D point as a model, so optimizers are built from a model as in training."""

    def __init__(self, point: torch.nn.Parameter):
        super().__init__()
        self.point = point


def toy_hparams(name: str, lr: float) -> dict[str, Any]:
    """A benchmarked optimizer's course hyperparameters with the toy's lr and no weight decay."""
    hparams = get_entry(name).defaults()
    hparams["lr"] = lr
    hparams["weight_decay"] = 0.0
    return hparams


def contenders(settings: ToySettings, steps: int, optimizers: list[str] | None = None) -> list[Contender]:
    """The optimizers raced (default: the course's four) and the SGD reference, ready to build."""
    # Constant lr and no warmup: the toy has no schedule, and Schedule-Free's warmup would be one.
    context = BuildContext(device_type="cpu", total_steps=steps, warmup_steps=0)
    out = []
    for name in optimizers or COURSE_SET:
        entry = get_entry(name)
        hparams = toy_hparams(name, settings.lr.get(name, entry.defaults()["lr"]))
        out.append(Contender(name, entry.title, hparams,
                             lambda params, entry=entry, hparams=hparams: entry.make(_Point(params[0]), hparams,
                                                                                      context),
                             entry.train_mode, entry.eval_mode, entry.hessian_due, entry.averaged_eval))
    sgd_hparams = {"lr": settings.lr[REFERENCE], **settings.reference, "weight_decay": 0.0}

    def build_sgd(params: list[torch.Tensor]) -> Built:
        return Built(torch.optim.SGD(params, **sgd_hparams), {"class": "torch.optim.SGD"})

    out.append(Contender(REFERENCE, REFERENCE_TITLE, sgd_hparams, build_sgd))
    return out


# --- Runs ------------------------------------------------------------------------------------------


@dataclass
class ToyRun:
    key: str
    title: str
    hparams: dict[str, Any]
    implementation: dict[str, Any]
    points: np.ndarray  # [n + 1, 2]: the start, then the point the optimizer reports after each step
    losses: np.ndarray  # [n + 1]: the function at those points
    hessian_steps: int  # steps whose backward used create_graph=True (Sophia's Hutchinson estimates)
    diverged_at: int | None  # first step with a non-finite loss; the run stops there
    averaged: bool = False  # the points are an average read in eval mode (Schedule-Free's x)

    @property
    def final_point(self) -> tuple[float, float]:
        return float(self.points[-1, 0]), float(self.points[-1, 1])

    @property
    def final_loss(self) -> float:
        return float(self.losses[-1])

    def steps_to(self, threshold: float) -> int | None:
        """The first step whose loss is <= threshold (0: the start already is), None if never."""
        hits = np.flatnonzero(self.losses <= threshold)
        return int(hits[0]) if hits.size else None

    def distance_to(self, point: tuple[float, float]) -> float:
        return math.dist(self.final_point, point)


@dataclass
class ToyResult:
    objective: Objective
    start: tuple[float, float]
    steps: int
    seed: int
    loss_threshold: float
    view: tuple[tuple[float, float], tuple[float, float]]
    runs: list[ToyRun]

    def run(self, key: str) -> ToyRun:
        return next(r for r in self.runs if r.key == key)


def _loss_at(objective: Objective, point: torch.Tensor) -> float:
    with torch.no_grad():
        return float(objective.value(point))


def _reported_point(point: torch.Tensor, optimizer: torch.optim.Optimizer,
                    eval_mode: Callable[[torch.optim.Optimizer], None]) -> np.ndarray:
    """The point the optimizer would hand back now (Schedule-Free: its average x), read from a copy so
    that switching modes cannot disturb the run (train(eval(y)) is y only up to rounding)."""
    # Copied together, so the copied optimizer holds (and eval_mode moves) the copied point.
    snapshot = copy.deepcopy({"point": point, "optimizer": optimizer})
    eval_mode(snapshot["optimizer"])
    return snapshot["point"].detach().numpy().copy()


def race(contender: Contender, objective: Objective, start: tuple[float, float], steps: int,
         seed: int) -> ToyRun:
    """Run one contender for `steps` constant-lr steps from `start`."""
    torch.manual_seed(seed)  # Sophia's Hutchinson probes are the only random draws
    point = torch.nn.Parameter(torch.tensor(start, dtype=torch.float64))
    built = contender.build([point])
    optimizer = built.optimizer
    contender.train_mode(optimizer)
    points = [np.array(start, dtype=np.float64)]
    losses = [_loss_at(objective, point)]
    hessian_steps, diverged_at = 0, None
    for step in range(1, steps + 1):
        hessian = contender.hessian_due(optimizer)
        loss = objective.value(point)
        with warnings.catch_warnings():
            # create_graph=True warns about a param<->grad reference cycle; zero_grad(set_to_none) breaks it.
            warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
            loss.backward(create_graph=hessian)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        hessian_steps += int(hessian)
        reported = _reported_point(point, optimizer, contender.eval_mode)
        points.append(reported)
        losses.append(_loss_at(objective, torch.from_numpy(reported)))
        if not math.isfinite(losses[-1]):
            diverged_at = step
            break
    # The run's answer is read from the optimizer itself in eval mode (Schedule-Free: the average x).
    contender.eval_mode(optimizer)
    points[-1] = point.detach().numpy().copy()
    losses[-1] = _loss_at(objective, point)
    return ToyRun(contender.key, contender.title, contender.hparams, built.implementation, np.stack(points),
                  np.array(losses), hessian_steps, diverged_at, contender.averaged)


# --- The course appendix's reference: Adam written by hand in NumPy ---------------------------------
# The appendix's own code for the function and its gradient (Clase 114, "Apéndice: notebook"), verbatim,
# and Adam's update as the course writes it (lecture 4-3, Algorithm 2 with no weight decay). No torch:
# this path checks the libraries' Adam against the rule on paper.


def rosen(w):
    x, y = w
    return (1 - x)**2 + 100 * (y - x**2)**2


def rosen_grad(w):
    x, y = w
    dx = -2*(1 - x) - 400*x*(y - x**2)
    dy = 200*(y - x**2)
    return np.array([dx, dy])


def appendix_adam_step(w: np.ndarray, g: np.ndarray, m: np.ndarray, v: np.ndarray, t: int, lr: float,
                       beta1: float, beta2: float, eps: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Step t (from 1) of Adam: returns the new point and moments."""
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g**2
    m_hat = m / (1 - beta1**t)
    v_hat = v / (1 - beta2**t)
    return w - lr * m_hat / (np.sqrt(v_hat) + eps), m, v


def appendix_adam_run(start: tuple[float, float], steps: int, lr: float, betas: tuple[float, float], eps: float,
                      seed: int) -> ToyRun:
    """The appendix's Adam on its Rosenbrock from `start`, in float64 NumPy."""
    np.random.seed(seed)  # as the appendix does; this Adam draws no random numbers
    w = np.array(start, dtype=np.float64)
    m, v = np.zeros(2), np.zeros(2)
    points, losses, diverged_at = [w.copy()], [float(rosen(w))], None
    with np.errstate(over="ignore", invalid="ignore"):
        for t in range(1, steps + 1):
            w, m, v = appendix_adam_step(w, rosen_grad(w), m, v, t, lr, betas[0], betas[1], eps)
            points.append(w.copy())
            losses.append(float(rosen(w)))
            if not math.isfinite(losses[-1]):
                diverged_at = t
                break
    hparams = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": 0.0}
    return ToyRun(APPENDIX, APPENDIX_TITLE, hparams, {"class": "NumPy, the course appendix's Adam update"},
                  np.stack(points), np.array(losses), 0, diverged_at)


def appendix_agreement(result: "ToyResult") -> float | None:
    """Largest distance, over the steps both ran, between the appendix's hand-written Adam and the baseline
    (torch's AdamW, here at weight decay 0 and the same lr, betas and eps: Adam's rule exactly)."""
    try:
        ours, torch_run = result.run(APPENDIX), result.run(BASELINE)
    except StopIteration:
        return None
    same = all(ours.hparams[k] == (tuple(torch_run.hparams[k]) if k == "betas" else torch_run.hparams[k])
               for k in ("lr", "betas", "eps", "weight_decay"))
    if not same:
        return None
    n = min(len(ours.points), len(torch_run.points))
    return float(np.abs(ours.points[:n] - torch_run.points[:n]).max())


def run_toy(function: str = "rosenbrock", steps: int | None = None, start: tuple[float, float] | None = None,
            seed: int | None = None, optimizers: list[str] | None = None) -> ToyResult:
    """Race every benchmarked optimizer and the SGD reference on one function from one start.

    None takes the function's default from toy.yaml.
    """
    objective = get_objective(function)
    settings = toy_settings(function)
    steps = settings.steps if steps is None else steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"--steps must be a whole number >= 1, got {steps!r}")
    seed = settings.seed if seed is None else seed
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
        raise ConfigError(f"--seed must be a whole number in [0, 2**31), got {seed!r}")
    start_point = _pair(settings.start if start is None else start)
    if start_point is None:
        raise ConfigError(f"--start must be two finite numbers, got {start!r}")
    runs = [race(c, objective, start_point, steps, seed) for c in contenders(settings, steps, optimizers)]
    if settings.appendix is not None:
        runs.append(appendix_adam_run(start_point, steps, settings.lr[BASELINE], settings.appendix["betas"],
                                      settings.appendix["eps"], seed))
    return ToyResult(objective, start_point, steps, seed, settings.loss_threshold, settings.view, runs)


# --- Text output -----------------------------------------------------------------------------------


def _hparam_text(hparams: dict[str, Any]) -> str:
    parts = []
    for key, value in hparams.items():
        if isinstance(value, (list, tuple)):
            value = "(" + ", ".join(f"{v:g}" for v in value) + ")"
        elif isinstance(value, float):
            value = f"{value:g}"
        parts.append(f"{key}={value}")
    return ", ".join(parts)


def run_notes(result: ToyResult) -> list[str]:
    """What was run, in words: everything needed to re-run one optimizer by hand."""
    obj = result.objective
    lines = [
        f"{obj.title}: f(x, y) = {obj.formula}, minimum {_point_text(obj.minimum)}, "
        f"start {_point_text(result.start)}, {result.steps} steps, float64.",
        f"Seed {result.seed}: torch.manual_seed({result.seed}) before each optimizer "
        "(Sophia's Hutchinson probes are random).",
        "Learning rates: per function from toy.yaml, constant (no external schedule; "
        "Schedule-Free's warmup_steps=0). Weight decay 0 for every optimizer; the other hyperparameters are "
        "the course's (optimizers/*.yaml).",
    ]
    for run in result.runs:
        lines.append(f"  {run.title}: {_hparam_text(run.hparams)}")
    sophia = next((r for r in result.runs if r.hessian_steps), None)
    if sophia is not None:
        lines.append(f"{sophia.title}: Hutchinson Hessian estimate (backward with create_graph=True) on "
                     f"{sophia.hessian_steps} of its steps.")
    lines.append(f"Steps to loss <= {result.loss_threshold:g}: the first step at or below it (the loss may rise "
                 "again); 'never' if no step reached it.")
    lines.append("Schedule-Free AdamW: its path, losses and final point are the averaged point x (read in eval "
                 "mode); its gradients are taken at another point, y.")
    if any(r.key == APPENDIX for r in result.runs):
        lines.append(f"{APPENDIX_TITLE}: the course appendix's comparison path, its rosen_grad and Adam's update "
                     "as the course writes it (m, v moving averages, bias correction, w -= lr m_hat / "
                     f"(sqrt(v_hat) + eps)), np.random.seed({result.seed}) as in the appendix; its start point "
                     "is not in the appendix, so the toy's is used.")
        gap = appendix_agreement(result)
        if gap is not None:
            lines.append(f"  It and torch's AdamW at weight decay 0 (the same rule) stay within {gap:.1e} of each "
                         "other at every step: the library does what the course's formula says.")
    return lines


def _coordinate(value: float) -> str:
    # Fixed decimals near the minimum; a diverged run's 1e300 would otherwise print 300 digits.
    return f"{value:.5f}" if abs(value) < 1e4 else f"{value:.2e}"


def _point_text(point: tuple[float, float]) -> str:
    return f"({point[0]:.4g}, {point[1]:.4g})"


def summary_table(result: ToyResult):
    """A rich table: one row per optimizer, where it ended and how fast it got below the threshold."""
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, show_edge=False, collapse_padding=True, title=f"optbench toy: {result.objective.title}, {result.steps} steps from "
                        f"{_point_text(result.start)}")
    # Light borders, one column per coordinate and wrapping headers keep every number whole in an
    # 80-column terminal.
    table.add_column("optimizer", min_width=13, overflow="fold")
    for header in ("lr", "final x", "final y", "distance to min", "final loss"):
        table.add_column(header, justify="right", no_wrap=header != "distance to min")
    table.add_column(f"steps to loss <= {result.loss_threshold:g}", justify="right")
    for run in result.runs:
        reached = run.steps_to(result.loss_threshold)
        if run.diverged_at is not None:
            final_loss = f"diverged at step {run.diverged_at}"
        else:
            final_loss = f"{run.final_loss:.2e}"
        x, y = run.final_point
        table.add_row(run.title, f"{run.hparams['lr']:g}", _coordinate(x), _coordinate(y),
                      f"{run.distance_to(result.objective.minimum):.2e}", final_loss,
                      "never" if reached is None else str(reached))
    return table


__all__ = [
    "APPENDIX",
    "OBJECTIVES",
    "Contender",
    "Objective",
    "ToyResult",
    "ToyRun",
    "appendix_adam_run",
    "appendix_adam_step",
    "appendix_agreement",
    "contenders",
    "get_objective",
    "parse_start",
    "race",
    "run_notes",
    "run_toy",
    "summary_table",
    "toy_hparams",
    "toy_settings",
]
