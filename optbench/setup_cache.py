"""Set-up measurements measured once and reused: the memory probe's breakdown and the FLOP count.

A run's memory probe (MemTracker replaying steps on a copy) and its FLOP count depend on the workload
and the optimizer, never on the seed or the learning rate, yet they cost seconds per run: `compare`
would pay them for every seed and `tune` for every trial. They are stored in RESULTS/cache/ as one
JSON file per key and served to every later run with the same key.

The key (a SHA-256 of a JSON document, so every part shows in the file) is deliberately wide: a
stale breakdown is worse than a second probe. The probe key is the run's identity (`RunConfig.identity`)
minus what cannot change a step's bytes:
- `seed`, `epochs`, `warmup_steps` (they move numbers and the schedule, not tensor sizes), `test_subset`,
  `eval_batch_size` (the probe replays training steps only), `compile` (the probe runs the eager copy);
- of the hyperparameters only `lr` and `weight_decay` (scalars applied in place by all four optimizers).
Every other hyperparameter stays in: betas, Sophia's `p`, `update_period` (with 1 the probe's "plain"
step is a Hessian step), `hessian_batch`, AdamW's `implementation`, anything added later. Added to it:
the probe batch's shape and dtype, the device type, the versions of optbench, Python, torch and the
optimizer libraries, and PROBE_FORMAT (bump it when the probe's code changes what it measures).

The FLOP key is the model (name, patch, depth), the input's shape and the same versions.

Files are written atomically (temporary file + rename). A cache file that cannot be read or does not
hold what its key says is ignored with a warning and measured afresh; nothing here raises.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

from optbench.tempfiles import temp_name

CACHE_DIR = "cache"
PROBE_FORMAT = 1  # bump when memory_probe / training_flops_per_image change what they measure
# Hyperparameters that are scalars applied in place by every optimizer: they change no tensor's size.
_BYTE_NEUTRAL_HPARAMS = frozenset({"lr", "weight_decay"})
_BYTE_NEUTRAL_FIELDS = frozenset({"seed", "epochs", "warmup_steps", "test_subset", "eval_batch_size", "compile",
                                  "memory_probe"})


def _versions() -> dict[str, Any]:
    from optbench import __version__
    from optbench.optimizers import library_versions  # torch, timm and every registered optimizer's library

    return {"optbench": __version__, "python": sys.version.split()[0], **library_versions()}


def probe_key(identity: dict[str, Any], input_shape: tuple[int, ...], input_dtype: str) -> dict[str, Any]:
    """The document a memory probe is keyed by (see the module docstring for what is left out and why)."""
    workload = {k: v for k, v in identity.items() if k not in _BYTE_NEUTRAL_FIELDS}
    workload["hparams"] = {k: v for k, v in identity.get("hparams", {}).items() if k not in _BYTE_NEUTRAL_HPARAMS}
    return {"kind": "memory_probe", "format": PROBE_FORMAT, "workload": workload,
            "input_shape": list(input_shape), "input_dtype": input_dtype, "versions": _versions()}


def flops_key(model: str, patch_size: int | None, depth: int | None, num_classes: int,
              input_shape: tuple[int, ...]) -> dict[str, Any]:
    """The document a FLOP count is keyed by: the model as built and the shape it is counted on."""
    return {"kind": "training_flops_per_image", "format": PROBE_FORMAT, "model": model, "patch_size": patch_size,
            "depth": depth, "num_classes": num_classes, "input_shape": list(input_shape), "versions": _versions()}


def key_digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cache_path(results_dir: str | Path, key: dict[str, Any]) -> Path:
    return Path(results_dir) / CACHE_DIR / f"{key['kind']}-{key_digest(key)}.json"


def _read(path: Path, key: dict[str, Any], warn: Callable[[str], None]) -> Any:
    if not path.exists():
        return None
    try:
        document = json.loads(path.read_text())
        if not isinstance(document, dict) or "value" not in document:
            raise ValueError("no value")
        if json.dumps(document.get("key"), sort_keys=True, default=str) != json.dumps(key, sort_keys=True, default=str):
            raise ValueError("its key differs from the one its name stands for")
        return document["value"]
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        warn(f"ignoring the unusable cache file {path} ({exc.__class__.__name__}: {exc}); measuring afresh")
        return None


def _write(path: Path, key: dict[str, Any], value: Any, warn: Callable[[str], None]) -> None:
    """Atomic: readers see the old file, no file, or the whole new one. A failure only costs the reuse."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / temp_name(".json")  # names its writer: a killed one's is removed at the next start
        try:
            with open(tmp, "x") as handle:
                json.dump({"key": key, "value": value}, handle, indent=1)  # value in its own key order
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as exc:
        warn(f"could not store {path} for reuse ({exc.strerror or exc}); later runs will measure again")


def cached(results_dir: str | Path, key: dict[str, Any], measure: Callable[[], Any],
           warn: Callable[[str], None]) -> tuple[Any, str | None]:
    """(value, path it was reused from or None): the stored value for `key`, else `measure()` stored.

    Values must survive JSON unchanged (dicts of str/int/float/None), so a reused value equals a fresh one.
    """
    path = cache_path(results_dir, key)
    value = _read(path, key, warn)
    if value is not None:
        return value, str(path)
    value = measure()
    if value is not None:
        _write(path, key, value, warn)
    return value, None
