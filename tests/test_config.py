"""Presets + overrides + optimizer defaults -> one validated, frozen RunConfig."""

from __future__ import annotations

import dataclasses
import math

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from optbench.config import RunConfig, parse_value, preset_seeds, resolve_config, resolved_warmup_steps
from optbench.settings import PACKAGE_CONFIG_DIR as CONFIG_DIR
from optbench.settings import available_presets, load_preset
from optbench.errors import ConfigError


def test_smoke_preset_and_optimizer_defaults_come_from_configs():
    cfg = resolve_config("adamw", "smoke")
    preset = yaml.safe_load((CONFIG_DIR / "presets" / "smoke.yaml").read_text())
    defaults = yaml.safe_load((CONFIG_DIR / "optimizers" / "adamw.yaml").read_text())
    for key in ("dataset", "depth", "epochs", "batch_size", "warmup_steps", "model"):
        assert getattr(cfg, key) == preset[key]
    assert cfg.preset == "smoke"
    assert cfg.hparams["lr"] == defaults["lr"] == 1e-3
    assert cfg.hparams["weight_decay"] == defaults["weight_decay"] == 0.05  # the course's, not torch's 1e-2
    assert cfg.hparams["betas"] == [0.9, 0.999]
    assert "title" not in cfg.hparams and "search_space" not in cfg.hparams  # not hyperparameters


def test_default_preset_is_the_course_cifar10_setup():
    cfg = resolve_config("lion")
    assert (cfg.dataset, cfg.epochs, cfg.batch_size, cfg.warmup_steps) == ("cifar10", 50, 128, 500)
    assert cfg.model == "vit_tiny_patch16_224"


@pytest.mark.parametrize("optimizer", ["adamw", "lion", "sophia", "schedulefree"])
def test_every_optimizer_resolves_with_its_defaults(optimizer):
    cfg = resolve_config(optimizer, "smoke")
    assert cfg.optimizer == optimizer
    assert cfg.hparams["lr"] > 0


def test_course_per_step_weight_shrink_is_matched_across_optimizers():
    """Lion (lr 1e-4, wd 0.5) and SophiaH (lr * wd) decay weights per step exactly as much as AdamW."""
    hp = {name: resolve_config(name, "smoke").hparams for name in ("adamw", "lion", "sophia")}
    shrink = {name: h["lr"] * h["weight_decay"] for name, h in hp.items()}
    assert shrink["adamw"] == pytest.approx(5e-5)
    assert shrink["lion"] == pytest.approx(shrink["adamw"])
    assert shrink["sophia"] == pytest.approx(shrink["adamw"])
    assert hp["sophia"]["update_period"] == 10


def test_overrides_and_hparam_overrides_apply_and_none_is_ignored():
    cfg = resolve_config("sophia", "smoke", {"epochs": 2, "seed": 7, "subset": None}, {"lr": 0.02, "p": 0.05})
    assert (cfg.epochs, cfg.seed, cfg.subset) == (2, 7, None)
    assert cfg.hparams["lr"] == 0.02 and cfg.hparams["p"] == 0.05
    assert cfg.hparams["weight_decay"] == resolve_config("sophia", "smoke").hparams["weight_decay"]


def test_config_is_frozen():
    cfg = resolve_config("adamw", "smoke")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs = 3  # type: ignore[misc]


def test_config_hash_covers_what_changes_numbers_and_nothing_else():
    base = resolve_config("adamw", "smoke")
    same = resolve_config("adamw", "smoke", {"results_dir": "elsewhere", "data_dir": "/tmp/d", "download": False,
                                              "log_every": 3})
    assert same.config_hash == base.config_hash
    assert resolve_config("adamw", "smoke").config_hash == base.config_hash  # stable
    for changed in (resolve_config("adamw", "smoke", {"seed": 1}),
                    resolve_config("adamw", "smoke", {"epochs": 7}),
                    resolve_config("adamw", "smoke", None, {"lr": 2e-3}),
                    resolve_config("lion", "smoke")):
        assert changed.config_hash != base.config_hash
    assert len(base.config_hash) == 12


@pytest.mark.parametrize("requested,total,expected", [(500, 100, 10), (500, 101, 11), (5, 1000, 5), (0, 50, 0),
                                                      (500, 26, 3)])
def test_warmup_is_capped_at_ten_percent_of_the_run(requested, total, expected):
    assert resolved_warmup_steps(requested, total) == expected


@pytest.mark.parametrize("text,value", [("0.01", 0.01), ("1.0e-4", 1e-4), ("3", 3), ("true", True),
                                        ("[0.9, 0.99]", [0.9, 0.99]), ("rademacher", "rademacher")])
def test_parse_value_reads_command_line_values_like_yaml(text, value):
    assert parse_value(text) == value


def test_parse_value_reads_scientific_notation_without_a_dot():
    assert parse_value("1e-4") == 1e-4
    cfg = resolve_config("sophia", "smoke", None, {"eps": parse_value("1e-8")})
    assert cfg.hparams["eps"] == 1e-8


def test_presets_are_listed_and_seeded():
    assert {"smoke", "cifar10", "homework"} <= set(available_presets())
    assert preset_seeds("smoke") == [0]
    assert load_preset("homework")["dataset"] == "cifar100"
    assert preset_seeds("homework") == [0, 1, 2]  # one seed's accuracy verdict is only indicative


# --- errors ----------------------------------------------------------------------------------------


def test_unknown_optimizer_is_a_config_error_naming_the_choices():
    with pytest.raises(ConfigError, match="unknown optimizer 'sgd'.*adamw, lion, sophia, schedulefree"):
        resolve_config("sgd")


def test_unknown_preset_is_a_config_error_naming_the_choices():
    with pytest.raises(ConfigError, match="unknown preset 'nope'.*smoke"):
        resolve_config("adamw", "nope")


@pytest.mark.parametrize("lr", [0, 0.0, -1e-3, float("nan"), float("inf"), True, "fast", None])
def test_bad_learning_rate_is_rejected(lr):
    with pytest.raises(ConfigError, match="learning rate for adamw must be a positive number"):
        resolve_config("adamw", "smoke", None, {"lr": lr})


@settings(max_examples=30, deadline=None)
@given(st.floats(max_value=0.0, allow_nan=False) | st.just(float("nan")) | st.just(float("inf")))
def test_no_non_positive_or_non_finite_lr_gets_through(lr):
    with pytest.raises(ConfigError):
        resolve_config("lion", "smoke", None, {"lr": lr})


@pytest.mark.parametrize("hp,match", [
    ({"weight_decay": -0.1}, "weight decay"),
    ({"betas": [0.9]}, "betas"),
    ({"betas": [0.9, 1.0]}, "betas"),
    ({"betas": 0.9}, "betas"),
    ({"eps": 0}, "eps"),
    ({"unknown_knob": 1}, "has no hyperparameter 'unknown_knob'"),
])
def test_bad_hyperparameters_are_rejected(hp, match):
    with pytest.raises(ConfigError, match=match):
        resolve_config("adamw", "smoke", None, hp)


def test_bad_sophia_specific_hyperparameters_are_rejected():
    with pytest.raises(ConfigError, match="p for sophia"):
        resolve_config("sophia", "smoke", None, {"p": -0.01})
    with pytest.raises(ConfigError, match="update_period"):
        resolve_config("sophia", "smoke", None, {"update_period": 0})


def test_unknown_hyperparameter_message_does_not_offer_title():
    with pytest.raises(ConfigError) as info:
        resolve_config("adamw", "smoke", None, {"foo": 1})
    assert "title" not in str(info.value)


@pytest.mark.parametrize("overrides,match", [
    ({"epochs": 0}, "epochs must be between 1 and"),
    ({"batch_size": 1.5}, "batch_size must be a whole number"),
    ({"batch_size": True}, "batch_size must be a whole number"),
    ({"seed": -1}, "seed must be between 0 and"),
    ({"subset": 0}, "subset must be between 1 and"),
    ({"depth": 0}, "depth must be between 1 and"),
    ({"seed": 2**40}, "seed must be between 0 and 2147483647"),
    ({"dataset": "imagenet"}, "unknown dataset 'imagenet'"),
    ({"device": "tpu"}, "unknown device 'tpu'"),
    ({"precision": "fp8"}, "unknown precision 'fp8'"),
    ({"augment": "yes"}, "augment must be true or false"),
    ({"results_dir": ""}, "results_dir must be a non-empty text"),
    ({"learning_rate": 0.1}, "unknown setting"),
])
def test_bad_settings_are_rejected(overrides, match):
    with pytest.raises(ConfigError, match=match):
        resolve_config("adamw", "smoke", overrides)


def test_identity_excludes_location_and_verbosity_only():
    cfg = resolve_config("adamw", "smoke")
    identity = cfg.identity
    # The validation split joins the identity only when there is one: runs scored on the test split keep
    # the hashes they had before the field existed.
    assert set(identity) == {f.name for f in dataclasses.fields(RunConfig)} - {
        "data_dir", "download", "results_dir", "log_every", "preset", "validation_fraction", "validation_seed"}
    trial = resolve_config("adamw", "smoke", {"validation_fraction": 0.1})
    assert trial.identity["validation_fraction"] == 0.1 and trial.identity["validation_seed"] == 0
    assert trial.config_hash != cfg.config_hash
    assert resolve_config("adamw", "smoke", {"validation_fraction": 0.1, "validation_seed": 1}).config_hash \
        != trial.config_hash
    with pytest.raises(ConfigError, match="validation fraction must be a number in"):
        resolve_config("adamw", "smoke", {"validation_fraction": 0.9})
    assert math.isclose(identity["hparams"]["lr"], 1e-3)


def test_thread_count_is_part_of_the_identity_and_resolved_before_hashing():
    from optbench.experiment import resolve_runtime
    import torch

    one = resolve_config("adamw", "smoke", {"threads": 1, "device": "cpu"})
    two = resolve_config("adamw", "smoke", {"threads": 2, "device": "cpu"})
    assert one.identity["threads"] == 1 and two.identity["threads"] == 2
    assert one.config_hash != two.config_hash  # 1 vs 2 threads give different numbers: never reused as equal
    unresolved = resolve_config("adamw", "smoke", {"device": "cpu"})
    assert unresolved.threads is None
    assert resolve_runtime(unresolved).threads == torch.get_num_threads()
    with pytest.raises(ConfigError, match="threads must be between 1"):
        resolve_config("adamw", "smoke", {"threads": 0})


def test_a_record_from_before_the_thread_count_still_loads(tmp_path):
    import json

    from test_analysis import make_record  # a record as `run` writes it, with no thread count in its config

    from optbench.config import identity_hash, identity_of
    from optbench.records import finished_runs, load_records, record_filename

    record = make_record("adamw")
    assert "threads" not in record["config"]
    record["config_hash"] = identity_hash(identity_of(record["config"]))  # made from its config, as then
    (tmp_path / record_filename(record)).write_text(json.dumps(record))
    loaded = load_records(tmp_path)
    assert loaded.problems == [] and loaded.records[0]["config"].get("threads") is None
    assert record["config_hash"] in finished_runs(tmp_path)
