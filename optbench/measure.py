"""Measurement: synchronised timers, peak memory per device, optimizer state bytes, FLOPs.

Timing follows AlgoPerf: the device is synchronised before a clock is read, and evaluation is booked
apart from training. Peak memory on CUDA comes from the caching allocator
(`max_memory_allocated`, reset after set-up); on every device a memory probe replays training steps on
a copy of the model and optimizer under torch's MemTracker, which attributes the peak to parameters,
gradients, activations, optimizer state and temporaries. Nothing here is estimated or typed in.
"""

from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Accumulates synchronised wall-time over the intervals it is running."""

    def __init__(self, device: torch.device):
        self.device = device
        self.total = 0.0
        self._started: float | None = None

    def start(self) -> None:
        synchronize(self.device)
        self._started = time.perf_counter()

    def stop(self) -> float:
        synchronize(self.device)
        assert self._started is not None, "Stopwatch.stop() without start()"
        interval = time.perf_counter() - self._started
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

    The same measurement and the same parts as `optbench memory` (`memory.step_memory`): parameters,
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

    from optbench.memory import step_memory

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
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                storage = value.untyped_storage()
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
    A fresh tracker per call: MemTracker refuses a second forward of a module it has seen.
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
