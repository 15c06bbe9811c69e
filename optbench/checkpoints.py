"""Checkpoints (to resume a killed run) and run locks (so two processes never run the same run).

A run's checkpoint lives at `RESULTS/checkpoints/<config hash>.pt` and holds what it needs to continue
exactly: model, optimizer (Schedule-Free in the mode training is in at that point: eval mode at an
epoch's end, after its evaluation; train mode after a stop mid-epoch, since an eval()/train() round trip
is not exact in floating point), scheduler, progress
counters and history, the torch RNG states (Sophia's Hutchinson probes draw from them) and the position
in the epoch (the batch order itself is a pure function of seed and epoch). It says what it claims to
be (optimizer, planned steps, the model's tensors by shape) and carries the SHA-256 of its payload; all
of that is checked against the run before any state is loaded. Written to a temporary file and renamed;
its payload loaded with `weights_only=True`.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
from pathlib import Path
from typing import Any

import torch

from optbench.checkpoint_header import LONGEST, READABLE_VERSIONS, header_line, parse_header
from optbench.errors import OptbenchError
from optbench.tempfiles import temp_name

# What a checkpoint's payload holds; `load_checkpoint` refuses one without all of them.
PAYLOAD_KEYS = ("config_hash", "optimizer_name", "model", "optimizer", "scheduler", "rng", "progress",
                "total_steps", "steps_per_epoch")


class CheckpointError(OptbenchError):
    """A checkpoint that cannot be used for this run."""


def checkpoint_path(results_dir: str | Path, config_hash: str) -> Path:
    return Path(results_dir) / "checkpoints" / f"{config_hash}.pt"


class _HashingWriter:
    """Where torch.save writes a checkpoint's payload: each chunk is hashed and written on to the file, so
    the payload is never held in memory whole nor read twice. The first OSError is kept: torch's zip
    writer reports a failed write as "unexpected pos ..." and drops the file system's reason."""

    def __init__(self, handle: Any):
        self.handle, self.sha256, self.error = handle, hashlib.sha256(), None

    def write(self, data: Any) -> int:
        self.sha256.update(data)
        try:
            return self.handle.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self.handle.flush()


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write `payload` after a one-line header (checkpoint_header.py): `optbench-checkpoint 3 <sha256>
    epoch=E/N step=S/T`, the progress taken from the payload.

    torch.save streams into the file through `_HashingWriter` (the header's place is kept and the line
    written once the digest is known), with no zip CRC-32: the SHA-256 covers every byte and is checked
    before torch.load sees any. A full disk is reported by the file system's own words, not by the zip
    writer's position check. (The payload is not wrapped in a second torch.save: pickling one 100 MB
    bytes object took 2 s where the whole write takes 0.2 s.) benchmarks/checkpoint_cost.py measures the
    parts of a save and this one against the one before (in memory, then hashed and written).
    """
    def header(digest: str) -> bytes:
        return header_line(digest, _reached(payload))

    tmp = path.parent / temp_name(".pt")
    crc = torch.serialization.get_crc32_options()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "xb") as handle:
            handle.write(header("0" * 64))  # the same length as the real line, written below
            writer = _HashingWriter(handle)
            torch.serialization.set_crc32_options(False)
            try:
                torch.save(payload, writer)
            except RuntimeError:
                if writer.error is None:
                    raise
            finally:
                torch.serialization.set_crc32_options(crc)
            if writer.error is not None:
                raise writer.error
            handle.seek(0)
            handle.write(header(writer.sha256.hexdigest()))
            handle.flush()
            # fsync before the rename, which replaces the previous epoch's checkpoint: without the data on
            # disk first, a machine crash (power, kernel, a lost cluster node) can leave the new name
            # holding nothing (XFS; ext4 mounted noauto_da_alloc) and the run's progress is gone, not just
            # its last epoch. A killed process needs no fsync (the page cache outlives it); a crashed node
            # does, and resuming after one is what checkpoints are for. It costs about a ninth of a save
            # here (benchmarks/checkpoint_cost.py: 10 ms of 90 for 65 MB on this machine's ext4).
            os.fsync(handle.fileno())
        os.replace(tmp, path)  # the same run's newer state replaces its older one, atomically
    except OSError as exc:
        raise CheckpointError(f"could not write checkpoint {path} ({exc.strerror or exc}): free disk space or "
                              "choose another --results-dir") from None
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def _reached(payload: dict[str, Any]) -> tuple[int, int, int, int] | None:
    """(epochs done, epochs, steps, total steps) from a run's payload, for the header; None if it has none."""
    progress, total, per_epoch = payload.get("progress"), payload.get("total_steps"), payload.get("steps_per_epoch")
    if not isinstance(progress, dict) or not all(type(v) is int for v in (
            progress.get("epochs_done"), progress.get("steps"), total, per_epoch)) or per_epoch <= 0:
        return None
    return progress["epochs_done"], total // per_epoch, progress["steps"], total


def checkpoint_refused(path: Path, what: str) -> CheckpointError:
    """The one message for a checkpoint that is not used: what is wrong with it, and what to do."""
    return CheckpointError(f"checkpoint {path} {what}: it was not used; delete it to start this run afresh")


def load_checkpoint(path: Path, config_hash: str) -> dict[str, Any]:
    """Load a checkpoint for the run `config_hash`: refuses unreadable files, payloads that do not match
    their digest, other runs' checkpoints and payloads missing a part. What the parts hold is checked
    against the run by `check_checkpoint`, before any of it is loaded into the model or optimizer."""
    def refuse(what: str) -> CheckpointError:
        return checkpoint_refused(path, what)

    try:
        with open(path, "rb") as handle:
            line = handle.readline(LONGEST)
            blob = handle.read()  # one read, no second copy of the payload
    except OSError as exc:
        raise refuse(f"cannot be read ({exc.strerror or exc})") from None
    header = parse_header(line.rstrip(b"\n")) if line.endswith(b"\n") else None
    if header is None:
        raise refuse(f"cannot be loaded (not an optbench checkpoint of version "
                     f"{' or '.join(map(str, READABLE_VERSIONS))})")
    if hashlib.sha256(blob).hexdigest().encode() != header.sha256:
        raise refuse("does not match its SHA-256 (changed or damaged after it was written)")
    try:
        payload = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle that weights_only refuses, ...
        raise refuse(f"cannot be loaded ({exc.__class__.__name__})") from None
    if not isinstance(payload, dict):
        raise refuse("holds no payload")
    if payload.get("config_hash") != config_hash:
        raise CheckpointError(f"checkpoint {path} belongs to another config ({payload.get('config_hash')}, this run "
                              f"is {config_hash}): it was not used; delete it or run with that config")
    missing = [k for k in PAYLOAD_KEYS if k not in payload]
    if missing:
        raise refuse(f"lacks {', '.join(missing)}")
    # The header is not under the digest: all four figures (status prints them) must be the payload's.
    said = (header.epochs_done, header.epochs, header.steps, header.total_steps)
    if header.epochs_done is not None and said != _reached(payload):
        raise refuse("says epoch %d of %d, step %d of %d in its header, not what its payload holds" % said)
    return payload


def _shapes(state: dict[str, Any]) -> dict[str, tuple]:
    return {k: (tuple(v.shape), str(v.dtype)) if isinstance(v, torch.Tensor) else None for k, v in state.items()}


def check_checkpoint(path: Path, payload: dict[str, Any], *, optimizer_name: str, model: torch.nn.Module,
                     optimizer: torch.optim.Optimizer, scheduler: Any, total_steps: int, steps_per_epoch: int,
                     epochs: int, progress_fields: tuple[str, ...], hparams: dict[str, Any]) -> None:
    """Refuse a checkpoint whose parts are not this run's: another optimizer, another model shape, an
    optimizer state laid out for another optimizer, or progress outside the planned run."""
    def refuse(what: str) -> CheckpointError:
        return checkpoint_refused(path, what)

    if payload["optimizer_name"] != optimizer_name:
        raise refuse(f"holds a {payload['optimizer_name']!r} run, this run is {optimizer_name!r}")
    saved_model = payload["model"]
    if not isinstance(saved_model, dict) or _shapes(saved_model) != _shapes(model.state_dict()):
        raise refuse("holds a model of another shape (depth, width, patch or classes differ)")
    saved_opt, fresh = payload["optimizer"], optimizer.state_dict()
    groups = saved_opt.get("param_groups") if isinstance(saved_opt, dict) else None
    if not isinstance(groups, list) or not isinstance(saved_opt.get("state"), dict) \
            or len(groups) != len(fresh["param_groups"]) \
            or any(not isinstance(g, dict) or not set(f) <= set(g) or len(g.get("params", ())) != len(f["params"])
                   for g, f in zip(groups, fresh["param_groups"])):  # some add keys as they step (SophiaH: step)
        raise refuse(f"holds an optimizer state that is not laid out as {optimizer_name}'s")
    # The hyperparameters the run sets (betas, weight decay, eps, ...) stay as built while it trains (the
    # schedule moves lr only): a state saved by another optimizer or setting holds other values.
    for g, f in zip(groups, fresh["param_groups"]):
        for key in set(hparams) & set(f) - {"lr", "params"}:
            if _plain(g[key]) != _plain(f[key]):
                raise refuse(f"holds {key}={g[key]!r} where this run's {optimizer_name} has {f[key]!r}")
    known = {i for f in fresh["param_groups"] for i in f["params"]}
    if not set(saved_opt["state"]) <= known:
        raise refuse("holds optimizer state for parameters this model does not have")
    if (payload["scheduler"] is None) != (scheduler is None) or \
            (scheduler is not None and set(payload["scheduler"]) != set(scheduler.state_dict())):
        raise refuse("holds a learning-rate schedule this run does not have (or lacks the one it has)")
    probe = payload.get("memory_probe")
    if probe is not None and not (isinstance(probe, dict) and type(probe.get("peak_bytes")) is int):
        raise refuse("holds a memory probe that is not one")
    estimates, wall = payload.get("hessian_estimates"), payload.get("wall_time_s", 0.0)
    if estimates is not None and (type(estimates) is not int or estimates < 0):
        raise refuse("holds a Hessian estimate count that is not a whole number >= 0")
    if not isinstance(wall, (int, float)) or not math.isfinite(wall) or wall < 0:
        raise refuse("holds a wall time that is not a finite number >= 0")
    rng = payload["rng"]
    if not isinstance(rng, dict) or not isinstance(rng.get("torch"), torch.Tensor):
        raise refuse("holds no random-number state")
    if payload["total_steps"] != total_steps or payload["steps_per_epoch"] != steps_per_epoch:
        raise refuse(f"was planned as {payload['total_steps']} steps of {payload['steps_per_epoch']} per epoch, "
                     f"this run is {total_steps} of {steps_per_epoch}")
    problem = _progress_problem(payload["progress"], steps_per_epoch, epochs, progress_fields)
    if problem:
        raise refuse(problem)


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return value


def _progress_problem(progress: Any, steps_per_epoch: int, epochs: int, fields: tuple[str, ...]) -> str | None:
    if not isinstance(progress, dict) or set(progress) != set(fields):
        return "holds progress with other fields than a run's"
    counts = ("steps", "images_seen", "hessian_steps", "epochs_done", "step_in_epoch")
    if any(type(progress[k]) is not int or progress[k] < 0 for k in counts):
        return "holds progress counters that are not whole numbers >= 0"
    if any(not isinstance(progress[k], (int, float)) or not math.isfinite(progress[k]) or progress[k] < 0
           for k in ("train_time_s", "eval_time_s")):
        return "holds progress times that are not finite numbers >= 0"
    done, within = progress["epochs_done"], progress["step_in_epoch"]
    if not (done < epochs and within < steps_per_epoch or done == epochs and within == 0):
        return (f"claims epoch {done} done and step {within} of the next, outside the planned "
                f"{epochs} epochs of {steps_per_epoch} steps")
    if progress["steps"] != done * steps_per_epoch + within:
        return f"claims {progress['steps']} steps, not the {done * steps_per_epoch + within} its epochs make"
    if progress["hessian_steps"] > progress["steps"]:
        return "claims more Hessian steps than steps"
    history = progress["history"]
    if not isinstance(history, list) or len(history) != done or any(
            not isinstance(row, dict) or row.get("epoch") != i for i, row in enumerate(history, 1)):
        return f"holds a history that is not epochs 1 to {done}"
    if not isinstance(progress["epoch_loss_sum"], (int, float)):
        return "holds a running loss that is not a number"
    return None


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
