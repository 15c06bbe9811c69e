"""Checkpoints (to resume a killed run) and run locks (so two processes never run the same run).

A run's checkpoint lives at `RESULTS/checkpoints/<config hash>.pt` and holds what it needs to continue
exactly: model, optimizer (Schedule-Free in the mode training is in at that point: eval mode at an
epoch's end, after its evaluation; train mode after a stop mid-epoch, since an eval()/train() round trip
is not exact in floating point), scheduler, progress
counters and history, the torch RNG states (Sophia's Hutchinson probes draw from them) and the position
in the epoch (the batch order itself is a pure function of seed and epoch). Written to a temporary
file and renamed; loaded with `weights_only=True`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from optbench.errors import OptbenchError

CHECKPOINT_VERSION = 1


class CheckpointError(OptbenchError):
    """A checkpoint that cannot be used for this run."""


def checkpoint_path(results_dir: str | Path, config_hash: str) -> Path:
    return Path(results_dir) / "checkpoints" / f"{config_hash}.pt"


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".pt")
    os.close(fd)
    try:
        torch.save({"version": CHECKPOINT_VERSION, **payload}, tmp)
        os.replace(tmp, path)  # the same run's newer state replaces its older one, atomically
    except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as RuntimeError
        reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0]
        raise CheckpointError(f"could not write checkpoint {path} ({reason}): free disk space or "
                              "choose another --results-dir") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_checkpoint(path: Path, config_hash: str) -> dict[str, Any]:
    """Load a checkpoint for the run `config_hash`; refuses unreadable files and other runs' checkpoints."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated zip, a pickle that weights_only refuses, ...
        raise CheckpointError(f"checkpoint {path} cannot be loaded ({exc.__class__.__name__}): delete it to start "
                              "this run afresh") from None
    if not isinstance(payload, dict) or payload.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"checkpoint {path} is not an optbench checkpoint of version {CHECKPOINT_VERSION}: "
                              "delete it to start afresh")
    if payload.get("config_hash") != config_hash:
        raise CheckpointError(f"checkpoint {path} belongs to another config ({payload.get('config_hash')}, this run "
                              f"is {config_hash}): it was not used; delete it or run with that config")
    return payload


def capture_rng(device: torch.device) -> dict[str, Any]:
    """The RNG streams training draws from: the CPU one and, on CUDA, the training device's only (so a
    checkpoint resumes on a machine with another number of GPUs)."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


# The run locks live in runlock.py (no torch: `optbench status` reads them); imported here for callers.
from optbench.runlock import RunLock, acquire_run_lock, lock_is_stale, lock_path, read_lock  # noqa: E402,F401
