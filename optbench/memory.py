"""Where a training step's memory goes, per optimizer, for any model of the registry (timm ViTs, the CIFAR
ResNet-18), with or without a GPU.

For each optimizer one training step (forward, loss, backward, `step()`, `zero_grad`) is measured after
its state exists (all four optimizers create state lazily on their first step, which runs untracked).
The peak is split into parameters, gradients, optimizer state, activations, backward temporaries,
temporaries inside `step()` and the input batch. Sophia's Hessian step is measured apart from its plain
step: it sets Sophia's peak.

Three methods, each named in the report:
- "cuda": real allocator peaks (`max_memory_allocated` / `max_memory_reserved`), reset after set-up and
  read separately for forward/backward and for `step()`; the parts come from MemTracker on the same step.
- "tracked": real tensors on the CPU under MemTracker (`measure.tracked_step_phases`).
- "estimate": the same MemTracker run under FakeTensorMode on a model built on the meta device. Tensors
  have shapes and no data, so nothing is allocated: ViT-Large at batch 256, four optimizers and the batch
  sweep take ~30 s on a busy 2-core CPU. It runs CPU kernels: on a GPU, allocator rounding, caching and
  kernel workspaces come on top.

The answer the issue asks for is `LionVerdict`: the largest batch size at which Lion's peak saving
against AdamW reaches 30%, found by evaluating batch sizes (not typed in), or why it cannot. In fp32
(and bf16 autocast, which keeps fp32 weights, gradients and state) AdamW holds >= 16 B/param during
`step()` and Lion >= 12 B/param, so Lion saves at most 25% of the peak against an AdamW without
temporaries in `step()` (fused); foreach AdamW allocates ~1x parameters more inside `step()`, which
raises that ceiling. Activations shrink the saving as the batch grows. Implementation choices that move
the peak (AdamW foreach/fused/forloop, precision) are inputs and are recorded.
"""

from __future__ import annotations

import gc
import json
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from optbench.errors import ConfigError, DeviceError, OptbenchError
from optbench.measure import (AllocatorPeaks, StepMemory, optimizer_state_bytes, step_memory,
                              tracked_step_phases)
from optbench.models import InputShape, build_model, check_size_options, get_model, model_facts, resolve_patch_size
from optbench.optimizers import (BASELINE, COURSE_SET, MEMORY_CHALLENGER, BuildContext, get_entry, library_versions,
                                 title_of)
from optbench.render import fmt_bytes as _fmt
from optbench.train import autocast_for, training_step

METHODS = ("auto", "cuda", "tracked", "estimate")
ADAMW_IMPLEMENTATIONS = ("foreach", "fused", "forloop")
PRECISIONS = ("fp32", "bf16")
LION_TARGET_SAVING = 0.30  # the course's claim: Lion saves >= 30% memory against AdamW


# --- what to measure -------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemorySpec:
    """One validated memory question. Build it with `resolve_spec`."""

    model: str  # a name of the model registry, or a timm ViT name
    batch_size: int
    image_size: int
    patch_size: int | None  # None: the model has no patches (ResNet-18)
    num_classes: int
    precision: str  # fp32 | bf16 (autocast; weights, gradients and state stay fp32)
    method: str  # cuda | tracked | estimate (never auto: resolved)
    adamw_impl: str  # foreach | fused | forloop
    optimizers: tuple[str, ...]  # always starts with AdamW, the baseline of every saving
    depth: int | None = None  # None: the model's own depth
    in_chans: int = 3
    param_count: int = 0
    tokens: int = 0  # patches + prefix (class) tokens; 0 for a model without patches
    title: str = ""  # the model's title in the registry


def _create_model(spec: MemorySpec, device: str | torch.device) -> torch.nn.Module:
    """The model of `spec`, created on `device` ("meta" allocates nothing), by the one model builder."""
    return build_model(spec.model, InputShape(spec.image_size, spec.in_chans, spec.num_classes), seed=None,
                       patch_size=spec.patch_size, depth=spec.depth, device=device)


def resolve_spec(model: str, batch_size: int, image_size: int | None = None, precision: str = "fp32",
                 method: str = "auto", adamw_impl: str = "foreach", optimizers: list[str] | None = None,
                 num_classes: int = 1000, patch_size: int | None = None, depth: int | None = None,
                 in_chans: int = 3) -> MemorySpec:
    """Validate a memory question; raises ConfigError / DeviceError with one actionable line.

    `method="auto"` is "cuda" when a GPU is present, else "estimate" (a CPU-tracked run of a large model
    would allocate its full peak). `image_size` defaults to the model's own (224 for timm ViTs, 32 for
    the CIFAR ResNet-18).
    """
    entry = get_model(model or "")  # ConfigError naming the choices
    for name, value in (("batch size", batch_size), ("number of classes", num_classes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a whole number >= 1, got {value!r}")
    for name, value in (("image size", image_size), ("patch size", patch_size), ("depth", depth)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{name} must be a whole number >= 1, got {value!r}")
    check_size_options(entry.name, patch_size, depth)
    size = image_size or entry.default_image_size
    patch = resolve_patch_size(entry.name, InputShape(size, 3, num_classes), patch_size)
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision '{precision}': choose one of {', '.join(PRECISIONS)}")
    if adamw_impl not in ADAMW_IMPLEMENTATIONS:
        raise ConfigError(f"unknown AdamW implementation '{adamw_impl}': choose one of "
                          f"{', '.join(ADAMW_IMPLEMENTATIONS)}")
    if method not in METHODS:
        raise ConfigError(f"unknown method '{method}': choose one of {', '.join(METHODS)}")
    has_cuda = torch.cuda.is_available()
    if method == "cuda" and not has_cuda:
        raise DeviceError("--method cuda needs a CUDA GPU and torch.cuda.is_available() is False here: "
                          "use --method tracked (real CPU tensors) or --method estimate (allocates nothing)")
    if method == "auto":
        method = "cuda" if has_cuda else "estimate"
    names: list[str] = []
    for name in [BASELINE, *(optimizers or COURSE_SET)]:
        name = name.strip().lower()
        if name and name not in names:
            get_entry(name)  # ConfigError naming the choices
            names.append(name)
    spec = MemorySpec(model=entry.name, batch_size=batch_size, image_size=size, patch_size=patch,
                      num_classes=num_classes, precision=precision, method=method, adamw_impl=adamw_impl,
                      optimizers=tuple(names), depth=depth, in_chans=in_chans, title=entry.title)
    facts = model_facts(_create_model(spec, "meta"))
    return replace(spec, param_count=facts["param_count"], tokens=facts["tokens"])


# --- results ---------------------------------------------------------------------------------------


@dataclass
class OptimizerMemory:
    optimizer: str
    title: str
    implementation: dict[str, Any]  # what ran: class, code path, flags
    param_count: int
    param_bytes: int
    state_bytes: int  # exact: distinct storages held in optimizer.state after the measured steps
    state_layout_bytes: int | None  # from parameter shapes and the registry's layouts (None: not expressible)
    steps: list[StepMemory]
    seconds: float
    peak_bytes: int = 0  # the highest of `steps`
    saving_vs_adamw: float | None = None  # 1 - peak / AdamW's peak
    state_saving_vs_adamw: float | None = None  # 1 - state / AdamW's state


@dataclass
class SweepPoint:
    batch_size: int
    adamw_peak_bytes: int
    lion_peak_bytes: int
    saving: float


@dataclass
class LionVerdict:
    """Does Lion's peak saving against AdamW reach `target`, and at which batch size?"""

    target: float
    reached: bool
    batch_size: int | None  # the largest evaluated batch size meeting the target
    method: str
    adamw_impl: str
    points: list[SweepPoint]  # every batch size evaluated, largest first
    bytes_per_param_adamw: float  # weights + gradients + state during step()
    bytes_per_param_lion: float
    bound_without_temporaries: float  # 1 - Lion/AdamW bytes per param: 25% in fp32
    message: str


@dataclass
class MemoryReport:
    spec: MemorySpec
    method_label: str
    device: str
    versions: dict[str, str]
    results: list[OptimizerMemory]
    verdict: LionVerdict | None
    seconds: float
    notes: list[str] = field(default_factory=list)

    def result(self, optimizer: str) -> OptimizerMemory:
        return next(r for r in self.results if r.optimizer == optimizer)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for result, row in zip(self.results, out["results"]):
            for step, step_row in zip(result.steps, row["steps"]):
                step_row["step_own_temporaries"] = step.step_own_temporaries
        return out


METHOD_LABELS = {
    "cuda": "measured on CUDA: torch.cuda.max_memory_allocated (peak) and max_memory_reserved, reset after "
            "set-up, optimizer state present; parts from MemTracker on the same step",
    "tracked": "measured on CPU: MemTracker peak of real tensors, one step after the optimizer state exists",
    "estimate": "estimated, nothing allocated: MemTracker under FakeTensorMode, model on the meta device "
                "(CPU kernels; a GPU adds allocator rounding, cache and workspaces)",
}


# --- measuring -------------------------------------------------------------------------------------


class _Session:
    """Models, batches and the tensor mode for one method. An "estimate" session runs everything inside
    one FakeTensorMode; the model is created on the meta device first (timm's constructor reads tensor
    values, which fake tensors refuse) and materialised as fake CPU tensors with `to_empty`."""

    def __init__(self, spec: MemorySpec, method: str):
        self.spec, self.method = spec, method
        self.device = torch.device("cuda" if method == "cuda" else "cpu")
        self.fake_mode = None
        if method == "estimate":
            from torch._subclasses.fake_tensor import FakeTensorMode

            self.fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        self.build_context = BuildContext(device_type=self.device.type, total_steps=1000, warmup_steps=0)
        # CUDA warms up at the measured batch so cuBLAS workspaces and the allocator cache exist before the
        # measured step; elsewhere the warm-up only creates optimizer state, and batch 1 does that cheaply.
        self.warmup_batch = spec.batch_size if method == "cuda" else 1
        self._cached: dict[str, _Probe] = {}

    def mode(self):
        return self.fake_mode if self.fake_mode is not None else nullcontext()

    def new_model(self) -> torch.nn.Module:
        """A model on the session's device. Call it outside `mode()`: it enters the fake mode itself."""
        if self.fake_mode is not None:
            meta = _create_model(self.spec, "meta")
            with self.fake_mode:
                return meta.to_empty(device="cpu")
        torch.manual_seed(0)
        return _create_model(self.spec, "cpu").to(self.device)

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.spec
        return (torch.randn(size, s.in_chans, s.image_size, s.image_size, device=self.device),
                torch.randint(0, s.num_classes, (size,), device=self.device))

    def probe(self, name: str) -> "_Probe":
        """A ready probe; estimate sessions keep them (fake tensors cost nothing), others build afresh so
        that two optimizers' tensors never share the measured device."""
        if name in self._cached:
            return self._cached[name]
        probe = _Probe(self, name)
        if self.method == "estimate":
            self._cached[name] = probe
        return probe

    def release(self, probe: "_Probe") -> None:
        if self._cached.get(probe.name) is not probe:
            probe.close()


class _Probe:
    """One optimizer on its own model, its state created by one untracked step, ready to be measured."""

    def __init__(self, session: _Session, name: str):
        self.session, self.name, self.entry = session, name, get_entry(name)
        hparams = self.entry.defaults()
        if name == BASELINE:
            hparams["implementation"] = session.spec.adamw_impl
        self.model = session.new_model()
        with session.mode():
            built = self.entry.make(self.model, hparams, session.build_context)
            self.optimizer, self.implementation = built.optimizer, built.implementation
            self.entry.train_mode(self.optimizer)  # Schedule-Free raises in step() without it
            if session.method == "cuda" or self.entry.hessian_due(self.optimizer):
                # A full step: Sophia's first step is a Hessian step, which creates its `hessian` state and
                # needs a graph; on CUDA it also warms up the allocator cache and cuBLAS workspaces.
                self._step(*session.batch(session.warmup_batch))
            else:
                # The optimizer's own step creates the state; forward and backward would only supply
                # gradients, and under FakeTensorMode they cost as much as the measured step.
                for p in self.model.parameters():
                    p.grad = torch.zeros_like(p)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        amp = autocast_for(self.session.device, self.session.spec.precision)
        training_step(self.model, self.optimizer, self.entry, x, y, amp, self.entry.hessian_due(self.optimizer))

    def measure(self, batch_size: int, hessian: bool) -> StepMemory:
        entry, opt = self.entry, self.optimizer
        with self.session.mode():
            if hessian:
                if entry.force_hessian_next is None:
                    raise ValueError(f"{self.name} has no Hessian step")
                entry.force_hessian_next(opt)
            while entry.hessian_due(opt) and not hessian:
                self._step(*self.session.batch(1))  # move past a due Hessian step, untracked
            x, y = self.session.batch(batch_size)
            allocator = AllocatorPeaks(self.session.device, opt) if self.session.method == "cuda" else None
            try:
                phases = tracked_step_phases(self.model, opt, lambda: self._step(x, y), (x, y))
            finally:
                if allocator is not None:
                    allocator.remove()
            del x, y
        return step_memory("hessian" if hessian else "plain", batch_size, phases, allocator)

    def state_bytes(self) -> tuple[int, int, int]:
        """(exact state bytes, bytes from the known layout, parameter bytes)."""
        params = list(self.model.parameters())
        return (optimizer_state_bytes(self.optimizer), self.entry.state_layout_bytes(self.model),
                sum(p.numel() * p.element_size() for p in params))

    def close(self) -> None:
        self.model = self.optimizer = None
        gc.collect()
        if self.session.method == "cuda":
            torch.cuda.empty_cache()


def _measure_optimizer(session: _Session, name: str, progress: Callable[[str], None]) -> OptimizerMemory:
    started = time.perf_counter()
    spec = session.spec
    progress(f"{title_of(name)}: creating state, then measuring a step at batch {spec.batch_size}")
    probe = session.probe(name)
    try:
        steps = [probe.measure(spec.batch_size, hessian=False)]
        if probe.entry.force_hessian_next is not None:
            progress(f"{title_of(name)}: measuring its Hessian step at batch {spec.batch_size}")
            steps.append(probe.measure(spec.batch_size, hessian=True))
        state, layout, param_bytes = probe.state_bytes()
        implementation = dict(probe.implementation)
    finally:
        session.release(probe)
    return OptimizerMemory(optimizer=name, title=title_of(name), implementation=implementation,
                           param_count=spec.param_count, param_bytes=param_bytes, state_bytes=state,
                           state_layout_bytes=layout, steps=steps, seconds=time.perf_counter() - started,
                           peak_bytes=max(s.peak_bytes for s in steps))


def _saving(baseline: int, other: int) -> float:
    return 1.0 - other / baseline if baseline else 0.0


def _batch_candidates(batch_size: int) -> list[int]:
    """The requested batch size, then the powers of two below it, down to 1."""
    out = [batch_size]
    power = 1 << (batch_size.bit_length() - 1)
    while power >= 1:
        if power < batch_size:
            out.append(power)
        power //= 2
    return out


def lion_verdict(spec: MemorySpec, session: _Session | None = None,
                 known: dict[int, tuple[StepMemory, StepMemory]] | None = None,
                 progress: Callable[[str], None] = lambda text: None,
                 target: float = LION_TARGET_SAVING) -> LionVerdict:
    """At which batch size does Lion's peak saving against AdamW reach `target`, or why can it not?

    Evaluates plain training steps of AdamW (`spec.adamw_impl`) and Lion on `session` (default: a new
    "cuda" session when `spec.method` is cuda, else "estimate", which allocates nothing). The saving only
    grows as the batch shrinks (the state difference is fixed, activations grow with the batch), so it
    checks the requested batch and batch 1 and bisects the powers of two between them: the answer is the
    largest power of two (or the requested batch) that meets the target. `known` holds already measured
    (AdamW, Lion) steps by batch size on the same method.
    """
    method = "cuda" if spec.method == "cuda" else "estimate"
    if session is None or session.method != method:
        session = _Session(spec, method)
    measured: dict[int, tuple[StepMemory, StepMemory]] = dict(known or {})

    def at(batch: int) -> SweepPoint:
        if batch not in measured:
            pair = []
            for name in (BASELINE, MEMORY_CHALLENGER):
                progress(f"Lion vs AdamW: {title_of(name)} at batch {batch} ({method})")
                probe = session.probe(name)
                try:
                    pair.append(probe.measure(batch, hessian=False))
                finally:
                    session.release(probe)
            measured[batch] = (pair[0], pair[1])
        adamw, lion = measured[batch]
        return SweepPoint(batch, adamw.peak_bytes, lion.peak_bytes, _saving(adamw.peak_bytes, lion.peak_bytes))

    candidates = _batch_candidates(spec.batch_size)
    first = at(candidates[0])
    hit: int | None = 0 if first.saving >= target else None
    if hit is None and len(candidates) > 1 and at(candidates[-1]).saving >= target:
        miss, hit = 0, len(candidates) - 1  # saving below target at candidates[miss], above at [hit]
        while hit - miss > 1:
            middle = (hit + miss) // 2
            if at(candidates[middle]).saving >= target:
                hit = middle
            else:
                miss = middle
    points = sorted((at(b) for b in measured), key=lambda p: -p.batch_size)

    # Bounds from the smallest batch measured: weights, gradients and state are batch-independent.
    adamw, lion = measured[min(measured)]
    n = spec.param_count
    base_adamw, base_lion = adamw.params_grads_state_in_step, lion.params_grads_state_in_step
    bound = _saving(base_adamw, base_lion)
    reached = hit is not None
    batch = candidates[hit] if reached else None
    message = _verdict_message(spec, reached, batch, points, bound, base_adamw / n, base_lion / n,
                               adamw.step_own_temporaries, target, method)
    return LionVerdict(target=target, reached=reached, batch_size=batch, method=method, adamw_impl=spec.adamw_impl,
                       points=points, bytes_per_param_adamw=base_adamw / n, bytes_per_param_lion=base_lion / n,
                       bound_without_temporaries=bound, message=message)


def _verdict_message(spec: MemorySpec, reached: bool, batch: int | None, points: list[SweepPoint], bound: float,
                     per_param_adamw: float, per_param_lion: float, adamw_temporaries: int,
                     target: float, method: str) -> str:
    by_batch = {p.batch_size: p for p in points}
    where = (f"{spec.model} at {spec.image_size}px, {spec.precision}"
             + (" (autocast keeps weights, gradients and state in fp32)" if spec.precision == "bf16" else "")
             + f", {method}")
    against = f"AdamW ({spec.adamw_impl})"
    held = (f"During step() AdamW holds {per_param_adamw:.1f} B/param (weights, gradients, state) and Lion "
            f"{per_param_lion:.1f} B/param, so against an AdamW without temporaries in step() Lion saves at most "
            f"{bound:.1%} of the peak")
    if reached:
        assert batch is not None
        larger = [p for p in points if p.batch_size > batch]
        at_or_below = f"at batch size {batch}" if batch == 1 else f"from batch size {batch} down"
        text = f"Lion's peak saving vs {against} reaches {target:.0%} {at_or_below} for {where}: " \
               f"{by_batch[batch].saving:.1%} at batch {batch}"
        if larger:
            text += f", {min(larger, key=lambda p: p.batch_size).saving:.1%} at batch " \
                    f"{min(p.batch_size for p in larger)}"
        elif batch == spec.batch_size:
            text += " (the requested batch size; larger ones were not evaluated)"
        text += "."
        if bound < target:
            text += (f" That is only because {against} allocates {_fmt(adamw_temporaries)} of temporaries inside "
                     f"step(). {held}.")
        return text
    smallest = min(points, key=lambda p: p.batch_size)
    text = f"Lion's peak saving vs {against} cannot reach {target:.0%} for {where}: " \
           f"{by_batch[spec.batch_size].saving:.1%} at batch {spec.batch_size}"
    if smallest.batch_size != spec.batch_size:
        text += f", and even at batch {smallest.batch_size} only {smallest.saving:.1%}"
    text += f". {held}; activations and temporaries shrink it further."
    return text


def measure_memory(spec: MemorySpec, progress: Callable[[str], None] = lambda text: None,
                   with_verdict: bool = True) -> MemoryReport:
    """Measure (or estimate) one training step per optimizer of `spec`, then Lion's verdict.

    Raises OptbenchError when the device runs out of memory (use method "estimate" then). "tracked"
    allocates the full peak in RAM; "estimate" allocates nothing.
    """
    started = time.perf_counter()
    session = _Session(spec, spec.method)
    try:
        results = [_measure_optimizer(session, name, progress) for name in spec.optimizers]
        baseline = results[0]  # resolve_spec puts AdamW first
        for result in results:
            result.saving_vs_adamw = _saving(baseline.peak_bytes, result.peak_bytes)
            result.state_saving_vs_adamw = _saving(baseline.state_bytes, result.state_bytes)
        verdict = None
        if with_verdict:
            known = {}
            if spec.method != "tracked" and MEMORY_CHALLENGER in spec.optimizers:
                lion = next(r for r in results if r.optimizer == MEMORY_CHALLENGER)
                known[spec.batch_size] = (baseline.steps[0], lion.steps[0])
            verdict = lion_verdict(spec, session, known, progress)
    except torch.OutOfMemoryError as exc:
        raise OptbenchError(f"out of memory measuring {spec.model} at batch {spec.batch_size} ({spec.method}): "
                            f"{str(exc).splitlines()[0]}; --method estimate allocates nothing") from None
    except RuntimeError as exc:
        if "can't allocate memory" not in str(exc):
            raise
        raise OptbenchError(f"out of RAM measuring {spec.model} at batch {spec.batch_size} on the CPU: "
                            "--method estimate allocates nothing") from None

    adamw_temporaries = baseline.steps[0].step_own_temporaries
    notes = [f"Savings are against AdamW ({spec.adamw_impl}), which allocates {_fmt(adamw_temporaries)} inside step() "
             f"({adamw_temporaries / max(baseline.param_bytes, 1):.2f}x its weights; foreach ~1x, fused and forloop "
             "~0): choose with --adamw-impl."]
    for result in results:
        if result.state_layout_bytes is not None and result.state_bytes != result.state_layout_bytes:
            notes.append(f"{result.title}: state {result.state_bytes:,} B differs from its known layout "
                         f"({result.state_layout_bytes:,} B): the library changed what it keeps.")
        if len(result.steps) > 1:
            notes.append(f"{result.title}: its peak is the larger of a plain step and a Hessian step "
                         "(create_graph backward with math attention, Hessian-vector product inside step()).")
    return MemoryReport(spec=spec, method_label=METHOD_LABELS[spec.method], device=str(session.device),
                        versions=library_versions(), results=results, verdict=verdict,
                        seconds=time.perf_counter() - started, notes=notes)


def check_json_path(path: str | Path) -> Path:
    """Fail before measuring, not after, when the JSON file cannot be written (missing or read-only folder)."""
    import os

    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise OptbenchError(f"--json {path} is a folder: give a file name, e.g. {path / 'memory.json'}")
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise OptbenchError(f"cannot write {path}: folder {folder} is missing or not writable")
    return path


def write_json(report: MemoryReport, path: str | Path) -> Path:
    path = Path(path)
    try:
        path.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    except OSError as exc:
        raise OptbenchError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path
