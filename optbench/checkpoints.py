"""Checkpoints (to resume a killed run) and run locks (so two processes never run the same run).

A run's checkpoint lives at `RESULTS/checkpoints/<config hash>.pt` and holds what it needs to continue
exactly: model, optimizer (Schedule-Free in eval mode, as its authors require), scheduler, progress
counters and history, the torch RNG states (Sophia's Hutchinson probes draw from them) and the position
in the epoch (the batch order itself is a pure function of seed and epoch). Written to a temporary
file and renamed; loaded with `weights_only=True`.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
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
    except OSError as exc:
        raise CheckpointError(f"could not write checkpoint {path} ({exc.strerror or exc}): free disk space or "
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


def capture_rng() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class RunLock:
    """An exclusive claim on one run (one config hash) in a results directory, by process id."""

    path: Path

    def release(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def acquire_run_lock(results_dir: str | Path, config_hash: str) -> RunLock | None:
    """Claim the run, or return None if a live process holds it. A dead holder's lock is taken over."""
    path = Path(results_dir) / "checkpoints" / f"{config_hash}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = int(path.read_text().strip() or "0")
            except (OSError, ValueError):
                holder = 0
            if holder and holder != os.getpid() and _alive(holder):
                return None
            path.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(str(os.getpid()))
        return RunLock(path)
    return None
