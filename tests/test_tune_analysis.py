"""What tuning did, from hand-written trials and records: budget counting, choice, curves, compute."""

from __future__ import annotations

import pytest

from optbench.analysis import Verdict
from optbench.search_space import parse_search_space
from optbench.tune_analysis import (best_trial, budget_status, lr_sensitivity, summarise_optimizer, tuning_compute,
                                    tuning_curve, verdict_change)


def trial(number, slot, state="COMPLETE", value=None, lr=1e-4, wd=0.5, retry_history=(), config_hash=None):
    return {"optimizer": "lion", "number": number, "slot": slot, "state": state, "value": value,
            "params": {"lr": lr, "weight_decay": wd}, "defaults": slot == 0, "config_hash": config_hash,
            "record": None, "retry_history": list(retry_history), "worker": None}


def test_budget_counts_slots_not_trials():
    trials = [
        trial(0, 0, value=0.5),
        trial(1, 1, state="FAIL", config_hash="h1"),  # its worker died: retried as trial 4
        trial(2, 2, state="RUNNING"),
        trial(3, 3, state="WAITING"),
        trial(4, 1, value=0.7, retry_history=[1], config_hash="h1"),
        trial(5, None, state="PRUNED"),  # a worker that found nothing planned left
    ]
    status = budget_status(trials, budget=4, max_retry=3)
    assert sorted(status.settled) == [0, 1] and status.settled[1]["number"] == 4
    assert (status.running, status.waiting, status.retry_pending, status.unplanned) == (1, 1, 0, 1)
    assert not status.done
    done = budget_status(trials[:2] + [trial(2, 2, value=0.1), trial(3, 3, value=0.2), trials[4]], 4, 3)
    assert done.done and len(done.settled) == 4


def test_a_failed_trial_waiting_for_its_retry_is_pending_and_one_out_of_retries_is_settled():
    pending = budget_status([trial(0, 0, state="FAIL")], budget=1, max_retry=3)
    assert pending.retry_pending == 1 and not pending.done
    exhausted = budget_status([trial(9, 0, state="FAIL", retry_history=[1, 4, 7])], budget=1, max_retry=3)
    assert exhausted.done  # counts against the budget, scored as the worst value
    assert best_trial(exhausted.settled)["number"] == 9


def test_best_is_the_highest_score_and_ties_go_to_the_defaults():
    settled = {0: trial(0, 0, value=0.5), 1: trial(1, 1, value=0.5), 2: trial(2, 2, value=0.4)}
    assert best_trial(settled)["slot"] == 0
    settled[3] = trial(3, 3, value=0.6)
    assert best_trial(settled)["slot"] == 3
    diverged = {0: trial(0, 0, value=0.1), 1: trial(1, 1, state="FAIL", retry_history=[0, 0, 0])}
    assert best_trial(diverged)["slot"] == 0


def test_tuning_curve_is_the_running_best_with_a_band_from_reordering():
    curve = tuning_curve([0.2, 0.5, 0.3, 0.4], resamples=500, seed=1)
    assert curve["trials"] == [1, 2, 3, 4]
    assert curve["observed"] == [0.2, 0.5, 0.5, 0.5]
    assert curve["low"][-1] == curve["high"][-1] == 0.5  # all trials seen: every order ends at the best
    assert curve["low"][0] == pytest.approx(0.2) and curve["high"][0] == pytest.approx(0.5)
    assert all(lo <= med <= hi for lo, med, hi in zip(curve["low"], curve["median"], curve["high"]))
    assert tuning_curve([])["trials"] == []


def test_lr_sensitivity_gives_one_line_per_weight_decay():
    settled = {0: trial(0, 0, value=0.5, lr=1e-4, wd=0.5), 1: trial(1, 1, value=0.6, lr=3e-5, wd=0.5),
               2: trial(2, 2, value=0.2, lr=3e-4, wd=2.0), 3: trial(3, 3, state="FAIL", lr=3e-5, wd=2.0,
                                                              retry_history=[0, 0, 0])}
    lines = lr_sensitivity(settled)
    assert lines == {0.5: [(3e-5, 0.6), (1e-4, 0.5)], 2.0: [(3e-5, 0.0), (3e-4, 0.2)]}


def test_tuning_compute_counts_each_run_once_even_when_a_trial_was_retried():
    trials = [trial(1, 1, state="FAIL", config_hash="h1"), trial(4, 1, value=0.7, config_hash="h1"),
              trial(0, 0, value=0.5, config_hash="h0"), trial(5, 2, state="RUNNING", config_hash="h-none")]
    records = {"h1": {"epochs_completed": 4, "train_wall_time_s": 10.0, "eval_wall_time_s": 1.0, "hessian_updates": 8},
               "h0": {"epochs_completed": 4, "train_wall_time_s": 12.0, "eval_wall_time_s": 1.5, "hessian_updates": None}}
    assert tuning_compute(trials, records) == {"runs": 2, "epochs": 8, "device_seconds": 24.5, "hessian_updates": 8}


def test_summary_puts_defaults_beside_the_tuned_setting_and_warns_at_edges():
    space = parse_search_space("lion", {"lr": {"low": 3e-5, "high": 3e-4, "log": True, "grid": [3e-5, 1e-4, 3e-4]},
                                        "weight_decay": {"low": 0.1, "high": 2.0, "log": True,
                                                         "grid": [0.1, 0.5, 1.0, 2.0]}},
                               {"lr": 1e-4, "weight_decay": 0.5})
    trials = [trial(0, 0, value=0.5, config_hash="a"), trial(1, 1, value=0.7, lr=3e-4, wd=1.0, config_hash="b")]
    status = budget_status(trials, 2, 3)
    ok = lambda acc: {"status": "ok", "final_test_acc": acc}  # noqa: E731
    summary = summarise_optimizer("lion", status, space, True, {"lr": 1e-4, "weight_decay": 0.5},
                                  {"a": {"epochs_completed": 2}, "b": {"epochs_completed": 2}},
                                  [ok(0.4), ok(0.6)], [ok(0.7), {"status": "diverged", "final_test_acc": None}], trials)
    assert summary.trials_used == 2 and summary.chosen == {"lr": 3e-4, "weight_decay": 1.0}
    assert (summary.default_val, summary.tuned_val) == (0.5, 0.7)
    assert summary.default_test == pytest.approx(0.5)
    assert summary.tuned_test == pytest.approx(0.35)  # a diverged final seed counts as 0
    assert summary.compute["epochs"] == 4
    assert len(summary.warnings) == 1 and "best lr 0.0003 is at the high edge" in summary.warnings[0]


def test_verdict_change_line():
    a, b = Verdict("memory", False, ""), Verdict("accuracy", False, "")
    assert verdict_change([a, b], [a, b]).startswith("tuning changed no verdict")
    line = verdict_change([a, b], [a, Verdict("accuracy", True, "")])
    assert line == "tuning changed one verdict: 'accuracy' FAIL -> PASS"
    assert verdict_change([a, b], [Verdict("memory", True, ""), Verdict("accuracy", None, "")]).startswith(
        "tuning changed two verdicts")
