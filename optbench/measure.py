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


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Exact bytes held by tensors in the optimizer's per-parameter state (0 before the first step)."""
    total = 0
    seen: set[int] = set()
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value) and value.data_ptr() not in seen:
                seen.add(value.data_ptr())
                total += value.nbytes
    return total


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


def _tracked_step(model, optimizer, step_fn: Callable[[], None]) -> dict[str, int]:
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    with tracker:
        step_fn()
    snapshot = tracker.get_tracker_snapshot("peak")
    device_snap = max(snapshot.values(), key=lambda s: s.get("Total", 0))
    out = {}
    for key, value in device_snap.items():
        name = "total" if key == "Total" else _CATEGORY_KEYS.get(getattr(key, "value", str(key)), str(key))
        out[name] = int(value)
    return out


def memory_probe(model: torch.nn.Module,
                 build_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer],
                 train_step: Callable[[torch.nn.Module, torch.optim.Optimizer], None],
                 force_hessian: Callable[[torch.optim.Optimizer], None] | None) -> dict[str, Any]:
    """Peak tensor memory of a training step, broken down, measured on a copy under MemTracker.

    The model is deep-copied and given a fresh optimizer built exactly as the real one (optimizers do
    not survive deepcopy: torch pickles only their state and groups). The first step creates the
    optimizer state (all four optimizers allocate it lazily), so it runs untracked; the second, a plain
    step with state present, is tracked. `train_step` decides itself whether a step is a Hessian step,
    as in training. With `force_hessian` (Sophia) one more step is made a Hessian step and tracked apart: it sets Sophia's peak. The copies are thrown away, so the real run's
    weights, state and random streams are untouched.
    """
    probe_model = copy.deepcopy(model)
    probe_opt = build_optimizer(probe_model)
    train_step(probe_model, probe_opt)
    result: dict[str, Any] = {"source": "torch MemTracker: tensor memory of one training step, on a copy"}
    result["plain_step"] = _tracked_step(probe_model, probe_opt, lambda: train_step(probe_model, probe_opt))
    if force_hessian is not None:
        force_hessian(probe_opt)
        result["hessian_step"] = _tracked_step(probe_model, probe_opt,
                                               lambda: train_step(probe_model, probe_opt))
    result["peak_bytes"] = max(v["total"] for k, v in result.items() if k.endswith("_step"))
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
