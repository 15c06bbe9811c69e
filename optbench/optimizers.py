"""The optimizer registry: one entry per optimizer, and the only module that names one.

An entry holds everything optbench knows about an optimizer: how to build it *from the model* (so the
entry decides the parameter groups), its defaults and search space (from `optimizers/NAME.yaml`, read
through `settings.py`), its title and plot colour, its state layout (for memory estimates, mixed
layouts included), and what the training loop must do around `step()`:

- `external_schedule`: the loop applies the shared warmup + cosine schedule. Schedule-Free must never get
  one: it warms up internally and its averaging *is* the schedule.
- `train_mode` / `eval_mode`: Schedule-Free keeps two points, y (where gradients are taken) and x (the
  average that generalises). `eval_mode` swaps x into the model; evaluating or saving without it
  silently uses y. The loop calls `eval_mode` before every evaluation and `train_mode` before training.
  With BatchNorm, its authors prescribe recomputing the BN statistics at x before evaluating
  (`bn_warmup`).
- `hessian_due`: SophiaH estimates the Hessian diagonal (Hutchinson) on the steps where its own counter,
  read before the step, is a multiple of `update_period`. That backward must use `create_graph=True`,
  and timm's fused attention cannot be differentiated twice, so those forwards use math attention.
  Plain steps use neither (both are slower and hold more memory).
- `hessian_estimate`: on a Hessian step, an estimate the loop passes to `step(hessian=...)`, or None for
  the optimizer's own. Sophia with `hessian_batch=N` (fewer than the batch) estimates z * (H z) on the
  first N images (optbench/hutchinson.py): the full-batch forward and backward then stay plain (fused
  attention, no `create_graph`) and only the N-image estimate pays for the double backward. The cadence
  and SophiaH's step counter are unchanged; SophiaH counts an external estimate through `set_hessian`.

Library traps handled here (each pinned by a test):
- lion-pytorch's `decoupled_weight_decay=True` divides weight decay by the initial lr (wd 0.5 at lr 1e-4
  would shrink weights by half each step); it is always built with False, so the shrink is lr * wd.
- SophiaH's weight decay is multiplied by lr, and its lr is on another scale than AdamW's: its default
  weight decay is chosen so lr * wd equals AdamW's per-step shrink (see optimizers/sophia.yaml).
- AdamWScheduleFree divides `p.grad` in place inside `step()`: anything reading gradients (clipping,
  norms) must do so before `step()`.
- `torch.optim.Muon` accepts only 2-D parameters, and its authors use it only for hidden weight
  matrices: embeddings, the classifier head, convolutions and 1-D parameters go to AdamW. optbench
  builds both over one set of parameter groups (`MuonWithAdamW`), so one schedule drives both.
- Prodigy estimates the step size itself: its `lr` is a multiplier of that estimate (1.0 = as
  estimated), not a learning rate on AdamW's scale.
- SOAP's first step only initialises its preconditioners and moves no weight.

This module imports torch only inside functions, so the analysis layer can read titles, colours and
the course's roles (`BASELINE`, `MEMORY_CHALLENGER`) without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from optbench.errors import ConfigError
from optbench.settings import optimizer_file

if TYPE_CHECKING:  # pragma: no cover
    import torch

# Keys of optimizers/NAME.yaml that are not hyperparameters.
NON_HPARAM_KEYS = frozenset({"search_space"})
SCALAR_STATE_BYTES = 4  # a float32 step counter


@dataclass(frozen=True)
class BuildContext:
    """What a constructor may depend on besides the model and its hyperparameters."""

    device_type: str  # "cpu" or "cuda"
    total_steps: int
    warmup_steps: int  # already scaled to the run's length


@dataclass
class Built:
    optimizer: "torch.optim.Optimizer"
    implementation: dict[str, Any]  # what actually ran: class, code path, effective arguments, groups


@dataclass(frozen=True)
class StateLayout:
    """Optimizer state after the first step, per parameter: tensors shaped like the parameter, and
    4-byte scalar tensors (torch's AdamW keeps `step` as one). Read from the libraries' sources; the
    tests check it against the real optimizers. `None` as a layout means "not expressible per parameter"
    (SOAP's Kronecker factors): the state is then only measured, never estimated."""

    per_param: tuple[str, ...]
    scalars: int = 0

    def bytes_for(self, params: list["torch.Tensor"]) -> int:
        return sum(len(self.per_param) * p.numel() * p.element_size() + self.scalars * SCALAR_STATE_BYTES
                   for p in params)


@dataclass
class ParamGroup:
    """Parameters that one algorithm updates with one set of options, and the state it keeps for them."""

    role: str  # e.g. "all", "muon: hidden matrices", "adamw: embeddings, head, 1-D"
    params: list["torch.nn.Parameter"]
    layout: StateLayout | None
    options: dict[str, Any] = field(default_factory=dict)  # per-group overrides (e.g. weight_decay 0)


def _one_group(layout: StateLayout | None) -> Callable[[Any], list[ParamGroup]]:
    def group(model) -> list[ParamGroup]:
        return [ParamGroup("all", [p for p in model.parameters() if p.requires_grad], layout)]
    return group


def _noop(optimizer) -> None:
    return None


def _never(optimizer) -> bool:
    return False


@dataclass(frozen=True)
class RunSettings:
    """What a common-mistake warning may depend on besides the optimizer's own hyperparameters."""

    batch_size: int


def _no_warnings(hparams: dict[str, Any], settings: RunSettings) -> list[str]:
    return []


def _no_reason(key: str) -> str | None:
    return None


def _no_estimate(model, optimizer, x, y, amp) -> None:
    return None


def _group_lr(optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


@dataclass(frozen=True)
class OptimizerEntry:
    """One optimizer. `build(model, hparams, context)` is the only way optbench constructs it."""

    name: str
    title: str
    color: str  # plot colour, the same in every figure
    library: str  # distribution name, recorded with its version
    build: Callable[[list[ParamGroup], dict[str, Any], BuildContext], Built]
    external_schedule: bool = True
    group_params: Callable[[Any], list[ParamGroup]] = _one_group(None)
    train_mode: Callable[[Any], None] = _noop
    eval_mode: Callable[[Any], None] = _noop
    # Recompute BatchNorm statistics at the evaluated weights before evaluating (Schedule-Free).
    bn_warmup: bool = False
    hessian_due: Callable[[Any], bool] = _never
    # Makes the next step a Hessian step (memory probe and time estimate only, on a throwaway copy).
    force_hessian_next: Callable[[Any], None] | None = None
    # Hyperparameters -> one step in how many is a Hessian step (None: the optimizer has none).
    hessian_period: Callable[[dict[str, Any]], int | None] = lambda hparams: None
    # The course's common mistakes: (hyperparameters, run settings) -> warnings with the course's advice.
    warnings: Callable[[dict[str, Any], RunSettings], list[str]] = _no_warnings
    # A key the optimizer does not take -> why (e.g. Schedule-Free and a scheduler), or None: "unknown".
    refusal: Callable[[str], str | None] = _no_reason
    current_lr: Callable[[Any], float] = _group_lr  # the lr the last step used
    # Hessian estimates the optimizer itself made (counted inside the library call), or None.
    hessian_estimates: Callable[[Any], int] | None = None
    # On a Hessian step: (model, optimizer, x, y, amp) -> estimate for step(hessian=...), or None.
    hessian_estimate: Callable[..., list[torch.Tensor] | None] = _no_estimate
    extra_hparams: frozenset[str] = frozenset()
    choices: dict[str, tuple[str, ...]] = field(default_factory=dict)  # hyperparameters with fixed options
    source: str = ""  # paper / library the defaults are cited from
    notes: str = ""  # what the harness does around it, for `optbench optimizers`
    # Why its state is the size it is, shown wherever the state column is (reports, `optbench optimizers`).
    state_note: str = ""
    # Optimizer-specific diagnostics after a log-point step: name -> 0-dim tensor left on the device
    # (optbench/diagnostics.py reads them with the loop's one device read). Cheap: one pass over state.
    diagnostics: Callable[[Any], dict[str, torch.Tensor]] | None = None
    # Values read -> {kind: warning text} for values that call for the user's attention.
    diagnostics_advice: Callable[[dict[str, float]], dict[str, str]] | None = None

    def defaults(self) -> dict[str, Any]:
        """The hyperparameter defaults from optimizers/NAME.yaml (a fresh copy)."""
        return {k: v for k, v in optimizer_file(self.name).items() if k not in NON_HPARAM_KEYS}

    def search_space(self) -> dict[str, Any]:
        """The raw `search_space` mapping of optimizers/NAME.yaml ({} when it has none)."""
        return dict(optimizer_file(self.name).get("search_space") or {})

    @property
    def averaged_eval(self) -> bool:
        """Whether evaluation reads other weights than training steps (an eval mode swaps them in)."""
        return self.eval_mode is not _noop

    def make(self, model, hparams: dict[str, Any], context: BuildContext) -> Built:
        """Build this optimizer for `model` (decides its parameter groups) with `hparams`."""
        groups = self.group_params(model)
        built = self.build(groups, hparams, context)
        built.implementation.setdefault("param_groups", [
            {"role": g.role, "tensors": len(g.params), "params": sum(p.numel() for p in g.params), **g.options}
            for g in groups])
        return built

    def state_layout_bytes(self, model) -> int | None:
        """State bytes implied by the model's parameter shapes and the layouts of its groups, or None
        when a group's state is not expressible per parameter. Reads only shapes (meta/fake tensors too)."""
        groups = self.group_params(model)
        if any(g.layout is None for g in groups):
            return None
        return sum(g.layout.bytes_for(g.params) for g in groups)


def _torch_groups(groups: list[ParamGroup]) -> list[dict[str, Any]]:
    return [{"params": g.params, **g.options} for g in groups]


# --- AdamW -----------------------------------------------------------------------------------------

_ADAMW_IMPLEMENTATIONS = ("auto", "fused", "foreach", "forloop")


def _adamw_flags(impl: str, device_type: str) -> tuple[str, dict[str, bool]]:
    if impl not in _ADAMW_IMPLEMENTATIONS:
        raise ConfigError(f"AdamW implementation '{impl}' unknown: choose one of {', '.join(_ADAMW_IMPLEMENTATIONS)}")
    if impl == "auto":
        # fused allocates no temporaries in step(); foreach (torch's CUDA default) allocates ~1x params.
        impl = "fused" if device_type == "cuda" else "forloop"
    return impl, {"fused": {"fused": True}, "foreach": {"foreach": True}, "forloop": {"foreach": False}}[impl]


def _build_adamw(groups, hp, ctx: BuildContext) -> Built:
    import torch

    impl, flags = _adamw_flags(hp.get("implementation", "auto"), ctx.device_type)
    opt = torch.optim.AdamW(_torch_groups(groups), lr=hp["lr"], betas=tuple(hp["betas"]), eps=hp["eps"],
                            weight_decay=hp["weight_decay"], **flags)
    return Built(opt, {"class": "torch.optim.AdamW", "code_path": impl, **flags})


# --- Lion ------------------------------------------------------------------------------------------


def _build_lion(groups, hp, ctx: BuildContext) -> Built:
    from lion_pytorch import Lion

    # decoupled_weight_decay=True would divide wd by the initial lr: never use it (module docstring).
    opt = Lion(_torch_groups(groups), lr=hp["lr"], betas=tuple(hp["betas"]), weight_decay=hp["weight_decay"],
               use_triton=False, decoupled_weight_decay=False)
    return Built(opt, {"class": "lion_pytorch.Lion", "code_path": "forloop", "decoupled_weight_decay": False})


LION_MIN_BATCH = 64  # the lecture (seed 001): below batch 64 Lion does worse than AdamW
LION_WD_FACTOR = 3  # the course: raise weight decay 3-10x over AdamW's


def _lion_warnings(hp: dict[str, Any], settings: RunSettings) -> list[str]:
    out = []
    if hp["lr"] > 3e-4:
        out.append(
            f"Lion at lr {hp['lr']:g} is at AdamW's scale and tends to diverge (loss=nan): "
            "use a learning rate 3-10x smaller than AdamW's, 1e-4 to 3e-4."
        )
    adamw_wd = get_entry(BASELINE).defaults()["weight_decay"]
    if hp["weight_decay"] < LION_WD_FACTOR * adamw_wd:
        out.append(
            f"Lion with weight decay {hp['weight_decay']:g} is usually worse: it is below {LION_WD_FACTOR}x AdamW's "
            f"{adamw_wd:g}; the course's fix is to raise weight decay 3-10x over AdamW's "
            f"({LION_WD_FACTOR * adamw_wd:g}-{10 * adamw_wd:g}, e.g. 0.5 for AdamW's 0.05)."
        )
    if settings.batch_size < LION_MIN_BATCH:
        out.append(
            f"Lion at batch size {settings.batch_size}: the lecture says that with small batches (below "
            f"{LION_MIN_BATCH}) Lion does worse than AdamW, and its gain grows with the batch (Chen et al. 2023): "
            f"compare at batch {LION_MIN_BATCH} or more before judging Lion's accuracy."
        )
    return out


# --- Sophia (Hutchinson) ---------------------------------------------------------------------------


def _build_sophia(groups, hp, ctx: BuildContext) -> Built:
    from pytorch_optimizer import SophiaH

    hessian_batch = hp.get("hessian_batch")
    if hessian_batch is not None and (isinstance(hessian_batch, bool) or not isinstance(hessian_batch, int)
                                      or hessian_batch < 1):
        raise ConfigError(f"Sophia hessian_batch must be a positive whole number of images, got {hessian_batch!r}")
    opt = SophiaH(
        _torch_groups(groups), lr=hp["lr"], betas=tuple(hp["betas"]), weight_decay=hp["weight_decay"],
        weight_decouple=True, fixed_decay=False, p=hp["p"], update_period=hp["update_period"], num_samples=1,
        hessian_distribution=hp["hessian_distribution"], eps=hp["eps"],
    )
    opt.hessian_batch = hessian_batch  # None: the whole batch, estimated by SophiaH from the step's graph
    _count_hessian_estimates(opt)
    return Built(opt, {"class": "pytorch_optimizer.SophiaH", "code_path": "foreach-if-supported",
                       "estimator": "hutchinson", "update_period": hp["update_period"],
                       "hessian_batch": hessian_batch if hessian_batch is not None else "full"})


def _count_hessian_estimates(optimizer) -> None:
    """Count the Hutchinson estimates SophiaH really makes, independently of the loop's own plan."""
    estimate = optimizer.compute_hutchinson_hessian
    optimizer.hessian_estimates_made = 0

    def counted(*args, **kwargs):
        optimizer.hessian_estimates_made += 1
        return estimate(*args, **kwargs)

    optimizer.compute_hutchinson_hessian = counted
    receive = optimizer.set_hessian  # an estimate passed through step(hessian=...) (hessian_batch)

    def received(*args, **kwargs):
        optimizer.hessian_estimates_made += 1
        return receive(*args, **kwargs)

    optimizer.set_hessian = received


def _sophia_hessian_estimate(model, optimizer, x, y, amp) -> list[torch.Tensor] | None:
    n = optimizer.hessian_batch
    if n is None or n >= x.shape[0]:
        return None  # the whole batch: SophiaH's own estimate from the step's graph costs one forward less
    from optbench.hutchinson import hutchinson_diagonal

    params = [p for group in optimizer.param_groups for p in group["params"]]
    return hutchinson_diagonal(model, params, x[:n], y[:n], amp, optimizer.distribution)


SOPHIA_MIN_UPDATE_PERIOD = 10  # the course's exercise 3 and the Sophia authors' k: a Hessian every 10 steps


def _sophia_warnings(hp: dict[str, Any], settings: RunSettings) -> list[str]:
    period = hp.get("update_period")
    if isinstance(period, int) and period < SOPHIA_MIN_UPDATE_PERIOD:
        return [f"Sophia with update_period {period} estimates the Hessian every {period} steps: each estimate is "
                "a double backward (Hutchinson), which the course names as why Sophia is slow; its fix is to "
                f"estimate the Hessian only every {SOPHIA_MIN_UPDATE_PERIOD} steps (update_period="
                f"{SOPHIA_MIN_UPDATE_PERIOD}, the course's exercise 3 and the authors' k)."]
    return []


def _sophia_estimates(optimizer) -> int:
    return optimizer.hessian_estimates_made


def _sophia_hessian_due(optimizer) -> bool:
    # SophiaH estimates when its step counter, read before the step, is a multiple of update_period.
    return optimizer.param_groups[0].get("step", 0) % optimizer.update_period == 0


def _sophia_force_hessian_next(optimizer) -> None:
    for group in optimizer.param_groups:
        group["step"] = -(-group["step"] // optimizer.update_period) * optimizer.update_period


SOPHIA_WIN_RATE_RANGE = (0.1, 0.5)  # the Sophia authors' healthy share of unclipped coordinates


def _sophia_diagnostics(optimizer) -> dict[str, torch.Tensor]:
    """Share of coordinates whose last update was clipped, and the Hessian estimate SophiaH used.

    SophiaH's update is clamp(momentum / max(hessian_moment, eps), -p, p) * lr (pytorch-optimizer 4.1,
    both its for-loop and foreach paths); after step() the state holds exactly the momentum and Hessian
    moving average that step used, so the clipped share is recomputed from the state. p plays the role
    of the authors' rho (SophiaG clips |m| / (rho * h) at 1): a coordinate is unclipped when
    |m| < p * max(h, eps). The "win rate" the authors watch is the unclipped share.
    """
    import torch

    with torch.no_grad():
        return _sophia_diagnostics_values(optimizer)


def _sophia_diagnostics_values(optimizer):
    import torch

    clipped = torch.zeros((), dtype=torch.float64)
    count, h_sum, h_min = 0, torch.zeros((), dtype=torch.float64), None
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if "momentum" not in state:
                continue
            momentum, moment = state["momentum"], state["hessian_moment"]
            ratio = momentum / moment.clamp(min=group["eps"])
            clipped = clipped.to(p.device) + (ratio.abs() >= group["p"]).sum()
            h_sum = h_sum.to(p.device) + moment.sum(dtype=torch.float64)
            low = moment.min()
            h_min = low if h_min is None else torch.minimum(h_min, low)
            count += moment.numel()
    if count == 0:
        return {}
    clipped_fraction = clipped / count
    return {"sophia_clipped_fraction": clipped_fraction, "sophia_win_rate": 1 - clipped_fraction,
            "sophia_hessian_mean": h_sum / count, "sophia_hessian_min": h_min}


def _sophia_advice(values: dict[str, float]) -> dict[str, str]:
    win = values.get("sophia_win_rate")
    low, high = SOPHIA_WIN_RATE_RANGE
    if win is None or low <= win <= high:
        return {}
    if win < low:
        advice = ("most coordinates take the full clipped step lr*p (a sign-momentum step): the authors' advice is "
                  "to raise rho (SophiaH's p) and lower lr so that lr*p, the largest step, stays the same; if the "
                  "loss also grows, check lr first")
    else:
        advice = ("few coordinates are clipped, so steps follow the noisy Hessian estimate: lower p (the authors' rho) "
                  "or check that lr is not too small")
    return {"sophia_win_rate": f"Sophia's unclipped share of coordinates (win rate) is {win:.2f}, outside the "
                               f"{low}-{high} its authors call healthy: {advice}"}


# --- Schedule-Free AdamW ---------------------------------------------------------------------------


def _build_schedulefree(groups, hp, ctx: BuildContext) -> Built:
    from schedulefree import AdamWScheduleFree

    opt = AdamWScheduleFree(
        _torch_groups(groups), lr=hp["lr"], betas=tuple(hp["betas"]), eps=hp["eps"],
        weight_decay=hp["weight_decay"], warmup_steps=ctx.warmup_steps,
    )
    foreach = bool(opt.param_groups[0]["foreach"])
    return Built(opt, {"class": "schedulefree.AdamWScheduleFree", "code_path": "foreach" if foreach else "forloop",
                       "warmup_steps": ctx.warmup_steps})


def _schedulefree_lr(optimizer) -> float:
    # AdamWScheduleFree keeps the base lr in "lr" and the warmed-up one it used in "scheduled_lr".
    return float(optimizer.param_groups[0].get("scheduled_lr", optimizer.param_groups[0]["lr"]))


def _schedulefree_diagnostics(optimizer) -> dict[str, torch.Tensor]:
    """L2 distance between the averaged weights x (what is evaluated) and the training weights y.

    In train mode the parameters hold y, and eval() sets x = y + (1 - 1/beta1) * (z - y) (schedulefree
    1.4), so ||x - y|| = (1/beta1 - 1) * ||z - y||, computed without swapping the weights.
    """
    import torch

    with torch.no_grad():
        return _schedulefree_diagnostics_values(optimizer)


def _schedulefree_diagnostics_values(optimizer):
    import torch

    square, norm_y = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    for group in optimizer.param_groups:
        if not group.get("train_mode", False):
            return {}
        scale = 1.0 / group["betas"][0] - 1.0
        for p in group["params"]:
            z = optimizer.state.get(p, {}).get("z")
            if z is None:
                continue
            square = square.to(p.device) + (scale * torch.linalg.vector_norm(z - p)).double().square()
            norm_y = norm_y.to(p.device) + torch.linalg.vector_norm(p).double().square()
    distance = square.sqrt()
    return {"schedulefree_x_y_distance": distance, "schedulefree_x_y_relative": distance / norm_y.sqrt().clamp(min=1e-30)}


def _schedulefree_refusal(key: str) -> str | None:
    lowered = key.lower()
    if any(word in lowered for word in ("sched", "cosine", "decay_steps", "lr_decay", "annealing")):
        return (f"Schedule-Free takes no learning-rate schedule ('{key}'): the course lists 'Schedule-Free + cosine "
                "schedule' as a conflict, fix: do NOT use an external scheduler. Its iterate averaging replaces "
                "the schedule and its warmup is built in (the preset's warmup_steps); drop this option.")
    return None


def _schedulefree_train(optimizer) -> None:
    optimizer.train()


def _schedulefree_eval(optimizer) -> None:
    optimizer.eval()


# --- Muon (torch.optim.Muon) + AdamW for the rest --------------------------------------------------


def _muon_groups(model) -> list[ParamGroup]:
    """Muon on the hidden weight matrices (2-D, not the classifier head); AdamW on everything else
    (patch/stem embedding, position and class tokens, head, norms, biases), as Muon's authors prescribe."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    matrices, rest = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (matrices if p.ndim == 2 and id(p) not in head_ids else rest).append(p)
    # torch's Muon keeps one momentum buffer; AdamW keeps exp_avg, exp_avg_sq and a float32 step.
    return [ParamGroup("muon: hidden matrices", matrices, StateLayout(("momentum_buffer",)), {"algorithm": "muon"}),
            ParamGroup("adamw: embeddings, head, 1-D", rest, StateLayout(("exp_avg", "exp_avg_sq"), 1),
                       {"algorithm": "adamw"})]


def _build_muon(groups, hp, ctx: BuildContext) -> Built:
    from optbench.muon import MuonWithAdamW

    impl, flags = _adamw_flags("auto", ctx.device_type)
    opt = MuonWithAdamW(
        [{"params": g.params, **g.options} for g in groups if g.params],
        muon={"lr": hp["lr"], "weight_decay": hp["weight_decay"], "momentum": hp["momentum"],
              "nesterov": hp["nesterov"], "ns_steps": hp["ns_steps"], "adjust_lr_fn": hp["adjust_lr_fn"]},
        adamw={"lr": hp["adamw_lr"], "weight_decay": hp["adamw_weight_decay"], "betas": tuple(hp["adamw_betas"]),
               "eps": hp["adamw_eps"], **flags},
    )
    return Built(opt, {"class": "torch.optim.Muon + torch.optim.AdamW", "code_path": f"muon + adamw {impl}",
                       "adjust_lr_fn": hp["adjust_lr_fn"]})


# --- pytorch-optimizer's newer optimizers ----------------------------------------------------------


def _library_builder(class_name: str, keys: tuple[str, ...], fixed: dict[str, Any] | None = None):
    """A constructor for a pytorch-optimizer class taking the listed hyperparameters as they are."""
    def build(groups, hp, ctx: BuildContext) -> Built:
        import pytorch_optimizer

        cls = getattr(pytorch_optimizer, class_name)
        kwargs = {k: tuple(hp[k]) if isinstance(hp[k], list) else hp[k] for k in keys}
        opt = cls(_torch_groups(groups), **kwargs, **(fixed or {}))
        return Built(opt, {"class": f"pytorch_optimizer.{class_name}", "code_path": "library default",
                           **(fixed or {})})
    return build


def _prodigy_lr(optimizer) -> float:
    # Prodigy's effective step size is its estimate d times the lr multiplier.
    group = optimizer.param_groups[0]
    return float(group["lr"]) * float(group.get("d", 1.0))


REGISTRY: dict[str, OptimizerEntry] = {}


def register(entry: OptimizerEntry) -> OptimizerEntry:
    """Add an entry (replacing one of the same name). Every list of optimizers reads the registry."""
    REGISTRY[entry.name] = entry
    return entry


register(OptimizerEntry(
    "adamw", "AdamW", "#1f77b4", "torch", _build_adamw,
    group_params=_one_group(StateLayout(("exp_avg", "exp_avg_sq"), 1)),
    choices={"implementation": _ADAMW_IMPLEMENTATIONS},
    state_note="AdamW keeps exp_avg and exp_avg_sq (2x the parameters) and a 4-byte step per tensor.",
    source="Loshchilov & Hutter 2019; course exercise 1",
    notes="warmup + cosine; fused on CUDA, for-loop on CPU (recorded)"))
register(OptimizerEntry(
    "lion", "Lion", "#d62728", "lion-pytorch", _build_lion, warnings=_lion_warnings,
    state_note="Lion keeps one buffer, the momentum exp_avg: 1x the parameters, half of AdamW's two.",
    group_params=_one_group(StateLayout(("exp_avg",))), source="Chen et al. 2023; course exercise 2",
    notes="warmup + cosine; decoupled_weight_decay=False (wd is not divided by lr)"))
register(OptimizerEntry(
    "sophia", "Sophia (Hutchinson)", "#2ca02c", "pytorch-optimizer", _build_sophia,
    group_params=_one_group(StateLayout(("momentum", "hessian_moment", "hessian"))),
    hessian_due=_sophia_hessian_due, force_hessian_next=_sophia_force_hessian_next,
    hessian_period=lambda hparams: hparams["update_period"],
    hessian_estimates=_sophia_estimates, hessian_estimate=_sophia_hessian_estimate,
    diagnostics=_sophia_diagnostics, diagnostics_advice=_sophia_advice,
    extra_hparams=frozenset({"hessian_batch"}), choices={"hessian_distribution": ("rademacher", "gaussian")},
    warnings=_sophia_warnings,
    state_note="Sophia's state is 3x the parameters (1.5x AdamW's): pytorch-optimizer's SophiaH keeps momentum "
               "(the EMA of gradients, m), hessian_moment (the EMA of Hessian-diagonal estimates, h) and a third "
               "buffer, hessian: the latest raw Hutchinson estimate z*(Hz), allocated at the first estimate "
               "(BaseOptimizer.zero_hessian) and kept between estimates, although the update only reads it on "
               "estimate steps. Sophia's paper keeps only m and h (2x).",
    source="Liu et al. 2024 (SophiaH variant); course exercise 3",
    notes="warmup + cosine; Hessian steps (every update_period) backprop with create_graph and math attention, "
          "or with hessian_batch=N only an N-image estimate does"))
register(OptimizerEntry(
    "schedulefree", "Schedule-Free AdamW", "#9467bd", "schedulefree", _build_schedulefree,
    external_schedule=False, group_params=_one_group(StateLayout(("z", "exp_avg_sq"))),
    train_mode=_schedulefree_train, eval_mode=_schedulefree_eval, bn_warmup=True, current_lr=_schedulefree_lr,
    refusal=_schedulefree_refusal,
    state_note="Schedule-Free AdamW keeps z (the base sequence) and exp_avg_sq: 2x the parameters, as AdamW.",
    diagnostics=_schedulefree_diagnostics,
    source="Defazio et al. 2024; course exercise 4",
    notes="no external schedule (built-in warmup); optimizer.train()/eval() around training and evaluation; "
          "BatchNorm statistics recomputed at the averaged weights before evaluating"))
register(OptimizerEntry(
    "muon", "Muon (+AdamW)", "#ff7f0e", "torch", _build_muon, group_params=_muon_groups,
    choices={"adjust_lr_fn": ("original", "match_rms_adamw")},
    source="Jordan et al. 2024; torch.optim.Muon",
    notes="warmup + cosine on both parts; Muon on hidden 2-D matrices, AdamW on the rest"))
register(OptimizerEntry(
    "adopt", "ADOPT", "#8c564b", "pytorch-optimizer",
    _library_builder("ADOPT", ("lr", "betas", "weight_decay", "eps"), {"weight_decouple": True}),
    group_params=_one_group(StateLayout(("exp_avg", "exp_avg_sq"))),
    source="Taniguchi et al. 2024 (NeurIPS); pytorch-optimizer ADOPT",
    notes="warmup + cosine; decoupled weight decay (AdamW-style)"))
register(OptimizerEntry(
    "ademamix", "AdEMAMix", "#e377c2", "pytorch-optimizer",
    _library_builder("AdEMAMix", ("lr", "betas", "weight_decay", "alpha", "eps"), {"weight_decouple": True}),
    group_params=_one_group(StateLayout(("exp_avg", "exp_avg_sq", "exp_avg_slow"))),
    source="Pagliardini et al. 2024; pytorch-optimizer AdEMAMix",
    notes="warmup + cosine; three betas (fast, second moment, slow EMA); decoupled weight decay"))
register(OptimizerEntry(
    "prodigy", "Prodigy", "#7f7f7f", "pytorch-optimizer",
    _library_builder("Prodigy", ("lr", "betas", "weight_decay", "d_coef", "eps"),
                     {"weight_decouple": True, "safeguard_warmup": True, "bias_correction": True}),
    group_params=_one_group(StateLayout(("s", "p0", "exp_avg", "exp_avg_sq"))), current_lr=_prodigy_lr,
    source="Mishchenko & Defazio 2024; pytorch-optimizer Prodigy",
    notes="learning-rate free: lr is a multiplier (1.0) of Prodigy's own step-size estimate d; warmup + cosine "
          "scale that multiplier; safeguard_warmup on, as its authors advise with warmup"))
register(OptimizerEntry(
    "soap", "SOAP", "#bcbd22", "pytorch-optimizer",
    _library_builder("SOAP", ("lr", "betas", "weight_decay", "precondition_frequency", "eps")),
    group_params=_one_group(None),
    source="Vyas et al. 2024; pytorch-optimizer SOAP",
    notes="warmup + cosine; the first step only builds the preconditioners (no update); state holds "
          "Kronecker factors and eigenbases (measured, not estimated per parameter)"))
register(OptimizerEntry(
    "mars", "MARS (AdamW)", "#17becf", "pytorch-optimizer",
    _library_builder("MARS", ("lr", "betas", "gamma", "weight_decay", "eps"), {"mars_type": "adamw"}),
    group_params=_one_group(StateLayout(("exp_avg", "exp_avg_sq", "last_grad"))),
    source="Yuan et al. 2024; pytorch-optimizer MARS",
    notes="warmup + cosine; variance reduction with the previous gradient (last_grad); 1-D parameters "
          "take its AdamW path"))

BASELINE = "adamw"  # the optimizer every other is compared against
MEMORY_CHALLENGER = "lion"  # the course's memory criterion: Lion saves >= 30% against AdamW
COURSE_SET = ("adamw", "lion", "sophia", "schedulefree")  # the default set of `compare`


def optimizer_names() -> tuple[str, ...]:
    """Every registered optimizer, the course's four first."""
    return (*[n for n in COURSE_SET if n in REGISTRY], *[n for n in REGISTRY if n not in COURSE_SET])


def get_entry(name: str) -> OptimizerEntry:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown optimizer '{name}': choose one of {', '.join(optimizer_names())}") from None


def select(text: str | None) -> list[str]:
    """A comma-separated selection: None -> the course's four; 'all' -> every entry; names are checked."""
    if text is None:
        return list(COURSE_SET)
    names = [x.strip() for x in text.split(",") if x.strip()]
    if names == ["all"]:
        return list(optimizer_names())
    if not names:
        raise ConfigError("--optimizers must not be empty: give names separated by commas, or 'all'")
    for name in names:
        get_entry(name)
    return list(dict.fromkeys(names))  # the same optimizer twice is one run


def title_of(name: str) -> str:
    """Display name for an optimizer key; unknown keys (from foreign records) are shown as they are."""
    return REGISTRY[name].title if name in REGISTRY else name


def color_of(name: str) -> str:
    return REGISTRY[name].color if name in REGISTRY else "#333333"



def library_versions() -> dict[str, str]:
    """Installed versions of torch, timm and every library a registered optimizer comes from."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "timm", *sorted({e.library for e in REGISTRY.values()} - {"torch"})):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def describe_all() -> list[str]:
    """`optbench optimizers`: one block of text per entry, from the entry itself and its YAML.

    State bytes per parameter are read from the entry's layouts on the default ViT-Tiny for CIFAR-100,
    built on the meta device (nothing allocated); the class is the one the entry builds."""
    from optbench.models import DEFAULT_MODEL, InputShape, build_model

    model = build_model(DEFAULT_MODEL, InputShape(32, 3, 100, 4), seed=None, device="meta")
    n_params = sum(p.numel() for p in model.parameters())
    versions = library_versions()
    context = BuildContext(device_type="cpu", total_steps=1000, warmup_steps=50)
    blocks = []
    for name in optimizer_names():
        entry = get_entry(name)
        defaults = entry.defaults()
        built = entry.make(model, defaults, context)
        layout = entry.state_layout_bytes(model)
        state = (f"{layout / n_params:.2f} B per parameter in fp32 (ViT-Tiny, CIFAR-100)" if layout is not None
                 else "not a fixed multiple of the parameters (measured after a step)")
        space = entry.search_space()
        lines = [
            f"[bold]{name}[/bold]: {entry.title}" + ("  (course default set)" if name in COURSE_SET else ""),
            f"  library {entry.library} {versions.get(entry.library, '')}, class {built.implementation['class']}",
            "  defaults: " + ", ".join(f"{k}={v}" for k, v in defaults.items()),
            "  tuned: " + (", ".join(f"{k} in [{v.get('low')}, {v.get('high')}]" for k, v in space.items())
                           if space else "no search space"),
            f"  state: {state}" + (f". {entry.state_note}" if entry.state_note else ""),
            "  parameter groups: " + "; ".join(f"{g['role']} ({g['params']:,} params)"
                                                for g in built.implementation["param_groups"]),
            f"  harness: {entry.notes}",
            f"  source: {entry.source}",
        ]
        blocks.append("\n".join(lines))
    return blocks
