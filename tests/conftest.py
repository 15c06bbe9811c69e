"""Shared fixtures for the `optbench run` foundation tests.

Everything here uses the real parts (timm's ViT, the real optimizer libraries, the real loop and
record writer) at small sizes: the synthetic set or digits, depth 1-2, a couple of epochs.

Intra-op threads are pinned to 1 (override with OPTBENCH_TEST_THREADS): on this 2-core machine,
shared with other jobs, two OpenMP threads per process made a step 6x slower than one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

torch.set_num_threads(int(os.environ.get("OPTBENCH_TEST_THREADS", "1")))

from optbench.config import resolve_config  # noqa: E402
from optbench.data import load_dataset  # noqa: E402

OPTIMIZERS = ("adamw", "lion", "sophia", "schedulefree")

# A tiny but complete run: synthetic 16x16 images (17 tokens), one transformer block, 13 steps/epoch.
# 2 epochs = 26 steps, which is not a multiple of Sophia's update period (10): 3 Hessian estimates.
TINY = dict(dataset="synthetic", depth=1, epochs=2, batch_size=16, subset=200, test_subset=60, device="cpu")


def pytest_configure(config):
    config.addinivalue_line("markers", "learning: trains each optimizer for real until it must have learned "
                                       "(the most expensive tests of the foundation suite, ~40 s together)")


def tiny_config(optimizer: str, results_dir: str | Path, hparams: dict[str, Any] | None = None, **overrides: Any):
    """A validated RunConfig for the TINY run, built through the real resolve_config (smoke preset)."""
    settings = {**TINY, "results_dir": str(results_dir), **overrides}
    return resolve_config(optimizer, "smoke", settings, hparams)


@pytest.fixture
def make_config(tmp_path):
    """make_config(optimizer, hparams=None, **overrides) -> RunConfig writing into tmp_path/results."""
    def make(optimizer: str, hparams: dict[str, Any] | None = None, **overrides: Any):
        return tiny_config(optimizer, tmp_path / "results", hparams, **overrides)
    return make


@pytest.fixture(scope="session")
def synthetic_data():
    """The TINY run's data (read-only: run_experiment never modifies the ImageData it is given)."""
    return load_dataset("synthetic", subset=TINY["subset"], test_subset=TINY["test_subset"])


@pytest.fixture(scope="session")
def digits_data():
    return load_dataset("digits")


@dataclass
class CapturedRun:
    """One real `run_experiment`, with what happened inside it observed (never replaced)."""

    record: dict[str, Any]
    path: Path
    initial_state: dict[str, torch.Tensor] = field(default_factory=dict)  # weights as built, before step 1
    batches: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (x, y) per training step
    optimizer: torch.optim.Optimizer | None = None  # the run's real optimizer (not the memory probe's)
    hessian_calls: list[int] = field(default_factory=list)  # SophiaH step counter at each Hessian estimate


def captured_run(config) -> CapturedRun:
    """Run `config` end to end through run_experiment while recording, by wrapping the real functions:
    the model as built, every training batch, the real optimizer, and each call of the real optimizer
    instance's `compute_hutchinson_hessian` (the memory probe's own optimizer is a different instance
    and is not counted)."""
    import optbench.experiment as experiment
    import optbench.train as train_module
    from optbench.experiment import run_experiment

    real_build, real_train, real_batches = experiment.build_model, experiment.train, train_module.train_batches
    seen = CapturedRun(record={}, path=Path())

    def build_model(*args, **kwargs):
        model = real_build(*args, **kwargs)
        seen.initial_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return model

    def train_batches(*args, **kwargs):
        for x, y in real_batches(*args, **kwargs):
            seen.batches.append((x.clone(), y.clone()))
            yield x, y

    def train(model, optimizer, entry, *args, **kwargs):
        seen.optimizer = optimizer
        if hasattr(optimizer, "compute_hutchinson_hessian"):
            real_estimate = optimizer.compute_hutchinson_hessian

            def counting_estimate(*a, **k):
                seen.hessian_calls.append(optimizer.param_groups[0]["step"])  # read before the step
                return real_estimate(*a, **k)

            optimizer.compute_hutchinson_hessian = counting_estimate
        return real_train(model, optimizer, entry, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(experiment, "build_model", build_model)
        mp.setattr(experiment, "train", train)
        mp.setattr(train_module, "train_batches", train_batches)
        seen.record, seen.path = run_experiment(config)
    return seen


@pytest.fixture(scope="session")
def matched_runs(tmp_path_factory) -> dict[str, CapturedRun]:
    """The four optimizers on the same TINY config and seed 0 (memory probe on), plus AdamW with seed 1.

    Keys: the optimizer names, and "adamw_seed1". All five records are in one results directory.
    """
    results = tmp_path_factory.mktemp("matched_results")
    runs = {name: captured_run(tiny_config(name, results)) for name in OPTIMIZERS}
    runs["adamw_seed1"] = captured_run(tiny_config("adamw", results, seed=1))
    return runs
