"""Presets and command-line overrides resolved into one validated, frozen run config.

Every default lives in the settings files (presets and optimizer hyperparameters in `optbench/configs/`,
read by `settings.py`); this module only merges, checks and identifies. A config's identity
(`config_hash`) covers everything that can change the numbers a run produces, and nothing that cannot
(where results are written, where data is read from, console verbosity), so `compare` can recognise a
finished run and reuse it.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import yaml

from optbench.errors import ConfigError
from optbench.models import DEFAULT_MODEL, check_size_options, get_model
from optbench.optimizers import get_entry
from optbench.settings import load_preset

DATASETS = ("cifar10", "cifar100", "fashion_mnist", "digits", "synthetic")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
# Warmup is the course's 500 steps, capped at this share of the run so short runs still train.
WARMUP_MAX_FRACTION = 0.1


@dataclass(frozen=True)
class RunConfig:
    """Everything one training run needs. Build it with `resolve_config`, never by hand in code paths."""

    optimizer: str
    hparams: dict[str, Any]
    dataset: str = "cifar10"
    model: str = DEFAULT_MODEL  # a name of the model registry (optbench/models.py)
    patch_size: int | None = None  # None: chosen from the dataset's image size (ViTs only)
    depth: int | None = None  # None: the model's own depth (ViTs only)
    epochs: int = 50
    batch_size: int = 128
    eval_batch_size: int = 512
    seed: int = 0
    subset: int | None = None  # training images kept (class-balanced, fixed)
    test_subset: int | None = None
    augment: bool = True
    warmup_steps: int = 500
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    memory_probe: bool = True
    # torch intra-op CPU threads: they change the floating-point reduction order and so the numbers
    # (same config, 1 vs 2 threads: different weights), so they are part of the identity. None: the
    # process's count, fixed by resolve_runtime before the config is hashed.
    threads: int | None = None
    # > 0: train on the training split minus a fixed class-balanced validation split of this share
    # (drawn with validation_seed) and evaluate on it; the test split is then never read (tuning trials).
    validation_fraction: float = 0.0
    validation_seed: int = 0
    preset: str = "cifar10"
    # Not part of the identity: where things are, how chatty.
    data_dir: str = "data"
    download: bool = True
    results_dir: str = "results"
    log_every: int = 10

    @property
    def identity(self) -> dict[str, Any]:
        return identity_of(asdict(self))

    @property
    def config_hash(self) -> str:
        return identity_hash(self.identity)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def identity_of(values: dict[str, Any]) -> dict[str, Any]:
    """The fields of a config (a RunConfig's, or a record's `config` as written) that make its identity."""
    skip = {"data_dir", "download", "results_dir", "log_every", "preset"}
    if not values.get("validation_fraction"):  # scored on the test split, as before: the hash stays what it was
        skip |= {"validation_fraction", "validation_seed"}
    return {k: v for k, v in values.items() if k not in skip}


def identity_hash(identity: dict[str, Any]) -> str:
    blob = json.dumps(identity, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def margin_fraction(points: Any) -> float:
    """`--margin` (percentage points) as a fraction; the one check every command that takes it uses.
    NaN, infinite, negative or >= 100 points would make a criterion that cannot fail or cannot pass."""
    if isinstance(points, bool) or not isinstance(points, (int, float)) or not math.isfinite(points) \
            or not 0 <= points < 100:
        raise ConfigError(f"--margin must be a number in [0, 100) percentage points, got {points!r}")
    return points / 100


def resolved_warmup_steps(requested: int, total_steps: int) -> int:
    """The warmup a run actually uses: the requested steps, but at most 10% of the run."""
    return max(0, min(requested, math.ceil(WARMUP_MAX_FRACTION * total_steps)))


def parse_value(text: str) -> Any:
    """A command-line value as YAML would read it: 0.01 -> float, true -> bool, [0.9,0.99] -> list."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:  # YAML 1.1 reads 1e-4 (no dot) as text; a user means the number
            return float(value)
        except ValueError:
            return value
    return value


_INT_FIELDS = {"epochs": 1, "batch_size": 1, "eval_batch_size": 1, "seed": 0, "warmup_steps": 0, "log_every": 1,
               "validation_seed": 0}
_OPTIONAL_INT_FIELDS = {"subset": 1, "test_subset": 1, "patch_size": 1, "depth": 1, "threads": 1}


MAX_INT = 2**31 - 1  # seeds and sizes beyond this overflow torch's generators or make no sense


def _check_int(name: str, value: Any, minimum: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be a whole number, got {value!r}")
    if not minimum <= value <= MAX_INT:
        raise ConfigError(f"{name} must be between {minimum} and {MAX_INT}, got {value}")


def _check_hparams(optimizer: str, hp: dict[str, Any]) -> None:
    lr = hp.get("lr")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ConfigError(f"learning rate for {optimizer} must be a positive number, got {lr!r}")
    wd = hp.get("weight_decay", 0.0)
    if isinstance(wd, bool) or not isinstance(wd, (int, float)) or not math.isfinite(wd) or wd < 0:
        raise ConfigError(f"weight decay for {optimizer} must be a number >= 0, got {wd!r}")
    betas = hp.get("betas")
    if betas is not None:
        ok = isinstance(betas, (list, tuple)) and len(betas) in (2, 3) and all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas
        )
        if not ok:
            raise ConfigError(f"betas for {optimizer} must be two (or, for three-beta optimizers, three) numbers in [0, 1), e.g. [0.9,0.99]; got {betas!r}")
    for key in ("eps", "p"):
        if key in hp:
            v = hp[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ConfigError(f"{key} for {optimizer} must be a positive number, got {v!r}")
    if "update_period" in hp:
        _check_int("update_period", hp["update_period"], 1)


def resolve_config(
    optimizer: str,
    preset: str = "cifar10",
    overrides: dict[str, Any] | None = None,
    hparam_overrides: dict[str, Any] | None = None,
) -> RunConfig:
    """Preset + overrides + the optimizer's defaults -> a validated RunConfig (or a ConfigError)."""
    entry = get_entry(optimizer)  # raises ConfigError for unknown names
    settings = load_preset(preset)
    settings.pop("seeds", None)  # compare's business, not one run's
    settings.update({k: v for k, v in (overrides or {}).items() if v is not None})
    known = {f.name for f in fields(RunConfig)} - {"optimizer", "hparams", "preset"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)} in preset '{preset}' or options")

    hparams = dict(entry.defaults())
    for key, value in (hparam_overrides or {}).items():
        if key not in hparams and key not in entry.extra_hparams:
            reason = entry.refusal(key)
            if reason:
                raise ConfigError(f"{optimizer}: {reason}")
            allowed = sorted(set(hparams) | set(entry.extra_hparams))
            raise ConfigError(f"{optimizer} has no hyperparameter '{key}': choose from {', '.join(allowed)}")
        hparams[key] = value
    if isinstance(hparams.get("betas"), tuple):
        hparams["betas"] = list(hparams["betas"])
    _check_hparams(optimizer, hparams)
    for key, options in entry.choices.items():
        if key in hparams and hparams[key] not in options:
            raise ConfigError(f"{optimizer} {key} must be one of {', '.join(options)}; got {hparams[key]!r}")

    for name, minimum in _INT_FIELDS.items():
        if name in settings:
            _check_int(name, settings[name], minimum)
    for name, minimum in _OPTIONAL_INT_FIELDS.items():
        if name in settings:
            _check_int(name, settings[name], minimum, optional=True)
    if settings.get("dataset", "cifar10") not in DATASETS:
        raise ConfigError(f"unknown dataset '{settings['dataset']}': choose one of {', '.join(DATASETS)}")
    if settings.get("device", "auto") not in DEVICES:
        raise ConfigError(f"unknown device '{settings['device']}': choose one of {', '.join(DEVICES)}")
    if settings.get("precision", "auto") not in PRECISIONS:
        raise ConfigError(f"unknown precision '{settings['precision']}': choose one of {', '.join(PRECISIONS)}")
    fraction = settings.get("validation_fraction", 0.0)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 0.5:
        raise ConfigError(f"validation fraction must be a number in [0, 0.5] (e.g. 0.1), got {fraction!r}")
    for name in ("augment", "compile", "memory_probe", "download"):
        if name in settings and not isinstance(settings[name], bool):
            raise ConfigError(f"{name} must be true or false, got {settings[name]!r}")
    for name in ("model", "data_dir", "results_dir"):
        if name in settings and (not isinstance(settings[name], str) or not settings[name]):
            raise ConfigError(f"{name} must be a non-empty text, got {settings[name]!r}")
    model = get_model(settings.get("model", DEFAULT_MODEL))  # ConfigError naming the choices
    settings["model"] = model.name  # an alias is stored by its registry name
    asked = overrides or {}
    check_size_options(model.name, asked.get("patch_size"), asked.get("depth"))
    # A preset's ViT knobs (the smoke preset cuts depth to 4) mean nothing to a model without them.
    if not model.patched:
        settings["patch_size"] = None
    if not model.takes_depth:
        settings["depth"] = None
    return RunConfig(optimizer=optimizer, hparams=hparams, preset=preset, **settings)


def preset_seeds(preset: str) -> list[int]:
    seeds = load_preset(preset).get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and 0 <= s <= MAX_INT for s in seeds):
        raise ConfigError(f"preset '{preset}': seeds must be a list of whole numbers in [0, {MAX_INT}]")
    return seeds


def with_runtime(config: RunConfig, **changes: Any) -> RunConfig:
    """A copy with settings changed (e.g. the device resolved from 'auto')."""
    return replace(config, **changes)


__all__ = [
    "RunConfig",
    "identity_hash",
    "identity_of",
    "parse_value",
    "preset_seeds",
    "resolve_config",
    "resolved_warmup_steps",
    "with_runtime",
]
