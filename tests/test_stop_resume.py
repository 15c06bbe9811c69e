"""A run stopped mid-epoch by a real SIGTERM resumes to the same weights as a run never stopped.

Each optimizer of the course: the stop checkpoint must hold what the next step needs (Schedule-Free in
train mode: an eval()/train() round trip changes the weights in the last bits).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from optbench.experiment import run_experiment
from optbench.optimizers import COURSE_SET

from conftest import tiny_config


class StopAtStep:
    """A reporter that sends this process SIGTERM at one training step (what `kill -TERM` does)."""

    def __init__(self, step: int | None):
        self.step = step

    def log_point(self, step, values):
        if step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)

    def __getattr__(self, name):
        return lambda *a, **k: None


@pytest.mark.parametrize("optimizer", list(COURSE_SET))
def test_a_mid_epoch_stop_then_resume_ends_with_the_same_weights(tmp_path: Path, optimizer: str):
    # 13 steps per epoch, 2 epochs: step 5 is mid-way through the first, step 18 mid-way through the second
    # (the resume then starts from the first epoch's end-of-epoch checkpoint plus five steps).
    settings = dict(log_every=1, memory_probe=False)
    whole, _ = run_experiment(tiny_config(optimizer, tmp_path / "whole", **settings), StopAtStep(None))
    assert whole["status"] == "ok"
    for stop_at in (5, 18):
        results = tmp_path / f"stopped-{stop_at}"
        config = tiny_config(optimizer, results, **settings)
        stopped, _ = run_experiment(config, StopAtStep(stop_at))
        assert stopped["status"] == "interrupted" and stopped["steps"] == stop_at, stopped["status_detail"]
        resumed, _ = run_experiment(config, StopAtStep(None), resume=True)
        assert resumed["status"] == "ok" and resumed["resumed"] is True
        assert resumed["final_weights_sha256"] == whole["final_weights_sha256"], (optimizer, stop_at)
        assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in whole["history"]]
        assert resumed["final_test_acc"] == whole["final_test_acc"]
