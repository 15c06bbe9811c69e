"""An optimizer's search space, as written under `search_space:` in its YAML: parsed and checked.

Format (one mapping per tuned hyperparameter):

    search_space:
      lr: {low: 3.0e-5, high: 3.0e-4, log: true, grid: [3.0e-5, 1.0e-4, 3.0e-4]}
      weight_decay: {low: 0.1, high: 2.0, log: true, grid: [0.1, 0.5, 1.0, 2.0]}

`low`/`high`/`log` are the range a Sobol sequence is mapped into; `grid` lists the values the grid
search tries, and the grid is the Cartesian product of the parameters' lists. Every grid value lies
in its range. Pure: no I/O, no Optuna; errors are one-line `ConfigError`s naming the optimizer and key.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

from optbench.errors import ConfigError

FIELDS = ("low", "high", "log", "grid")


@dataclass(frozen=True)
class Param:
    name: str
    low: float
    high: float
    log: bool
    grid: tuple[float, ...]

    def position(self, value: float) -> float:
        """Where `value` sits in the range, 0 at `low` and 1 at `high`, on the parameter's own scale."""
        if self.log:
            return (math.log(value) - math.log(self.low)) / (math.log(self.high) - math.log(self.low))
        return (value - self.low) / (self.high - self.low)


@dataclass(frozen=True)
class SearchSpace:
    optimizer: str
    params: tuple[Param, ...]  # in the YAML's order

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.params]

    def grid_points(self) -> list[dict[str, float]]:
        """Every point of the grid (the product of the parameters' grids), in a fixed order."""
        return [dict(zip(self.names, values)) for values in itertools.product(*(p.grid for p in self.params))]

    @property
    def grid_size(self) -> int:
        return math.prod(len(p.grid) for p in self.params)

    def param(self, name: str) -> Param:
        return next(p for p in self.params if p.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {p.name: {"low": p.low, "high": p.high, "log": p.log, "grid": list(p.grid)} for p in self.params}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_search_space(optimizer: str, raw: Any, hyperparameters: dict[str, Any]) -> SearchSpace:
    """Check `raw` (the YAML's `search_space`) against the optimizer's `hyperparameters` (its defaults).

    Each tuned name must be one of the optimizer's numeric hyperparameters, and its default must lie in
    the range (the defaults are always one of the trials).
    """
    where = f"search_space of {optimizer}"
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{where} must map each tuned hyperparameter to {{low, high, log, grid}}; got {raw!r}")
    params = []
    for name, spec in raw.items():
        if name not in hyperparameters or not _number(hyperparameters[name]):
            raise ConfigError(f"{where}: '{name}' is not a numeric hyperparameter of {optimizer}")
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: {name} must be a mapping with {', '.join(FIELDS)}; got {spec!r}")
        missing = [f for f in FIELDS if f not in spec]
        unknown = sorted(set(spec) - set(FIELDS))
        if missing or unknown:
            raise ConfigError(f"{where}: {name} needs exactly {', '.join(FIELDS)}"
                              + (f" (missing {', '.join(missing)})" if missing else "")
                              + (f" (unknown {', '.join(unknown)})" if unknown else ""))
        low, high, log, grid = spec["low"], spec["high"], spec["log"], spec["grid"]
        if not (_number(low) and _number(high) and low < high):
            raise ConfigError(f"{where}: {name} needs numbers low < high; got low {low!r}, high {high!r}")
        if not isinstance(log, bool):
            raise ConfigError(f"{where}: {name}.log must be true or false; got {log!r}")
        if log and low <= 0:
            raise ConfigError(f"{where}: {name} is on a log scale, so low must be > 0; got {low!r}")
        if not isinstance(grid, list) or not grid or not all(_number(v) for v in grid):
            raise ConfigError(f"{where}: {name}.grid must be a non-empty list of numbers; got {grid!r}")
        outside = [v for v in grid if not low <= v <= high]
        if outside:
            raise ConfigError(f"{where}: {name}.grid values {outside} lie outside [{low:g}, {high:g}]")
        if len(set(grid)) != len(grid):
            raise ConfigError(f"{where}: {name}.grid repeats a value: {grid}")
        default = hyperparameters[name]
        if not low <= default <= high:
            raise ConfigError(f"{where}: the default {name} {default:g} lies outside [{low:g}, {high:g}]; "
                              "widen the range (the defaults are always one of the trials)")
        params.append(Param(name, float(low), float(high), log, tuple(float(v) for v in sorted(grid))))
    return SearchSpace(optimizer, tuple(params))


def check_equal_grids(spaces: list[SearchSpace]) -> None:
    """The grid search gives every optimizer the same budget only if the grids have the same size."""
    sizes = {s.optimizer: s.grid_size for s in spaces}
    if len(set(sizes.values())) > 1:
        listing = ", ".join(f"{k} {v}" for k, v in sizes.items())
        raise ConfigError(f"the optimizers' grids differ in size ({listing}): give every optimizer a grid of the "
                          "same size in optimizers/*.yaml, or use --space sobol")


def on_edge(param: Param, value: float, grid: bool, tolerance: float = 0.1) -> str | None:
    """'low'/'high' when `value` sits at the edge of what was searched, else None.

    Grid search: the smallest or largest grid value. Sobol: within `tolerance` of the range's ends, on
    the parameter's scale. A best value at an edge says the optimum may lie outside the searched box.
    """
    if grid:
        if len(param.grid) < 2:
            return None
        return "low" if math.isclose(value, param.grid[0]) else "high" if math.isclose(value, param.grid[-1]) else None
    pos = param.position(value)
    return "low" if pos <= tolerance else "high" if pos >= 1 - tolerance else None
