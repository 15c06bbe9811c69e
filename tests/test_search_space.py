"""Search spaces as data: the four YAMLs, the parser's one-line errors, edges, and resolve_config."""

from __future__ import annotations

import pytest

from optbench.config import resolve_config
from optbench.optimizers import get_entry
from optbench.errors import ConfigError
from optbench.search_space import Param, check_equal_grids, on_edge, parse_search_space
from optbench.tune import load_search_space

OPTIMIZERS = ("adamw", "lion", "sophia", "schedulefree")
HP = {"lr": 1e-4, "weight_decay": 0.5, "betas": [0.9, 0.99]}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_has_a_12_point_grid_holding_its_defaults(name):
    config = resolve_config(name, "smoke", {"device": "cpu"})
    space = load_search_space(name, config.hparams)
    assert space.names == ["lr", "weight_decay"]
    assert space.grid_size == 12 and len(space.param("lr").grid) == 3 and len(space.param("weight_decay").grid) == 4
    defaults = {k: config.hparams[k] for k in space.names}
    assert defaults in space.grid_points()  # trial 1 (the defaults) is a grid point
    assert space.param("lr").log


def test_lion_grid_is_seed_003s():
    space = load_search_space("lion", resolve_config("lion", "smoke").hparams)
    assert space.param("lr").grid == (3e-5, 1e-4, 3e-4)
    assert space.param("weight_decay").grid == (0.1, 0.5, 1.0, 2.0)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_resolve_config_drops_the_non_hyperparameter_keys(name):
    assert get_entry(name).search_space()
    hparams = resolve_config(name, "smoke").hparams
    assert not {"search_space", "title", "color"} & set(hparams)


@pytest.mark.parametrize("raw, message", [
    (None, "must map each tuned hyperparameter"),
    ({"momentum": {"low": 0.1, "high": 1, "log": False, "grid": [0.5]}}, "'momentum' is not a numeric hyperparameter"),
    ({"betas": {"low": 0.1, "high": 1, "log": False, "grid": [0.5]}}, "'betas' is not a numeric hyperparameter"),
    ({"lr": {"low": 1e-5, "high": 1e-3, "grid": [1e-4]}}, "missing log"),
    ({"lr": {"low": 1e-5, "high": 1e-3, "log": True, "grid": [1e-4], "step": 2}}, "unknown step"),
    ({"lr": {"low": 1e-3, "high": 1e-5, "log": True, "grid": [1e-4]}}, "low < high"),
    ({"lr": {"low": 0, "high": 1e-3, "log": True, "grid": [1e-4]}}, "log scale, so low must be > 0"),
    ({"lr": {"low": 1e-5, "high": 1e-3, "log": "yes", "grid": [1e-4]}}, "log must be true or false"),
    ({"lr": {"low": 1e-5, "high": 1e-3, "log": True, "grid": []}}, "non-empty list of numbers"),
    ({"lr": {"low": 1e-5, "high": 1e-3, "log": True, "grid": [1e-4, 1e-2]}}, "outside"),
    ({"lr": {"low": 1e-5, "high": 1e-3, "log": True, "grid": [1e-4, 1e-4]}}, "repeats a value"),
    ({"lr": {"low": 2e-4, "high": 1e-3, "log": True, "grid": [3e-4]}}, "the default lr 0.0001 lies outside"),
])
def test_bad_search_spaces_are_one_line_errors(raw, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse_search_space("lion", raw, HP)
    assert "\n" not in str(info.value) and "search_space of lion" in str(info.value)


def test_unequal_grids_are_refused():
    a = parse_search_space("a", {"lr": {"low": 1e-5, "high": 1e-3, "log": True, "grid": [1e-5, 1e-4]}}, HP)
    b = parse_search_space("b", {"lr": {"low": 1e-5, "high": 1e-3, "log": True, "grid": [1e-4]}}, HP)
    with pytest.raises(ConfigError, match="grids differ in size"):
        check_equal_grids([a, b])


def test_edges_on_the_grid_and_in_the_range():
    p = Param("lr", 1e-5, 1e-3, True, (1e-5, 1e-4, 1e-3))
    assert on_edge(p, 1e-5, grid=True) == "low" and on_edge(p, 1e-3, grid=True) == "high"
    assert on_edge(p, 1e-4, grid=True) is None
    assert p.position(1e-4) == pytest.approx(0.5)  # log scale: the middle of 1e-5..1e-3 is 1e-4
    assert on_edge(p, 1.3e-5, grid=False) == "low" and on_edge(p, 0.8e-3, grid=False) == "high"
    assert on_edge(p, 5e-5, grid=False) is None
