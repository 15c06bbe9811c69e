"""Where optbench's settings files live and how they are read. A leaf: it imports only `errors`.

Settings ship inside the package (`optbench/configs/`: presets, one YAML per optimizer, the toy's
learning rates), so a non-editable install finds them from any directory. A user override folder,
named by the environment variable `OPTBENCH_CONFIG_DIR`, is searched first, file by file, with the same
layout (`presets/NAME.yaml`, `optimizers/NAME.yaml`, `toy.yaml`): a lab adds a preset or changes one
optimizer's defaults there without copying the rest.

Files are read once per process (`functools.lru_cache`); callers get a fresh copy each time, so
mutating what they get never changes what the next caller reads.
"""

from __future__ import annotations

import copy
import functools
import os
from pathlib import Path
from typing import Any

import yaml

from optbench.errors import ConfigError

PACKAGE_CONFIG_DIR = Path(__file__).resolve().parent / "configs"
OVERRIDE_ENV = "OPTBENCH_CONFIG_DIR"


def config_dirs() -> list[Path]:
    """The folders searched for a settings file, first match wins: the user's override, then the package's."""
    override = os.environ.get(OVERRIDE_ENV)
    return ([Path(override)] if override else []) + [PACKAGE_CONFIG_DIR]


def find_settings_file(relative: str) -> Path | None:
    for folder in config_dirs():
        path = folder / relative
        if path.is_file():
            return path
    return None


@functools.lru_cache(maxsize=None)
def _read_cached(path: str, mtime_ns: int) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text: save it as UTF-8 or restore it") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML ({exc.__class__.__name__}); fix or restore it") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path} ({exc.strerror or exc}); fix its permissions or restore it") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of settings")
    return data


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping from `path` (a copy), or a ConfigError naming the file and what to do."""
    try:
        mtime = path.stat().st_mtime_ns  # an edited file is read again
    except OSError as exc:
        raise ConfigError(f"cannot read {path} ({exc.strerror or exc})") from None
    return copy.deepcopy(_read_cached(str(path), mtime))


def available_presets() -> list[str]:
    return sorted({p.stem for folder in config_dirs() for p in (folder / "presets").glob("*.yaml")})


def load_preset(name: str) -> dict[str, Any]:
    path = find_settings_file(f"presets/{name}.yaml") if name and "/" not in name else None
    if path is None:
        raise ConfigError(f"unknown preset '{name}': choose one of {', '.join(available_presets())}")
    return read_yaml(path)


def optimizer_file(name: str) -> dict[str, Any]:
    """Everything `optimizers/NAME.yaml` holds: hyperparameter defaults and its `search_space`."""
    path = find_settings_file(f"optimizers/{name}.yaml")
    if path is None:
        raise ConfigError(f"no settings for optimizer '{name}': optimizers/{name}.yaml is missing in "
                          f"{' or '.join(str(d) for d in config_dirs())}")
    return read_yaml(path)


def toy_file() -> dict[str, Any]:
    path = find_settings_file("toy.yaml")
    return read_yaml(path) if path is not None else {}
