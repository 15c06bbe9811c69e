"""The training loop and whole runs: Hessian steps, Schedule-Free modes, matched training, measured
state, divergence, and (marked `learning`) that every optimizer actually learns.

Whole runs go through the real `run_experiment`; `conftest.captured_run` only observes them (it wraps
the real model builder, batch iterator and optimizer instance to record what they did).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import optbench.train as train_module
from optbench.data import SPECS
from optbench.experiment import run_experiment, warmup_cosine
from optbench.models import build_model
from optbench.optimizers import BuildContext, get_entry
from optbench.records import load_records
from optbench.train import evaluate, train

from conftest import OPTIMIZERS, TINY


class _Quiet:
    def epoch_start(self, epoch, epochs, steps): pass
    def progress(self, steps_done_in_epoch, loss, images_per_s): pass
    def log_point(self, step, values): pass
    def epoch_end(self, row): pass


def loop(name, data, epochs=2, batch_size=16, hparams=None, seed=0):
    """train() on a real depth-1 ViT with the optimizer built by its registry entry (no scheduler)."""
    entry = get_entry(name)
    model = build_model("vit_tiny_patch16_224", data.spec, seed, depth=1)
    hp = {**entry.defaults(), **(hparams or {})}
    hp.pop("title", None)
    opt = entry.make(model, hp, BuildContext("cpu", total_steps=100, warmup_steps=3)).optimizer
    return model, opt, entry


def run_loop(model, opt, entry, data, epochs=2, batch_size=16):
    return train(model, opt, entry, None, data, epochs=epochs, batch_size=batch_size, eval_batch_size=64, seed=0,
                 augment=True, precision="fp32", log_every=5, reporter=_Quiet())


# --- Sophia: one Hessian estimate per update period -------------------------------------------------


def test_loop_makes_one_hessian_estimate_per_ten_steps(synthetic_data):
    model, opt, entry = loop("sophia", synthetic_data)
    calls = []
    real_estimate = opt.compute_hutchinson_hessian

    def counting(*args, **kwargs):
        calls.append(opt.param_groups[0]["step"])
        return real_estimate(*args, **kwargs)

    opt.compute_hutchinson_hessian = counting
    result = run_loop(model, opt, entry, synthetic_data)
    assert result.status == "ok" and result.steps == 26
    assert calls == [0, 10, 20]  # SophiaH's own counter, read before the step
    assert result.hessian_steps == len(calls) == math.ceil(result.steps / 10)
    assert any(torch.count_nonzero(s["hessian"]) > 0 for s in opt.state.values())  # estimates were made


def test_recorded_hessian_updates_equal_the_independent_count(matched_runs):
    run = matched_runs["sophia"]
    steps = run.record["steps"]
    assert steps == 26
    assert run.record["hessian_updates"] == len(run.hessian_calls) == math.ceil(steps / 10) == 3
    assert run.hessian_calls == [0, 10, 20]
    for name in ("adamw", "lion", "schedulefree"):
        assert matched_runs[name].record["hessian_updates"] is None


# --- Schedule-Free: evaluation in eval mode, no external schedule -----------------------------------


def test_loop_evaluates_schedulefree_in_eval_mode_on_the_averaged_weights(synthetic_data, monkeypatch):
    model, opt, entry = loop("schedulefree", synthetic_data)
    seen = []
    real_evaluate = train_module.evaluate

    def observing_evaluate(m, *args, **kwargs):
        group = opt.param_groups[0]
        beta1 = group["betas"][0]
        p = next(m.parameters())
        seen.append({"train_mode": group["train_mode"], "param": p.detach().clone(), "z": opt.state[p]["z"].clone(), "beta1": beta1})
        return real_evaluate(m, *args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate", observing_evaluate)
    result = run_loop(model, opt, entry, synthetic_data)
    assert result.status == "ok" and len(seen) == 2  # one evaluation per epoch
    assert [s["train_mode"] for s in seen] == [False, False]
    # What was evaluated is x: switching to train mode gives y = lerp(x, z, 1 - beta1).
    last = seen[-1]
    assert torch.equal(next(model.parameters()).detach(), last["param"])  # left holding what was evaluated
    entry.train_mode(opt)
    y = next(model.parameters()).detach()
    assert torch.allclose(y, last["param"] + (1 - last["beta1"]) * (last["z"] - last["param"]), atol=1e-6)
    assert not torch.allclose(y, last["param"])


def test_schedulefree_run_gets_no_external_schedule(matched_runs):
    sf = matched_runs["schedulefree"]
    lr = sf.record["config"]["hparams"]["lr"]
    assert sf.record["lr_schedule"].startswith("none")
    assert [row["lr"] for row in sf.record["history"]] == [lr] * TINY["epochs"]
    group = sf.optimizer.param_groups[0]
    assert group["lr"] == lr and group["warmup_steps"] == sf.record["warmup_steps"] == 3  # its own warmup
    for name in ("adamw", "lion", "sophia"):  # the others follow warmup + cosine towards 0
        rec = matched_runs[name].record
        assert rec["lr_schedule"].startswith("warmup+cosine")
        assert rec["history"][0]["lr"] < rec["config"]["hparams"]["lr"]
        # the last step's lr (the schedule reaches 0 only after it): cosine at step total-1
        last = warmup_cosine(rec["total_steps_planned"], rec["warmup_steps"])(rec["total_steps_planned"] - 1)
        assert 0 < rec["history"][-1]["lr"] == pytest.approx(rec["config"]["hparams"]["lr"] * last, rel=1e-12)


# --- matched training --------------------------------------------------------------------------------


def test_same_seed_gives_every_optimizer_the_same_initial_weights(matched_runs):
    reference = matched_runs["adamw"].initial_state
    assert reference
    for name in OPTIMIZERS[1:]:
        state = matched_runs[name].initial_state
        assert state.keys() == reference.keys()
        assert all(torch.equal(state[k], reference[k]) for k in reference), name
    other_seed = matched_runs["adamw_seed1"].initial_state
    assert not all(torch.equal(other_seed[k], reference[k]) for k in reference)


def test_batch_order_and_augmentation_are_the_same_for_every_optimizer(matched_runs):
    reference = matched_runs["adamw"].batches
    assert len(reference) == matched_runs["adamw"].record["steps"] == 26
    for name in OPTIMIZERS[1:]:
        batches = matched_runs[name].batches
        assert len(batches) == len(reference)
        for (x, y), (rx, ry) in zip(batches, reference):
            assert torch.equal(y, ry) and torch.equal(x, rx), name
    seed1 = matched_runs["adamw_seed1"].batches
    assert not torch.equal(seed1[0][1], reference[0][1])


# --- measured optimizer state and memory -------------------------------------------------------------


def _adamw_step_counter_bytes(matched_runs) -> int:
    """torch's AdamW keeps a 4-byte `step` tensor per parameter tensor besides exp_avg/exp_avg_sq."""
    opt = matched_runs["adamw"].optimizer
    return sum(s["step"].nbytes for s in opt.state.values())


def test_recorded_state_bytes_lion_half_sophia_one_and_a_half_of_adamw(matched_runs):
    rec = {name: matched_runs[name].record for name in OPTIMIZERS}
    param_bytes = rec["adamw"]["param_bytes"]
    assert all(r["param_count"] == rec["adamw"]["param_count"] for r in rec.values())
    assert param_bytes == 4 * rec["adamw"]["param_count"]
    adamw_tensors = rec["adamw"]["optimizer_state_bytes"] - _adamw_step_counter_bytes(matched_runs)
    assert adamw_tensors == 2 * param_bytes
    assert rec["lion"]["optimizer_state_bytes"] * 2 == adamw_tensors
    assert rec["sophia"]["optimizer_state_bytes"] * 2 == adamw_tensors * 3
    assert rec["schedulefree"]["optimizer_state_bytes"] == adamw_tensors


def test_memory_breakdown_differs_the_way_optimizer_state_does(matched_runs):
    breakdown = {name: matched_runs[name].record["memory_breakdown"] for name in OPTIMIZERS}
    plain = {name: b["plain_step"] for name, b in breakdown.items()}
    params = plain["adamw"]["params"]
    assert params == matched_runs["adamw"].record["param_bytes"]
    assert all(p["params"] == params for p in plain.values())
    adamw_state = plain["adamw"]["optimizer_state"] - _adamw_step_counter_bytes(matched_runs)
    assert 2 * plain["lion"]["optimizer_state"] == adamw_state
    assert plain["schedulefree"]["optimizer_state"] == adamw_state
    assert plain["lion"]["peak_bytes"] < plain["adamw"]["peak_bytes"]
    # Sophia's peak is set by its Hessian step, measured apart.
    assert "hessian_step" in breakdown["sophia"] and "hessian_step" not in breakdown["adamw"]
    assert breakdown["sophia"]["hessian_step"]["peak_bytes"] > breakdown["sophia"]["plain_step"]["peak_bytes"]
    assert breakdown["sophia"]["peak_bytes"] == breakdown["sophia"]["hessian_step"]["peak_bytes"]
    for name in OPTIMIZERS:
        rec = matched_runs[name].record
        assert rec["peak_memory_bytes"] == breakdown[name]["peak_bytes"] > 0
        assert "MemTracker" in rec["peak_memory_source"]


# --- evaluation, timing --------------------------------------------------------------------------


def test_evaluate_returns_mean_loss_and_accuracy_fraction(synthetic_data):
    model = build_model("vit_tiny_patch16_224", synthetic_data.spec, 0, depth=1)
    loss, acc = evaluate(model, synthetic_data, 7, torch.autocast("cpu", enabled=False))  # uneven batches
    with torch.inference_mode():
        logits = model(synthetic_data.normalize(synthetic_data.test_x))
    expected_acc = (logits.argmax(1) == synthetic_data.test_y).float().mean().item()
    assert acc == pytest.approx(expected_acc) and 0.0 <= acc <= 1.0
    assert loss == pytest.approx(torch.nn.functional.cross_entropy(logits, synthetic_data.test_y).item(), rel=1e-5)


def test_training_and_evaluation_time_are_booked_apart(matched_runs):
    for name in OPTIMIZERS:
        rec = matched_runs[name].record
        times = [row["train_time_s"] for row in rec["history"]]
        assert times == sorted(times) and times[0] > 0  # cumulative training time per epoch
        assert rec["train_wall_time_s"] == times[-1]
        assert rec["eval_wall_time_s"] > 0
        assert rec["total_wall_time_s"] > rec["train_wall_time_s"] + rec["eval_wall_time_s"]


def test_history_lr_is_the_lr_the_epochs_last_step_used(make_config, monkeypatch):
    """Observed at the optimizer: the lr each real step() ran with. A warmup + cosine run's last step
    uses a small positive lr and the schedule's next value is 0: history must hold the former."""
    import optbench.experiment as experiment

    used: list[float] = []
    real_train = experiment.train

    def observing_train(model, optimizer, *args, **kwargs):
        optimizer.register_step_pre_hook(lambda opt, a, k: used.append(float(opt.param_groups[0]["lr"])))
        return real_train(model, optimizer, *args, **kwargs)

    monkeypatch.setattr(experiment, "train", observing_train)
    record, _ = run_experiment(make_config("adamw", memory_probe=False))
    steps_per_epoch = record["steps"] // record["epochs_completed"]
    assert len(used) == record["steps"] and used[-1] > 0
    assert [row["lr"] for row in record["history"]] == [used[e * steps_per_epoch - 1]
                                                        for e in range(1, record["epochs_completed"] + 1)]


def test_record_says_what_model_ran_patch_image_size_depth_width(matched_runs):
    rec = matched_runs["adamw"].record
    assert rec["config"]["patch_size"] == 4  # resolved from the data (16 px -> 4), never null
    assert rec["model"] == {"name": "vit_tiny_patch16_224", "title": "ViT-Tiny", "patch_size": 4, "tokens": 17,
                            "depth": 1, "width": 192, "param_count": rec["param_count"], "image_size": 16}


# --- divergence --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,lr", [("adamw", 1e6), ("lion", 10.0)])
def test_absurd_lr_ends_as_diverged_with_the_step_and_a_record(make_config, name, lr):
    config = make_config(name, {"lr": lr}, memory_probe=False)
    record, path = run_experiment(config)
    assert record["status"] == "diverged"
    assert isinstance(record["diverged_at_step"], int) and 1 <= record["diverged_at_step"] <= record["steps"]
    assert f"step {record['diverged_at_step']}" in record["status_detail"]
    assert record["final_test_acc"] is None
    on_disk = json.loads(path.read_text())
    assert on_disk["status"] == "diverged" and on_disk["diverged_at_step"] == record["diverged_at_step"]
    assert [r["status"] for r in load_records(path.parent).records] == ["diverged"]


def test_non_finite_test_loss_is_divergence_and_the_record_is_still_written(make_config):
    """AdamW at lr 1e6, one step per epoch: the step's own loss is finite, the weights it leaves are
    not usable, so only the evaluation sees it. The record must still be written (NaN as null)."""
    config = make_config("adamw", {"lr": 1e6}, subset=16, batch_size=16, memory_probe=False)
    record, path = run_experiment(config)
    assert record["status"] == "diverged" and record["diverged_at_step"] == 1
    assert "test loss" in record["status_detail"]
    on_disk = json.loads(path.read_text())
    assert on_disk["status"] == "diverged"
    assert on_disk["history"][-1]["test_loss"] is None  # JSON has no NaN
    assert on_disk["epochs_completed"] == 1


# --- every optimizer learns ---------------------------------------------------------------------------


@pytest.mark.learning
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_learns_digits(name, digits_data, tmp_path):
    """Course defaults, depth-2 ViT-Tiny, 3 epochs of digits (135 steps): far above 10% chance.
    Measured when written (2 threads): AdamW 57%, Lion 50%, Sophia 41%, Schedule-Free 65%."""
    from optbench.config import resolve_config

    config = resolve_config(name, "smoke", {"depth": 2, "epochs": 3, "device": "cpu", "memory_probe": False,
                                            "results_dir": str(tmp_path)})
    record, _ = run_experiment(config, data=digits_data)
    assert record["status"] == "ok"
    assert record["final_test_acc"] >= 0.3, record["history"]
    assert record["history"][-1]["train_loss"] < record["history"][0]["train_loss"]
