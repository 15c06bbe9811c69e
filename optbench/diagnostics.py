"""Optimizer diagnostics, measured on log-point steps only and read with the loop's existing device read.

On a step the loop arms (the one that ends at a log point), `training_step` calls `before_step()` after
the backward and before `optimizer.step()`, and `after_step()` right after it (before the scheduler
moves the lr). Everything stays on the device as 0-dim tensors until `read()`, which the loop calls
at the log point, where it reads the divergence flag anyway: no extra synchronisation per step.

Measured for every optimizer (this module names none):
- `grad_norm`: global L2 norm of the gradients, read BEFORE `step()` (Schedule-Free divides `p.grad`
  in place inside its step; Sophia's Hessian-step gradients still carry a graph, read under no_grad).
- `update_rms`: RMS over all parameters of the change the step made, divided by the lr that step
  used: the step size per unit of learning rate, so optimizers run at different lrs compare directly
  (a sign update like Lion's has update_rms ~1; AdamW's is usually well below 1). It needs a copy of
  the parameters on armed steps only (one parameter-sized buffer, freed after the step).
Optimizer-specific values come from the registry entry's `diagnostics` hook (Sophia's clipped
fraction and Hessian estimate, Schedule-Free's distance between averaged and training weights), and
its `diagnostics_advice` turns values into a warning, given once per run.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable

import torch

from optbench.optimizers import OptimizerEntry


class StepDiagnostics:
    def __init__(self, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer, entry: OptimizerEntry,
                 warn: Callable[[str], None] = lambda text: None):
        self.params = [p for p in params if p.requires_grad]
        self.optimizer, self.entry, self.warn = optimizer, entry, warn
        self._numel = sum(p.numel() for p in self.params)
        self._pending: dict[str, torch.Tensor] = {}
        self._before: list[torch.Tensor] | None = None
        self._epoch: dict[str, list[float]] = defaultdict(list)
        self._advised: set[str] = set()

    @torch.no_grad()
    def before_step(self) -> None:
        grads = [p.grad.detach() for p in self.params if p.grad is not None]
        if grads:
            self._pending["grad_norm"] = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        self._before = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def after_step(self) -> None:
        if self._before is not None:
            lr = self.entry.current_lr(self.optimizer)  # the lr this step used (the scheduler has not moved yet)
            if lr > 0:
                change = torch._foreach_sub([p.detach() for p in self.params], self._before)
                square_sum = torch.stack(torch._foreach_norm(change)).square().sum()
                self._pending["update_rms"] = (square_sum / self._numel).sqrt() / lr
            self._before = None
        if self.entry.diagnostics is not None:
            self._pending.update(self.entry.diagnostics(self.optimizer))

    def read(self) -> dict[str, float]:
        """The values measured since the last read, as Python floats (one device read); {} if none."""
        if not self._pending:
            return {}
        names = list(self._pending)
        values = dict(zip(names, torch.stack([self._pending[n].detach().double().reshape(()) for n in names]).tolist()))
        self._pending = {}
        for name, value in values.items():
            self._epoch[name].append(value)
        if self.entry.diagnostics_advice is not None:
            for key, text in self.entry.diagnostics_advice(values).items():
                if key not in self._advised:  # once per run and kind: a warning per log point would drown the log
                    self._advised.add(key)
                    self.warn(text)
        return values

    def epoch_summary(self) -> dict[str, Any]:
        """Mean of each value over this epoch's log points (and how many there were); resets."""
        if not self._epoch:
            return {}
        out: dict[str, Any] = {name: sum(v) / len(v) for name, v in self._epoch.items()}
        out["log_points"] = max(len(v) for v in self._epoch.values())
        self._epoch = defaultdict(list)
        return out
