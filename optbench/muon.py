"""torch.optim.Muon on hidden weight matrices and torch.optim.AdamW on every other parameter, as one
torch optimizer, so the loop, the schedule, checkpoints and memory tools see a single object.

Muon's authors (Jordan et al. 2024) and torch's own docs use Muon only for 2-D hidden matrices and a
standard optimizer for embeddings, the classifier head, gains and biases; `torch.optim.Muon` refuses
any parameter that is not 2-D. This class is glue, not an algorithm: both updates are the libraries'.

Contract: `param_groups` and `state` are shared with the two inner optimizers (the very same dicts), so a
scheduler setting `group["lr"]`, `state_dict()` / `load_state_dict()`, step hooks (MemTracker) and
optbench's state-bytes count all see one optimizer. Each group carries `algorithm`: "muon" or "adamw".
Trap: torch's `load_state_dict` replaces `param_groups` and `state` with new objects; the inner
optimizers are re-pointed to them afterwards, or they would keep stepping the old ones.
"""

from __future__ import annotations

from typing import Any

import torch


class MuonWithAdamW(torch.optim.Optimizer):
    def __init__(self, groups: list[dict[str, Any]], muon: dict[str, Any], adamw: dict[str, Any]):
        groups = [dict(g) for g in groups if g["params"]]
        unknown = {g.get("algorithm") for g in groups} - {"muon", "adamw"}
        if unknown:
            raise ValueError(f"parameter groups need algorithm 'muon' or 'adamw', got {sorted(map(str, unknown))}")
        # The inner optimizers fill each group dict with their defaults in place and keep that dict.
        self._inner = {}
        for algorithm, cls, options in (("muon", torch.optim.Muon, muon), ("adamw", torch.optim.AdamW, adamw)):
            mine = [g for g in groups if g["algorithm"] == algorithm]
            if mine:
                self._inner[algorithm] = cls(mine, **options)
        super().__init__(groups, {})
        self._share()

    def _share(self) -> None:
        for algorithm, inner in self._inner.items():
            inner.param_groups = [g for g in self.param_groups if g["algorithm"] == algorithm]
            inner.state = self.state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for inner in self._inner.values():
            inner.step()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._share()
