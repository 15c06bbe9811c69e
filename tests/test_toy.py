"""`optbench toy`: its numbers can be reproduced by hand, every optimizer makes progress, bad input is one
clear line, and the figures are written."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from optbench.cli import app
from optbench.optimizers import COURSE_SET
from optbench.toy import (APPENDIX, REFERENCE, appendix_adam_run, appendix_agreement, rosen_grad, rosenbrock,
                          rotated_quadratic, run_toy, toy_settings)

STEPS = 60  # six Sophia Hessian estimates at update_period 10; a fraction of a second per optimizer
SEED = 3


@pytest.fixture(scope="module")
def rosenbrock_run():
    return run_toy("rosenbrock", steps=STEPS, seed=SEED)


def by_hand(optimizer, point: torch.Tensor, objective, steps: int, hessian_every: int | None = None) -> torch.Tensor:
    """Step an optimizer the plain way; `hessian_every`: backward with create_graph on those steps."""
    for step in range(steps):
        loss = objective(point)
        loss.backward(create_graph=hessian_every is not None and step % hessian_every == 0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return point.detach()


def start_point(result) -> torch.Tensor:
    return torch.tensor(result.start, dtype=torch.float64, requires_grad=True)


def assert_same_point(reported: tuple[float, float], expected: torch.Tensor) -> None:
    np.testing.assert_allclose(reported, expected.numpy(), rtol=0, atol=1e-12)


# --- (1) reproducible by hand from the printed hyperparameters ----------------------------------------


def test_adamw_final_point_reproduced_by_hand(rosenbrock_run):
    run = rosenbrock_run.run("adamw")
    hp = run.hparams
    point = start_point(rosenbrock_run)
    opt = torch.optim.AdamW([point], lr=hp["lr"], betas=tuple(hp["betas"]), eps=hp["eps"],
                            weight_decay=hp["weight_decay"])
    assert_same_point(run.final_point, by_hand(opt, point, rosenbrock, STEPS))
    assert math.dist(run.final_point, rosenbrock_run.start) > 0.1  # it moved: the comparison means something


def test_lion_final_point_reproduced_by_hand(rosenbrock_run):
    from lion_pytorch import Lion

    run = rosenbrock_run.run("lion")
    hp = run.hparams
    point = start_point(rosenbrock_run)
    opt = Lion([point], lr=hp["lr"], betas=tuple(hp["betas"]), weight_decay=hp["weight_decay"])
    assert_same_point(run.final_point, by_hand(opt, point, rosenbrock, STEPS))
    # Lion moves each coordinate by exactly lr per step while the momentum's sign holds.
    assert math.dist(run.final_point, rosenbrock_run.start) > 10 * hp["lr"]


def sophia_by_hand(hp: dict, start: torch.Tensor, seed: int) -> torch.Tensor:
    from pytorch_optimizer import SophiaH

    torch.manual_seed(seed)
    opt = SophiaH([start], lr=hp["lr"], betas=tuple(hp["betas"]), weight_decay=hp["weight_decay"], p=hp["p"],
                  update_period=hp["update_period"], hessian_distribution=hp["hessian_distribution"], eps=hp["eps"])
    return by_hand(opt, start, rosenbrock, STEPS, hessian_every=hp["update_period"])


def test_sophia_final_point_reproduced_by_hand_with_the_printed_seed(rosenbrock_run):
    run = rosenbrock_run.run("sophia")
    hp = run.hparams
    assert rosenbrock_run.seed == SEED
    assert run.hessian_steps == math.ceil(STEPS / hp["update_period"])  # the real Hutchinson path ran
    assert_same_point(run.final_point, sophia_by_hand(hp, start_point(rosenbrock_run), SEED))
    # The Hutchinson probes are random: another seed lands elsewhere, so the seed is what made them agree.
    other = sophia_by_hand(hp, start_point(rosenbrock_run), SEED + 1)
    assert math.dist(run.final_point, other.tolist()) > 1e-6


def test_schedulefree_reports_its_averaged_point(rosenbrock_run):
    from schedulefree import AdamWScheduleFree

    run = rosenbrock_run.run("schedulefree")
    hp = run.hparams
    point = start_point(rosenbrock_run)
    opt = AdamWScheduleFree([point], lr=hp["lr"], betas=tuple(hp["betas"]), eps=hp["eps"],
                            weight_decay=hp["weight_decay"], warmup_steps=0)
    opt.train()
    gradient_point = by_hand(opt, point, rosenbrock, STEPS).clone()
    opt.eval()
    assert_same_point(run.final_point, point.detach())
    assert math.dist(run.final_point, gradient_point.tolist()) > 1e-6  # x, not y
    # The path is the averaged point throughout: its last point is the reported one, not y.
    assert tuple(run.points[-1]) == run.final_point


def test_sgd_reference_reproduced_by_hand(rosenbrock_run):
    run = rosenbrock_run.run("sgd")
    point = start_point(rosenbrock_run)
    opt = torch.optim.SGD([point], **run.hparams)
    assert_same_point(run.final_point, by_hand(opt, point, rosenbrock, STEPS))


def test_rerun_gives_identical_numbers(rosenbrock_run):
    again = run_toy("rosenbrock", steps=STEPS, seed=SEED)
    for first, second in zip(rosenbrock_run.runs, again.runs):
        np.testing.assert_array_equal(first.points, second.points)
        np.testing.assert_array_equal(first.losses, second.losses)


def test_toy_uses_the_lr_table_no_weight_decay_and_the_course_values_otherwise(rosenbrock_run):
    settings = toy_settings("rosenbrock")
    assert [r.key for r in rosenbrock_run.runs] == [*COURSE_SET, REFERENCE, APPENDIX]
    for run in rosenbrock_run.runs:
        assert run.hparams["lr"] == settings.lr["adamw" if run.key == APPENDIX else run.key]
        assert run.hparams["weight_decay"] == 0.0
    assert rosenbrock_run.run("sophia").hparams["p"] == 0.01  # configs/optimizers/sophia.yaml
    assert rosenbrock_run.run("lion").implementation["decoupled_weight_decay"] is False  # built by the registry


# --- (2) every optimizer makes progress on the quadratic ----------------------------------------------


def test_every_optimizer_decreases_the_loss_on_the_quadratic():
    result = run_toy("quadratic", steps=100)
    start_loss = float(rotated_quadratic(torch.tensor(result.start, dtype=torch.float64)))
    assert len(result.runs) == len(COURSE_SET) + 1
    for run in result.runs:
        assert run.diverged_at is None, run.key
        assert run.losses[0] == start_loss
        assert run.final_loss < 0.1 * start_loss, (run.key, run.final_loss)
        assert run.final_loss == pytest.approx(float(rotated_quadratic(torch.tensor(run.final_point))))


def test_steps_to_threshold_is_the_first_step_at_or_below_it(rosenbrock_run):
    run = rosenbrock_run.run("adamw")
    threshold = float(np.median(run.losses))
    reached = run.steps_to(threshold)
    assert run.losses[reached] <= threshold
    assert (run.losses[:reached] > threshold).all()
    assert run.steps_to(0.0) is None


# --- (3) bad input: one clear line, non-zero exit, no traceback ---------------------------------------


@pytest.mark.parametrize("args, words", [
    (["--function", "himmelblau"], "unknown function"),
    (["--steps", "0"], "--steps"),
    (["--steps", "-4"], "--steps"),
    (["--start", "1,2,3"], "--start"),
    (["--start", "one,two"], "--start"),
    (["--start", "1;2"], "--start"),
    (["--start", "nan,1"], "--start"),
    (["--seed", "-1"], "--seed"),
])
def test_bad_input_is_one_clear_line(tmp_path, args, words):
    result = CliRunner().invoke(app, ["toy", *args, "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)  # a crash would be caught with another exception
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], result.output
    assert not list(tmp_path.iterdir())  # nothing ran


# --- (4) the command prints the table and writes both figures -----------------------------------------


def test_command_prints_table_and_writes_both_pngs(tmp_path):
    out = tmp_path / "figures"
    result = CliRunner().invoke(app, ["toy", "--function", "quadratic", "--steps", "20", "--start=-1.5,0.5",
                                      "--seed", "7", "--out", str(out)])
    assert result.exit_code == 0, result.output
    for text in ("Seed 7", "(-1.5, 0.5)", "Weight decay 0", "no external schedule", "averaged point x",
                 "steps to", "AdamW", "Lion", "Sophia", "Schedule-Free", "SGD"):
        assert text in result.output, text
    pngs = [out / "toy_quadratic_paths.png", out / "toy_quadratic_loss.png"]
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        import matplotlib.image

        height, width = matplotlib.image.imread(png).shape[:2]
        assert width > 600 and height > 400
    assert str(pngs[0]) in result.output


def test_a_diverging_run_stops_and_is_reported(tmp_path):
    import dataclasses

    from optbench.toy import contenders, get_objective, race, summary_table
    from optbench.toy_plots import save_toy_plots
    from rich.console import Console

    settings = toy_settings("rosenbrock")
    too_fast = dataclasses.replace(settings, lr={**settings.lr, "sgd": 0.1})  # 30x the stable lr
    sgd = next(c for c in contenders(too_fast, 50) if c.key == "sgd")
    run = race(sgd, get_objective("rosenbrock"), settings.start, 50, seed=0)
    assert run.diverged_at is not None and run.diverged_at < 50
    assert len(run.losses) == run.diverged_at + 1 and np.isfinite(run.losses[:-1]).all()
    result = run_toy("rosenbrock", steps=5)
    result.runs.append(run)
    console = Console(width=200, record=True)
    console.print(summary_table(result))
    assert f"diverged at step {run.diverged_at}" in console.export_text()
    assert all(p.stat().st_size > 0 for p in save_toy_plots(result, tmp_path))


# --- (5) the course appendix's Adam, by hand in NumPy ------------------------------------------------------


def test_the_appendix_seed_and_start_are_the_rosenbrock_defaults():
    settings = toy_settings("rosenbrock")
    assert settings.seed == 42  # the appendix's np.random.seed(42)
    assert settings.start == (-1.2, 1.0)
    assert settings.appendix == {"betas": (0.9, 0.999), "eps": 1e-8}
    assert toy_settings("quadratic").appendix is None  # the appendix is about Rosenbrock only
    assert APPENDIX not in [r.key for r in run_toy("quadratic", steps=3, optimizers=["adamw"]).runs]


def test_the_appendix_adam_follows_its_update_rule_computed_by_hand():
    lr, b1, b2, eps = 0.3, 0.9, 0.999, 1e-8
    run = appendix_adam_run((-1.2, 1.0), 2, lr, (b1, b2), eps, seed=42)
    # Step 1 at (-1.2, 1): f' = (-2(2.2) - 400(-1.2)(1 - 1.44), 200(1 - 1.44)) = (-215.6, -88). After bias
    # correction m_hat = g and v_hat = g^2, so each coordinate moves by lr * g / (|g| + eps): +0.3 each.
    g1 = np.array([-215.6, -88.0])
    np.testing.assert_allclose(rosen_grad(np.array([-1.2, 1.0])), g1, rtol=1e-14)
    np.testing.assert_allclose(run.points[1], [-1.2 + lr * 215.6 / (215.6 + eps), 1.0 + lr * 88 / (88 + eps)],
                               rtol=0, atol=1e-15)
    np.testing.assert_allclose(run.points[1], [-0.9, 1.3], rtol=0, atol=1e-9)
    # Step 2 at (-0.9, 1.3): f' = (-3.8 + 360 * 0.49, 200 * 0.49) = (172.6, 98).
    x, y = run.points[1]
    g2 = np.array([-2 * (1 - x) - 400 * x * (y - x * x), 200 * (y - x * x)])
    np.testing.assert_allclose(g2, [172.6, 98.0], rtol=1e-9)
    m = b1 * (1 - b1) * g1 + (1 - b1) * g2  # m_1 = (1 - b1) g1
    v = b2 * (1 - b2) * g1**2 + (1 - b2) * g2**2
    expected = run.points[1] - lr * (m / (1 - b1**2)) / (np.sqrt(v / (1 - b2**2)) + eps)
    np.testing.assert_allclose(run.points[2], expected, rtol=0, atol=1e-15)
    # On paper: m = (-2.144, 1.88), v = (76.2276, 17.3403); m_hat = m / 0.19, v_hat = v / 0.001999, so
    # x = -0.9 - 0.3 (-11.2842 / 195.276) = -0.882664 and y = 1.3 - 0.3 (9.89474 / 93.1368) = 1.268128.
    np.testing.assert_allclose(run.points[2], [-0.882664, 1.268128], rtol=0, atol=2e-6)
    assert run.losses[2] == pytest.approx((1 - run.points[2][0])**2 + 100 * (run.points[2][1] - run.points[2][0]**2)**2)


@pytest.mark.parametrize("torch_class", [torch.optim.Adam, torch.optim.AdamW])
def test_torchs_adam_path_agrees_with_the_appendix_adam_to_float_precision(torch_class):
    steps, lr = 300, 0.3
    ours = appendix_adam_run((-1.2, 1.0), steps, lr, (0.9, 0.999), 1e-8, seed=42)
    point = torch.tensor([-1.2, 1.0], dtype=torch.float64, requires_grad=True)
    opt = torch_class([point], lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    path = [point.detach().numpy().copy()]
    for _ in range(steps):
        rosenbrock(point).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        path.append(point.detach().numpy().copy())
    np.testing.assert_allclose(np.array(path), ours.points, rtol=0, atol=1e-12)
    assert np.abs(ours.points[-1] - ours.points[0]).max() > 1  # it travelled: the agreement means something


def test_the_toy_prints_how_close_the_library_adamw_stays_to_the_appendix(rosenbrock_run, tmp_path):
    gap = appendix_agreement(rosenbrock_run)
    assert gap is not None and gap < 1e-12
    other = run_toy("rosenbrock", steps=STEPS, seed=SEED, optimizers=["lion"])  # no AdamW to compare with
    assert appendix_agreement(other) is None
    result = CliRunner().invoke(app, ["toy", "--steps", "30", "--optimizers", "adamw", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "Seed 42" in text and "np.random.seed(42)" in text
    assert re.search(r"stay within \d\.\de-1[2-9] of each other at every step", text), text
    assert "Adam by hand" in text
