"""The optimizer registry: one entry per optimizer, and the only module that names one.

An entry says how to build the optimizer from its hyperparameters (defaults in
`configs/optimizers/NAME.yaml`) and what the training loop must do around `step()` for it:

- `external_schedule`: the loop applies the shared warmup + cosine schedule (AdamW, Lion, Sophia).
  Schedule-Free must never get one: it warms up internally and its averaging *is* the schedule.
- `train_mode` / `eval_mode`: Schedule-Free keeps two points, y (where gradients are taken) and x (the
  average that generalises). `eval_mode` swaps x into the model; evaluating or saving without it
  silently uses y. The loop calls `eval_mode` before every evaluation and `train_mode` before training.
- `hessian_due`: SophiaH estimates the Hessian diagonal (Hutchinson) on the steps where its own counter,
  read before the step, is a multiple of `update_period`. That backward must use `create_graph=True`,
  and timm's fused attention cannot be differentiated twice, so those forwards use math attention.
  Plain steps use neither (both are slower and hold more memory).

Library traps handled here (each pinned by a test):
- lion-pytorch's `decoupled_weight_decay=True` divides weight decay by the initial lr (wd 0.5 at lr 1e-4
  would shrink weights by half each step); it is always built with False, so the shrink is lr * wd.
- SophiaH's weight decay is multiplied by lr, and its lr is on another scale than AdamW's: its default
  weight decay is chosen so lr * wd equals AdamW's per-step shrink (see configs/optimizers/sophia.yaml).
- AdamWScheduleFree divides `p.grad` in place inside `step()`: anything reading gradients (clipping,
  norms) must do so before `step()`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from optbench.config import optimizer_defaults
from optbench.errors import ConfigError


@dataclass(frozen=True)
class BuildContext:
    """What a constructor may depend on besides its hyperparameters."""

    device_type: str  # "cpu" or "cuda"
    total_steps: int
    warmup_steps: int  # already scaled to the run's length


@dataclass
class Built:
    optimizer: torch.optim.Optimizer
    implementation: dict[str, Any]  # what actually ran: class, code path, effective arguments


def _noop(optimizer: torch.optim.Optimizer) -> None:
    return None


def _never(optimizer: torch.optim.Optimizer) -> bool:
    return False


def _no_warnings(hparams: dict[str, Any]) -> list[str]:
    return []


def _group_lr(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


@dataclass(frozen=True)
class OptimizerEntry:
    name: str
    library: str  # distribution name, recorded with its version
    build: Callable[[Iterable[torch.nn.Parameter], dict[str, Any], BuildContext], Built]
    external_schedule: bool
    train_mode: Callable[[torch.optim.Optimizer], None] = _noop
    eval_mode: Callable[[torch.optim.Optimizer], None] = _noop
    hessian_due: Callable[[torch.optim.Optimizer], bool] = _never
    # Makes the next step a Hessian step (memory probe only, on a throwaway copy).
    force_hessian_next: Callable[[torch.optim.Optimizer], None] | None = None
    warnings: Callable[[dict[str, Any]], list[str]] = _no_warnings
    current_lr: Callable[[torch.optim.Optimizer], float] = _group_lr  # the lr the last step used
    # Hessian estimates the optimizer itself made (counted inside the library call), or None.
    hessian_estimates: Callable[[torch.optim.Optimizer], int] | None = None
    extra_hparams: frozenset[str] = field(default_factory=frozenset)
    choices: dict[str, tuple[str, ...]] = field(default_factory=dict)  # hyperparameters with fixed options
    # State after the first step: names of tensors shaped like each parameter, and how many 4-byte
    # scalar tensors per parameter (torch's AdamW keeps `step` as one). Read from the libraries'
    # sources; tests/test_memory.py checks it against the real optimizers.
    state_layout: tuple[tuple[str, ...], int] = ((), 0)

    def defaults(self) -> dict[str, Any]:
        return optimizer_defaults(self.name)

    @property
    def title(self) -> str:
        return str(self.defaults().get("title", self.name))


# --- AdamW -----------------------------------------------------------------------------------------

_ADAMW_IMPLEMENTATIONS = ("auto", "fused", "foreach", "forloop")


def _build_adamw(params, hp, ctx: BuildContext) -> Built:
    impl = hp.get("implementation", "auto")
    if impl not in _ADAMW_IMPLEMENTATIONS:
        raise ConfigError(f"AdamW implementation '{impl}' unknown: choose one of {', '.join(_ADAMW_IMPLEMENTATIONS)}")
    if impl == "auto":
        # fused allocates no temporaries in step(); foreach (torch's CUDA default) allocates ~1x params.
        impl = "fused" if ctx.device_type == "cuda" else "forloop"
    flags = {"fused": {"fused": True}, "foreach": {"foreach": True}, "forloop": {"foreach": False}}[impl]
    opt = torch.optim.AdamW(
        params, lr=hp["lr"], betas=tuple(hp["betas"]), eps=hp["eps"], weight_decay=hp["weight_decay"], **flags
    )
    return Built(opt, {"class": "torch.optim.AdamW", "code_path": impl, **flags})


# --- Lion ------------------------------------------------------------------------------------------


def _build_lion(params, hp, ctx: BuildContext) -> Built:
    from lion_pytorch import Lion

    # decoupled_weight_decay=True would divide wd by the initial lr: never use it (module docstring).
    opt = Lion(params, lr=hp["lr"], betas=tuple(hp["betas"]), weight_decay=hp["weight_decay"],
               use_triton=False, decoupled_weight_decay=False)
    return Built(opt, {"class": "lion_pytorch.Lion", "code_path": "forloop", "decoupled_weight_decay": False})


def _lion_warnings(hp: dict[str, Any]) -> list[str]:
    out = []
    if hp["lr"] > 3e-4:
        out.append(
            f"Lion at lr {hp['lr']:g} is at AdamW's scale and tends to diverge (loss=nan): "
            "use a learning rate 3-10x smaller than AdamW's, 1e-4 to 3e-4."
        )
    if hp["weight_decay"] < 0.1:
        out.append(
            f"Lion with weight decay {hp['weight_decay']:g} is usually worse: "
            "use 3-10x AdamW's weight decay (e.g. 0.5 for AdamW's 0.05)."
        )
    return out


# --- Sophia (Hutchinson) ---------------------------------------------------------------------------


def _build_sophia(params, hp, ctx: BuildContext) -> Built:
    from pytorch_optimizer import SophiaH

    opt = SophiaH(
        params, lr=hp["lr"], betas=tuple(hp["betas"]), weight_decay=hp["weight_decay"], weight_decouple=True,
        fixed_decay=False, p=hp["p"], update_period=hp["update_period"], num_samples=1,
        hessian_distribution=hp["hessian_distribution"], eps=hp["eps"],
    )
    _count_hessian_estimates(opt)
    return Built(opt, {"class": "pytorch_optimizer.SophiaH", "code_path": "foreach-if-supported",
                       "estimator": "hutchinson", "update_period": hp["update_period"]})


def _count_hessian_estimates(optimizer) -> None:
    """Count the Hutchinson estimates SophiaH really makes, independently of the loop's own plan."""
    estimate = optimizer.compute_hutchinson_hessian
    optimizer.hessian_estimates_made = 0

    def counted(*args, **kwargs):
        optimizer.hessian_estimates_made += 1
        return estimate(*args, **kwargs)

    optimizer.compute_hutchinson_hessian = counted


def _sophia_estimates(optimizer) -> int:
    return optimizer.hessian_estimates_made


def _sophia_hessian_due(optimizer: torch.optim.Optimizer) -> bool:
    # SophiaH estimates when its step counter, read before the step, is a multiple of update_period.
    return optimizer.param_groups[0].get("step", 0) % optimizer.update_period == 0


def _sophia_force_hessian_next(optimizer: torch.optim.Optimizer) -> None:
    for group in optimizer.param_groups:
        group["step"] = -(-group["step"] // optimizer.update_period) * optimizer.update_period


# --- Schedule-Free AdamW ---------------------------------------------------------------------------


def _build_schedulefree(params, hp, ctx: BuildContext) -> Built:
    from schedulefree import AdamWScheduleFree

    opt = AdamWScheduleFree(
        params, lr=hp["lr"], betas=tuple(hp["betas"]), eps=hp["eps"], weight_decay=hp["weight_decay"],
        warmup_steps=ctx.warmup_steps,
    )
    foreach = bool(opt.param_groups[0]["foreach"])
    return Built(opt, {"class": "schedulefree.AdamWScheduleFree", "code_path": "foreach" if foreach else "forloop",
                       "warmup_steps": ctx.warmup_steps})


def _schedulefree_lr(optimizer) -> float:
    # AdamWScheduleFree keeps the base lr in "lr" and the warmed-up one it used in "scheduled_lr".
    return float(optimizer.param_groups[0].get("scheduled_lr", optimizer.param_groups[0]["lr"]))


def _schedulefree_train(optimizer) -> None:
    optimizer.train()


def _schedulefree_eval(optimizer) -> None:
    optimizer.eval()


REGISTRY: dict[str, OptimizerEntry] = {
    "adamw": OptimizerEntry("adamw", "torch", _build_adamw, external_schedule=True,
                            choices={"implementation": _ADAMW_IMPLEMENTATIONS},
                            state_layout=(("exp_avg", "exp_avg_sq"), 1)),
    "lion": OptimizerEntry("lion", "lion-pytorch", _build_lion, external_schedule=True, warnings=_lion_warnings,
                           state_layout=(("exp_avg",), 0)),
    "sophia": OptimizerEntry("sophia", "pytorch-optimizer", _build_sophia, external_schedule=True,
                             hessian_due=_sophia_hessian_due, force_hessian_next=_sophia_force_hessian_next,
                             hessian_estimates=_sophia_estimates,
                             choices={"hessian_distribution": ("rademacher", "gaussian")},
                             state_layout=(("momentum", "hessian_moment", "hessian"), 0)),
    "schedulefree": OptimizerEntry("schedulefree", "schedulefree", _build_schedulefree, external_schedule=False,
                                   train_mode=_schedulefree_train, eval_mode=_schedulefree_eval,
                                   current_lr=_schedulefree_lr,
                                   state_layout=(("z", "exp_avg_sq"), 0)),
}
OPTIMIZER_NAMES = tuple(REGISTRY)
BASELINE = "adamw"


def get_entry(name: str) -> OptimizerEntry:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown optimizer '{name}': choose one of {', '.join(OPTIMIZER_NAMES)}") from None


def title_of(name: str) -> str:
    """Display name for an optimizer key; unknown keys (from foreign records) are shown as they are."""
    return REGISTRY[name].title if name in REGISTRY else name
