"""Optimizer diagnostics: each figure recomputed independently from what the real optimizer did
(its state, the parameter change it made, the gradients it was handed), measured only on log-point
steps, never changing the numbers, and written into the record's history.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from optbench.data import train_batches
from optbench.diagnostics import StepDiagnostics
from optbench.experiment import weights_digest
from optbench.models import build_model
from optbench.optimizers import BuildContext, get_entry
from optbench.records import load_records
from optbench.train import train, training_step

from test_train import run_loop


class _Recorder:
    def __init__(self):
        self.points, self.warnings = [], []

    def epoch_start(self, epoch, epochs, steps): pass
    def progress(self, steps_done_in_epoch, loss, images_per_s): pass
    def log_point(self, step, values): self.points.append((step, values))
    def epoch_end(self, row): pass
    def warn(self, text): self.warnings.append(text)


def built(name, data, hparams=None, seed=0):
    entry = get_entry(name)
    model = build_model("vit_tiny_patch16_224", data.spec, seed, depth=1)
    hp = {**entry.defaults(), **(hparams or {})}
    for key in ("title", "color", "search_space"):
        hp.pop(key, None)
    opt = entry.make(model, hp, BuildContext("cpu", total_steps=100, warmup_steps=3)).optimizer
    return model, opt, entry


def steps(model, opt, entry, data, n, measure_last=True):
    """n real training steps; the last one measured. Returns (diagnostics values, params before/after it)."""
    diag = StepDiagnostics(list(model.parameters()), opt, entry)
    entry.train_mode(opt)
    model.train()
    before = after = None
    for i, (x, y) in enumerate(train_batches(data, 16, 0, 1, True)):
        last = i == n - 1
        if last:
            before = [p.detach().clone() for p in model.parameters()]
        training_step(model, opt, entry, x, y, torch.autocast("cpu", enabled=False), entry.hessian_due(opt),
                      diag if last and measure_last else None)
        if last:
            after = [p.detach().clone() for p in model.parameters()]
            break
    return diag.read(), before, after


# --- Sophia -----------------------------------------------------------------------------------------


def test_sophia_clipped_fraction_recomputes_from_state_and_from_the_step_taken(synthetic_data):
    """With weight decay 0, SophiaH moves a clipped coordinate by exactly lr*p; the diagnostic's clipped
    share equals the share of coordinates that moved by lr*p in that very step, and the Hessian mean/min
    equal those of the optimizer's `hessian_moment` state."""
    model, opt, entry = built("sophia", synthetic_data, {"weight_decay": 0.0})
    values, before, after = steps(model, opt, entry, synthetic_data, 12)  # past a Hessian estimate (step 10)
    group = opt.param_groups[0]
    bound = group["lr"] * group["p"]
    moved = torch.cat([(a - b).abs().flatten() for a, b in zip(after, before)])
    # clipped: |step| == lr*p (up to float32 rounding of weights ~1 changed by ~1e-4: a few 1e-3 relative)
    at_bound = (moved >= bound * (1 - 3e-3)).double().mean().item()
    assert moved.max().item() <= bound * (1 + 3e-3)
    assert values["sophia_clipped_fraction"] == pytest.approx(at_bound, abs=2e-3)
    assert values["sophia_win_rate"] == pytest.approx(1 - values["sophia_clipped_fraction"], abs=1e-12)
    # the same share straight from the state, with SophiaH's own formula
    states = [opt.state[p] for p in model.parameters()]
    ratio = torch.cat([(s["momentum"] / s["hessian_moment"].clamp(min=group["eps"])).flatten() for s in states])
    assert values["sophia_clipped_fraction"] == pytest.approx((ratio.abs() >= group["p"]).double().mean().item(),
                                                              abs=1e-12)
    moments = torch.cat([s["hessian_moment"].flatten() for s in states]).double()
    assert values["sophia_hessian_mean"] == pytest.approx(moments.mean().item(), rel=1e-9)
    assert values["sophia_hessian_min"] == pytest.approx(moments.min().item(), rel=1e-6)
    assert 0 < values["sophia_clipped_fraction"] < 1  # both kinds present, so the check means something


def test_sophia_advice_outside_the_authors_range():
    advice = get_entry("sophia").diagnostics_advice
    assert advice({"sophia_win_rate": 0.3}) == {}
    low = advice({"sophia_win_rate": 0.04})["sophia_win_rate"]
    assert "0.04" in low and "raise rho" in low and "lr" in low
    assert "lower p" in advice({"sophia_win_rate": 0.8})["sophia_win_rate"]


def test_sophia_warning_is_given_once_per_run(synthetic_data):
    model, opt, entry = built("sophia", synthetic_data)
    reporter = _Recorder()
    diag = StepDiagnostics(list(model.parameters()), opt, entry, reporter.warn)
    train(model, opt, entry, None, synthetic_data, epochs=2, batch_size=16, eval_batch_size=64, seed=0, augment=True,
          precision="fp32", log_every=5, reporter=reporter, diagnostics=diag)
    wins = [v["sophia_win_rate"] for _, v in reporter.points]
    outside = [w for w in wins if not 0.1 <= w <= 0.5]
    assert len(reporter.warnings) == (1 if outside else 0)


# --- generic: gradient norm and update RMS ----------------------------------------------------------


def test_grad_norm_is_read_before_schedulefree_divides_the_gradients(synthetic_data):
    model, opt, entry = built("schedulefree", synthetic_data)
    seen = {}

    def pre_hook(optimizer, args, kwargs):  # what step() is handed
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        seen["before"] = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item()

    def post_hook(optimizer, args, kwargs):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        seen["after"] = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item()

    opt.register_step_pre_hook(pre_hook)
    opt.register_step_post_hook(post_hook)
    values, _, _ = steps(model, opt, entry, synthetic_data, 3)
    assert values["grad_norm"] == pytest.approx(seen["before"], rel=1e-5)
    assert seen["after"] != pytest.approx(seen["before"], rel=1e-2)  # the trap is real: step() changed p.grad


def test_update_rms_is_the_parameter_change_per_unit_lr(synthetic_data):
    for name in ("adamw", "lion"):
        model, opt, entry = built(name, synthetic_data, {"weight_decay": 0.0})
        values, before, after = steps(model, opt, entry, synthetic_data, 4)
        change = torch.cat([(a - b).flatten() for a, b in zip(after, before)]).double()
        lr = opt.param_groups[0]["lr"]
        assert values["update_rms"] == pytest.approx(change.square().mean().sqrt().item() / lr, rel=1e-4), name
        if name == "lion":  # a sign update: every coordinate moves by lr (sign(0) = 0 aside)
            assert values["update_rms"] == pytest.approx(1.0, abs=1e-3)
        else:  # Adam's normalised step is smaller than a sign step
            assert values["update_rms"] < 1.0


def test_schedulefree_distance_is_what_eval_mode_swaps_in(synthetic_data):
    model, opt, entry = built("schedulefree", synthetic_data)
    values, _, _ = steps(model, opt, entry, synthetic_data, 5)
    y = torch.cat([p.detach().flatten() for p in model.parameters()]).double()
    entry.eval_mode(opt)
    x = torch.cat([p.detach().flatten() for p in model.parameters()]).double()
    assert values["schedulefree_x_y_distance"] == pytest.approx((x - y).norm().item(), rel=1e-4)
    assert values["schedulefree_x_y_relative"] == pytest.approx(((x - y).norm() / y.norm()).item(), rel=1e-4)
    assert values["schedulefree_x_y_distance"] > 0


# --- in the loop --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sophia", "schedulefree"])
def test_diagnostics_never_change_the_numbers(synthetic_data, name):
    digests = []
    for with_diagnostics in (False, True):
        model, opt, entry = built(name, synthetic_data)
        reporter = _Recorder()
        diag = StepDiagnostics(list(model.parameters()), opt, entry) if with_diagnostics else None
        result = train(model, opt, entry, None, synthetic_data, epochs=1, batch_size=16, eval_batch_size=64, seed=0,
                       augment=True, precision="fp32", log_every=5, reporter=reporter, diagnostics=diag)
        assert result.status == "ok"
        digests.append(weights_digest(model))
        if with_diagnostics:  # measured on log-point steps only: 5, 10 and the epoch's last (13)
            assert [step for step, _ in reporter.points] == [5, 10, 13]
            assert all("grad_norm" in v and "update_rms" in v for _, v in reporter.points)
            assert result.history[0]["diagnostics"]["log_points"] == 3
    assert digests[0] == digests[1]


def test_record_history_carries_diagnostics_and_loads(matched_runs):
    results = matched_runs["adamw"].path.parent
    loaded = load_records(results)
    assert not loaded.problems
    by_name = {r["optimizer"]: r for r in loaded.records if r["config"]["seed"] == 0}
    expected = {"adamw": set(), "lion": set(), "schedulefree": {"schedulefree_x_y_distance"},
                "sophia": {"sophia_win_rate", "sophia_clipped_fraction", "sophia_hessian_mean", "sophia_hessian_min"}}
    for name, extra in expected.items():
        for row in by_name[name]["history"]:
            diag = row["diagnostics"]
            assert {"grad_norm", "update_rms", "log_points"} | extra <= set(diag), (name, diag)
            assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in diag.values())


# --- report --diagnostics ------------------------------------------------------------------------------


def _hand_record(optimizer, seed, update_rms):
    return {"optimizer": optimizer, "status": "ok", "config": {"seed": seed},
            "history": [{"epoch": i + 1, "diagnostics": {"update_rms": v}} for i, v in enumerate(update_rms)]}


def test_update_size_against_the_baseline_from_hand_written_records():
    from optbench.analysis import update_size_notes, update_size_per_lr

    records = [_hand_record("adamw", 0, [0.1, 0.2, 0.3]), _hand_record("adamw", 1, [0.2, 0.2, 0.2]),
               _hand_record("lion", 0, [1.0, 0.99, 1.0, 1.0]),
               {**_hand_record("sophia", 0, [5.0]), "status": "diverged"}]  # not finished: left out
    assert update_size_per_lr(records) == pytest.approx({"adamw": 0.2, "lion": 1.0})
    [note] = update_size_notes(records)
    assert "lion 1 = 5.0x adamw's" in note and "sophia" not in note
    assert update_size_notes([_hand_record("adamw", 0, [])]) == []


def test_report_diagnostics_draws_the_figure_and_names_the_update_ratio(matched_runs, tmp_path):
    from typer.testing import CliRunner

    from optbench.cli import app

    results = matched_runs["adamw"].path.parent
    out = CliRunner().invoke(app, ["report", str(results), "--out", str(tmp_path), "--diagnostics"])
    assert out.exit_code == 0, out.output
    figures = list(tmp_path.glob("comparison-*-diagnostics.png"))
    assert len(figures) == 1 and figures[0].stat().st_size > 10_000
    assert "update RMS per unit lr" in out.output and "x adamw's" in out.output
    plain = CliRunner().invoke(app, ["report", str(results), "--out", str(tmp_path / "plain")])
    assert "update RMS per unit lr" not in plain.output and not list((tmp_path / "plain").glob("*diagnostics*"))
