"""Measurement: synchronised timers, peak memory per device, optimizer state bytes, FLOPs.

Timing follows AlgoPerf: the device is synchronised before a clock is read, and evaluation is booked
apart from training. Peak memory on CUDA comes from the caching allocator
(`max_memory_allocated`, reset after set-up); on every device a memory probe replays training steps on
a copy of the model and optimizer under torch's MemTracker, which attributes the peak to parameters,
gradients, activations, optimizer state and temporaries. Nothing here is estimated or typed in.
"""

from __future__ import annotations

import copy
import gc
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Accumulates synchronised wall-time over the intervals it is running, and the process CPU time
    (all its threads) over the same intervals: CPU time well below wall-time means the process waited
    for a core (optbench/timing.py)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.total = 0.0
        self.cpu_total = 0.0
        self._started: float | None = None
        self._cpu_started = 0.0

    def start(self) -> None:
        synchronize(self.device)
        self._started = time.perf_counter()
        self._cpu_started = time.process_time()

    def stop(self) -> float:
        synchronize(self.device)
        assert self._started is not None, "Stopwatch.stop() without start()"
        interval = time.perf_counter() - self._started
        self.cpu_total += time.process_time() - self._cpu_started
        self.total += interval
        self._started = None
        return interval

    @property
    def running_now(self) -> bool:
        return self._started is not None

    def peek(self) -> float:
        """Time in the current interval so far (no synchronisation: for progress display only)."""
        return 0.0 if self._started is None else time.perf_counter() - self._started

    @contextmanager
    def running(self) -> Iterator[None]:
        self.start()
        try:
            yield
        finally:
            self.stop()


CALIBRATION_SIZE = {"cpu": 256, "cuda": 2048}  # square fp32 matmul, per device type
CALIBRATION_MATMULS = 20  # per repeat: ~20-40 ms on one CPU core, longer than a scheduler time slice
CALIBRATION_REPEATS = 5


def calibration_kernel(device: torch.device) -> dict[str, float]:
    """Time a short fixed kernel (a "reference system time", Kaddour et al. 2023): CALIBRATION_REPEATS x
    CALIBRATION_MATMULS products of one fixed fp32 matrix, synchronised, with the run's thread count.
    Returns the median repeat's wall-time and its process CPU time / wall-time. The matrix comes from
    its own generator: the run's random streams are not touched."""
    import statistics

    n = CALIBRATION_SIZE.get(device.type, 256)
    a = torch.randn(n, n, generator=torch.Generator().manual_seed(0)).to(device) / n ** 0.5
    walls, shares = [], []
    a @ a  # untimed: first use of the thread pool (or a CUDA kernel's first launch) costs extra once
    for _ in range(CALIBRATION_REPEATS):
        synchronize(device)
        wall0, cpu0 = time.perf_counter(), time.process_time()
        b = a
        for _ in range(CALIBRATION_MATMULS):
            b = a @ b
        synchronize(device)
        wall = time.perf_counter() - wall0
        walls.append(wall)
        shares.append((time.process_time() - cpu0) / wall if wall > 0 else float("nan"))
    return {"wall_s": statistics.median(walls), "cpu_per_wall": statistics.median(shares)}


def reset_cuda_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def cuda_peaks(device: torch.device) -> dict[str, int]:
    torch.cuda.synchronize(device)
    return {"allocated": int(torch.cuda.max_memory_allocated(device)),
            "reserved": int(torch.cuda.max_memory_reserved(device))}


_CATEGORY_KEYS = {"Parameter": "params", "Buffer": "buffers", "Gradient": "grads", "Activation": "activations",
                  "Temp": "temporaries", "Optstate": "optimizer_state", "Other": "other"}


def memory_probe(model: torch.nn.Module,
                 build_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer],
                 train_step: Callable[[torch.nn.Module, torch.optim.Optimizer], None],
                 force_hessian: Callable[[torch.optim.Optimizer], None] | None,
                 inputs: tuple[torch.Tensor, ...]) -> dict[str, Any]:
    """Peak tensor memory of a training step, broken down, measured on a copy under MemTracker.

    The same measurement and the same parts as `optbench memory` (`step_memory`): parameters,
    gradients, optimizer state, activations, backward temporaries, step() temporaries, inputs.
    The model is deep-copied and given a fresh optimizer built exactly as the real one (optimizers do
    not survive deepcopy: torch pickles only their state and groups). The first step creates the
    optimizer state (all four optimizers allocate it lazily), so it runs untracked; the second, a plain
    step with state present, is tracked. `train_step` decides itself whether a step is a Hessian step,
    as in training. With `force_hessian` (Sophia) one more step is made a Hessian step and tracked
    apart: it sets Sophia's peak. The copies are thrown away, so the real run's weights, state and
    random streams are untouched.
    """
    from dataclasses import asdict

    probe_model = copy.deepcopy(model)
    probe_opt = build_optimizer(probe_model)
    train_step(probe_model, probe_opt)
    batch_size = inputs[0].shape[0] if inputs else 0
    result: dict[str, Any] = {"source": "torch MemTracker: tensor memory of one training step, on a copy"}

    def tracked(kind: str) -> dict[str, Any]:
        phases = tracked_step_phases(probe_model, probe_opt, lambda: train_step(probe_model, probe_opt), inputs)
        return asdict(step_memory(kind, batch_size, phases, None))

    result["plain_step"] = tracked("plain")
    if force_hessian is not None:
        force_hessian(probe_opt)
        result["hessian_step"] = tracked("hessian")
    result["peak_bytes"] = max(v["peak_bytes"] for k, v in result.items() if k.endswith("_step"))
    del probe_model, probe_opt
    return result


def training_flops_per_image(model: torch.nn.Module, example: torch.Tensor, targets: torch.Tensor) -> int:
    """FLOPs of one forward + backward per image, counted by torch's FlopCounterMode on a copy."""
    from torch.utils.flop_counter import FlopCounterMode

    probe = copy.deepcopy(model)
    counter = FlopCounterMode(display=False)
    with counter:
        loss = torch.nn.functional.cross_entropy(probe(example), targets)
        loss.backward()
    del probe
    return int(counter.get_total_flops() // example.shape[0])


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the distinct storages behind the tensors in `optimizer.state` (0 before the first step).

    Exact for real tensors and also right for fake and meta tensors (the memory estimate), whose
    `data_ptr()` cannot tell them apart. Tensors sharing one storage count once, at the storage's size.
    """
    total = 0
    seen: dict[int, torch.UntypedStorage] = {}  # keeps each storage alive so its id() cannot be reused
    def tensors(value):
        if torch.is_tensor(value):
            yield value
        elif isinstance(value, (list, tuple)):  # SOAP keeps lists of Kronecker factors per parameter
            for item in value:
                yield from tensors(item)

    for state in optimizer.state.values():
        for value in state.values():
            for tensor in tensors(value):
                storage = tensor.untyped_storage()
                if id(storage) not in seen:
                    seen[id(storage)] = storage
                    total += storage.nbytes()
    return total


def _named_categories(device_snapshot: dict[Any, int]) -> dict[str, int]:
    """A MemTracker per-device snapshot with its keys renamed to optbench's names (all categories present)."""
    out = dict.fromkeys(_CATEGORY_KEYS.values(), 0)
    out["total"] = 0
    for key, value in device_snapshot.items():
        name = "total" if key == "Total" else _CATEGORY_KEYS.get(getattr(key, "value", str(key)), str(key))
        out[name] = int(value)
    return out


_PHASE_TRACKER_CLASS = None


def _phase_tracker_class():
    """MemTracker that keeps the peak outside and the peak inside `optimizer.step()` apart.

    It replaces MemTracker's `_update_peak_stats`, which runs after every op and walks every module seen
    so far to keep module-wise peaks (unused here): on ViT-Large that walk is ~80% of a tracked step.
    It reads MemTracker internals (`_in_opt`, set by its optimizer hooks; `_curr_mem_snap`) as they are
    in torch 2.5-2.14; tests/test_memory.py pins the behaviour. Its "peak" snapshot is never updated:
    read `phase_peaks` instead.
    """
    global _PHASE_TRACKER_CLASS
    if _PHASE_TRACKER_CLASS is None:
        from torch.distributed._tools.mem_tracker import MemTracker

        class PhasePeakTracker(MemTracker):
            def __init__(self, device: torch.device):
                super().__init__()
                self.watched_device = device
                self.phase_peaks: dict[str, dict[Any, int]] = {}

            def _pre_fw_hook(self, module, inputs) -> None:
                # A step may run the model twice (Sophia's sub-batch Hessian estimate, then the step's
                # own forward). MemTracker refuses a root module's second forward; the module-wise stats
                # it would keep are unused here, so a repeated root forward starts them afresh.
                if module in self.memory_tracking and not self._mod_tracker.is_bw:
                    name = self._mod_tracker.get_known_fqn(module)
                    if set(self._mod_tracker.parents) - {name} == {"Global"}:
                        self.reset_mod_stats()
                super()._pre_fw_hook(module, inputs)

            def _update_peak_stats(self, peak_state) -> None:
                snap = self._curr_mem_snap.get(self.watched_device)
                if snap is None:
                    return
                phase = "step" if self._in_opt else "forward_backward"
                best = self.phase_peaks.get(phase)
                if best is None or snap["Total"] > best["Total"]:
                    self.phase_peaks[phase] = dict(snap)

        _PHASE_TRACKER_CLASS = PhasePeakTracker
    return _PHASE_TRACKER_CLASS


def tracked_step_phases(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step_fn: Callable[[], None],
                        inputs: tuple[torch.Tensor, ...] = ()) -> dict[str, dict[str, int]]:
    """Tensor memory of one training step under MemTracker, the peaks outside and inside `step()` apart.

    Returns three snapshots on the device holding the model's parameters, each {category: bytes} with
    the categories of `_CATEGORY_KEYS` plus "total":
    - "forward_backward": at the highest total outside `optimizer.step()` (forward, backward, zero_grad);
    - "step_entry": when `optimizer.step()` is entered;
    - "step": at the highest total inside `optimizer.step()`.
    `inputs` (the batch) are tracked as "other". Works on real tensors of any device, and under
    FakeTensorMode when that mode is entered before this call and the model, optimizer state and inputs are
    its fake tensors: then nothing is allocated.

    Traps: MemTracker books everything allocated inside `step()` as "optimizer_state" (Sophia's
    Hessian-vector products included, and those it may book as "grads"): the step's own temporaries are
    `step["total"] - step_entry["total"]`, not a category. Optimizer state must exist before the call
    (optimizers create it lazily on their first step), or the first step's state counts as temporaries.
    A fresh tracker per call. A step may run the model more than once (module-wise stats restart).
    """
    device = next(model.parameters()).device
    tracker = _phase_tracker_class()(device)
    tracker.track_external(model, optimizer, *inputs)
    entry: dict[str, Any] = {}

    def at_step_entry(opt, args, kwargs) -> None:
        entry.update(tracker.get_tracker_snapshot("current").get(device, {}))

    handle = optimizer.register_step_pre_hook(at_step_entry)
    try:
        with tracker:
            step_fn()
    finally:
        handle.remove()
    if "step" not in tracker.phase_peaks or not entry:
        raise RuntimeError("tracked_step_phases: step_fn did not call optimizer.step() on the tracked optimizer")
    return {"forward_backward": _named_categories(tracker.phase_peaks.get("forward_backward", {})),
            "step_entry": _named_categories(entry),
            "step": _named_categories(tracker.phase_peaks["step"])}


@dataclass
class StepMemory:
    """Memory of one training step. The parts are those alive at the peak and add up to `peak_bytes`
    (for "cuda" the parts add up to the MemTracker peak; `unattributed` is the allocator's excess)."""

    kind: str  # "plain" or "hessian" (Sophia's Hutchinson step: create_graph backward + HVP in step())
    batch_size: int
    peak_bytes: int
    peak_phase: str  # "fwd/bwd" (forward, loss, backward) or "step()" (inside optimizer.step())
    params: int  # parameters and buffers
    grads: int
    optimizer_state: int
    activations: int  # forward tensors kept for backward (and, on Hessian steps, the graph of the gradients)
    backward_temporaries: int  # allocated during backward and not gradients
    step_temporaries: int  # allocated inside step() and alive at the peak (0 when the peak is before step())
    inputs: int  # the batch (MemTracker's "other")
    forward_backward_peak_bytes: int
    step_entry_bytes: int  # all that is alive when step() starts
    step_peak_bytes: int
    params_grads_state_in_step: int  # parameters, buffers, gradients and optimizer state when step() starts
    unattributed: int = 0  # cuda: allocator peak minus MemTracker peak (block rounding, workspaces)
    allocator_reserved_bytes: int | None = None  # cuda: max_memory_reserved (allocator cache included)

    @property
    def step_own_temporaries(self) -> int:
        """What step() allocates beyond what it is handed: foreach AdamW ~1x params, fused ~0."""
        return self.step_peak_bytes - self.step_entry_bytes


class AllocatorPeaks:
    """CUDA allocator peaks of one step, read apart for forward/backward and for step() via the
    optimizer's step hooks (the peak counter is reset when step() starts). Set up before the step."""

    def __init__(self, device: torch.device, optimizer: torch.optim.Optimizer):
        self.device = device
        gc.collect()
        reset_cuda_peak(device)
        self.values: dict[str, int] = {}
        self._handles = [optimizer.register_step_pre_hook(self._pre), optimizer.register_step_post_hook(self._post)]

    def _pre(self, opt, args, kwargs) -> None:
        torch.cuda.synchronize(self.device)
        self.values["forward_backward"] = int(torch.cuda.max_memory_allocated(self.device))
        self.values["reserved_forward_backward"] = int(torch.cuda.max_memory_reserved(self.device))
        self.values["step_entry"] = int(torch.cuda.memory_allocated(self.device))
        torch.cuda.reset_peak_memory_stats(self.device)

    def _post(self, opt, args, kwargs) -> None:
        torch.cuda.synchronize(self.device)
        self.values["step"] = int(torch.cuda.max_memory_allocated(self.device))
        self.values["reserved_step"] = int(torch.cuda.max_memory_reserved(self.device))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def step_memory(kind: str, batch_size: int, phases: dict[str, dict[str, int]],
                allocator: AllocatorPeaks | None) -> StepMemory:
    """One step's parts from `tracked_step_phases` (and, on CUDA, the allocator's peaks)."""
    # Inside step() MemTracker books new tensors as optimizer state and may re-book old ones (Sophia's
    # HVP outputs pass through gradient hooks), so at a step peak the parts are read at step entry and
    # everything step() added is its temporaries: the parts still add up to the peak.
    fb, entry, step = phases["forward_backward"], phases["step_entry"], phases["step"]
    in_step = step["total"] >= fb["total"]
    at = entry if in_step else fb
    tracker_peak = max(fb["total"], step["total"])
    out = StepMemory(
        kind=kind, batch_size=batch_size, peak_bytes=tracker_peak,
        peak_phase="step()" if in_step else "fwd/bwd",
        params=at["params"] + at["buffers"], grads=at["grads"], optimizer_state=at["optimizer_state"],
        activations=at["activations"], backward_temporaries=at["temporaries"],
        step_temporaries=step["total"] - entry["total"] if in_step else 0, inputs=at["other"],
        forward_backward_peak_bytes=fb["total"], step_entry_bytes=entry["total"], step_peak_bytes=step["total"],
        params_grads_state_in_step=sum(entry[k] for k in ("params", "buffers", "grads", "optimizer_state")))
    if allocator is not None:
        v = allocator.values
        peak = max(v["forward_backward"], v["step"])
        out.peak_bytes, out.unattributed = peak, peak - tracker_peak
        out.peak_phase = "step()" if v["step"] >= v["forward_backward"] else "fwd/bwd"
        out.forward_backward_peak_bytes, out.step_entry_bytes = v["forward_backward"], v["step_entry"]
        out.step_peak_bytes = v["step"]
        out.allocator_reserved_bytes = max(v["reserved_forward_backward"], v["reserved_step"])
    return out
