"""The memory probe and FLOP count are measured once per workload key and reused (optbench/setup_cache.py).

Real runs (TINY config: synthetic 16x16, depth 1) through run_experiment: a second seed reuses the first
run's probe and gets a byte-identical breakdown to one measured afresh; anything that can change a
step's bytes gets a new key; a corrupt cache file costs a warning, not the run.
"""

from __future__ import annotations

import json

import pytest

from optbench.experiment import resolve_runtime, run_experiment
from optbench.setup_cache import cache_path, key_digest, probe_key

from conftest import tiny_config


class WarningsSeen:
    def __init__(self):
        self.warnings: list[str] = []

    def warn(self, text): self.warnings.append(text)
    def epoch_start(self, *a): pass
    def progress(self, *a): pass
    def log_point(self, *a): pass
    def epoch_end(self, *a): pass
    def phase(self, *a): pass


def _key(optimizer, hparams=None, input_shape=(16, 3, 16, 16), dtype="torch.float32", **overrides):
    config = resolve_runtime(tiny_config(optimizer, "unused", hparams, **overrides))
    return key_digest(probe_key(config.identity, input_shape, dtype))


def test_probe_key_ignores_seed_lr_weight_decay_and_epochs():
    base = _key("adamw")
    assert _key("adamw", seed=7) == base
    assert _key("adamw", {"lr": 3e-3, "weight_decay": 0.1}) == base
    assert _key("adamw", epochs=5, warmup_steps=3) == base


@pytest.mark.parametrize("change", [
    dict(batch_size=8), dict(depth=2), dict(precision="bf16"), dict(hparams={"implementation": "foreach"}),
    dict(optimizer="lion"), dict(dataset="digits"), dict(model="vit_small_patch16_224"),
    dict(input_shape=(8, 3, 16, 16)),
], ids=lambda c: ",".join(c))
def test_anything_that_changes_a_steps_bytes_changes_the_probe_key(change):
    change = dict(change)
    assert _key(change.pop("optimizer", "adamw"), **change) != _key("adamw")


def test_sophia_state_changing_hyperparameters_are_in_the_key():
    base = _key("sophia")
    assert _key("sophia", {"update_period": 1}) != base  # every step a Hessian step: the plain step changes
    assert _key("sophia", {"hessian_batch": 4}) != base  # the Hessian step's memory changes
    assert _key("sophia", {"lr": 0.02}) == base


def test_second_seed_reuses_the_probe_byte_for_byte_and_says_from_where(tmp_path):
    results = tmp_path / "results"
    first, _ = run_experiment(tiny_config("sophia", results, epochs=1))
    second, _ = run_experiment(tiny_config("sophia", results, epochs=1, seed=1, hparams={"lr": 0.02}))
    fresh, _ = run_experiment(tiny_config("sophia", tmp_path / "elsewhere", epochs=1, seed=1, hparams={"lr": 0.02}))
    assert first["memory_breakdown_reused_from"] is None and first["training_flops_reused_from"] is None
    assert second["memory_breakdown_reused_from"].startswith(str(results / "cache"))
    assert second["training_flops_reused_from"].startswith(str(results / "cache"))
    assert fresh["memory_breakdown_reused_from"] is None
    assert json.dumps(second["memory_breakdown"]) == json.dumps(fresh["memory_breakdown"])
    assert second["training_flops_per_image"] == fresh["training_flops_per_image"]
    assert "hessian_step" in second["memory_breakdown"]
    # Skipping the probe leaves the run's random streams (Sophia's Hutchinson draws) as they were.
    assert second["final_weights_sha256"] == fresh["final_weights_sha256"]


def test_sophia_ends_with_the_same_weights_with_and_without_the_memory_probe(tmp_path):
    """The probe replays Sophia's Hessian steps (Hutchinson draws from torch's global generator) on a copy:
    it must leave every random stream as it found it, so the run trains the same with it or without."""
    probed, _ = run_experiment(tiny_config("sophia", tmp_path / "a", epochs=1, memory_probe=True))
    unprobed, _ = run_experiment(tiny_config("sophia", tmp_path / "b", epochs=1, memory_probe=False))
    assert probed["memory_breakdown"] is not None and unprobed["memory_breakdown"] is None
    assert probed["hessian_updates"] == unprobed["hessian_updates"] >= 1
    assert probed["final_weights_sha256"] == unprobed["final_weights_sha256"]


def test_changed_batch_size_is_measured_not_served_the_cached_probe(tmp_path):
    results = tmp_path / "results"
    big, _ = run_experiment(tiny_config("adamw", results, epochs=1))
    small, _ = run_experiment(tiny_config("adamw", results, epochs=1, batch_size=8))
    assert small["memory_breakdown_reused_from"] is None
    assert small["memory_breakdown"]["plain_step"]["peak_bytes"] < big["memory_breakdown"]["plain_step"]["peak_bytes"]


def test_corrupt_cache_file_is_ignored_with_a_warning_and_replaced(tmp_path):
    results = tmp_path / "results"
    config = tiny_config("lion", results, epochs=1)
    first, _ = run_experiment(config)
    probe_files = list((results / "cache").glob("memory_probe-*.json"))
    assert len(probe_files) == 1
    probe_files[0].write_text('{"key": {"kind": "memory_probe"}, "val')  # truncated
    seen = WarningsSeen()
    again, _ = run_experiment(tiny_config("lion", results, epochs=1, seed=2), seen)
    assert again["status"] == "ok" and again["memory_breakdown_reused_from"] is None
    assert any("ignoring the unusable cache file" in w for w in seen.warnings)
    assert json.dumps(again["memory_breakdown"]) == json.dumps(first["memory_breakdown"])
    assert json.loads(probe_files[0].read_text())["value"] == first["memory_breakdown"]  # rewritten whole


def test_cache_file_whose_key_does_not_match_its_name_is_not_served(tmp_path):
    results = tmp_path / "results"
    run_experiment(tiny_config("adamw", results, epochs=1))
    path = next((results / "cache").glob("memory_probe-*.json"))
    document = json.loads(path.read_text())
    document["key"]["workload"]["batch_size"] = 999
    document["value"]["peak_bytes"] = 1
    path.write_text(json.dumps(document))
    seen = WarningsSeen()
    again, _ = run_experiment(tiny_config("adamw", results, epochs=1, seed=3), seen)
    assert again["memory_breakdown_reused_from"] is None and again["memory_breakdown"]["peak_bytes"] != 1
    assert cache_path(results, json.loads(path.read_text())["key"]) == path
