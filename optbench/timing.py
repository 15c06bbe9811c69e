"""Was a run's timing disturbed? The rule and its thresholds, on figures a record holds (no torch).

A run records, beside its training wall-time: the process CPU time over the same intervals, each
epoch's time, and a short fixed calibration kernel timed on its device just before and just after
training (a "reference system time" in the sense of Kaddour et al. 2023: the same work, timed on the
same machine, so a change in the machine's speed shows). Three signals, each with a threshold chosen
so that an idle machine stays well clear of it and a loaded one does not:

- CPU share (CPU device only): process CPU time / training wall-time. The main thread drives every
  step, so an undisturbed run gets about one full core or more (1.0 with one thread, up to the thread
  count with more); below MIN_CPU_PER_WALL the process waited for a core for over half the time.
  On CUDA the host thread may legitimately sleep while the GPU works, so this signal is not used there.
- Calibration: the kernel's time after training / before; outside [1/MAX_CALIBRATION_CHANGE,
  MAX_CALIBRATION_CHANGE] the machine's speed changed during the run. On a CPU the kernel's own CPU
  share (CPU time / wall) below MIN_CPU_PER_WALL at either end also counts: it is pure arithmetic.
- Epoch spread: the slowest epoch / the fastest, among epochs with the same number of steps (the first
  epoch left out when there are three or more: it pays one-time costs). Above MAX_EPOCH_SPREAD, and
  slower by at least MIN_EPOCH_EXCESS_S (tiny epochs jitter by fractions of a second), the epochs did
  not run at one speed.

The thresholds are loose on purpose (a factor of 2-3, where scheduling noise on a shared 2-core machine
is tens of percent): a flag means the time figures do not stand, not that they are a little noisy.
The record keeps the measured figures; the rule here is applied when the record is written and again
by every report, so a report always uses these thresholds.
"""

from __future__ import annotations

from typing import Any

MIN_CPU_PER_WALL = 0.5  # CPU device: less than half a core on average for the process -> disturbed
MAX_CALIBRATION_CHANGE = 2.0  # calibration kernel after / before training, either way
MAX_EPOCH_SPREAD = 3.0  # slowest / fastest epoch of equal steps
MIN_EPOCH_EXCESS_S = 0.5  # ... and slower by at least this much

ADVICE = ("run it again on an idle machine (nothing else running; on a shared machine, at a quiet time): for "
          "`optbench compare`, the same command with `--rerun`; compare times only between runs that are not flagged")
# What a disturbance does not touch, and what it does.
STANDS = "steps, memory and accuracy stand (they do not depend on timing)"
DOES_NOT_STAND = "training time, images/s, time x AdamW and time-to-target do not"


def epoch_times(history: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """(steps, seconds) of each epoch, from the history's cumulative `steps` and `train_time_s`."""
    out, steps_before, time_before = [], 0, 0.0
    for row in history or []:
        steps, seconds = row.get("steps"), row.get("train_time_s")
        if not isinstance(steps, (int, float)) or not isinstance(seconds, (int, float)):
            return out
        out.append((int(steps - steps_before), float(seconds - time_before)))
        steps_before, time_before = steps, seconds
    return out


def epoch_spread(history: list[dict[str, Any]]) -> tuple[float, float] | None:
    """(slowest / fastest, slowest - fastest in s) among the epochs with the most common step count,
    the first epoch left out when there are three or more; None with fewer than two such epochs."""
    epochs = epoch_times(history)
    if len(epochs) >= 3:
        epochs = epochs[1:]
    if not epochs:
        return None
    counts: dict[int, int] = {}
    for steps, _ in epochs:
        counts[steps] = counts.get(steps, 0) + 1
    common = max(counts, key=lambda k: counts[k])
    times = [t for steps, t in epochs if steps == common]
    if len(times) < 2 or min(times) <= 0:
        return None
    return max(times) / min(times), max(times) - min(times)


def assess(timing: dict[str, Any] | None, history: list[dict[str, Any]] | None, device: str) -> list[str]:
    """The reasons a run's timing is disturbed (empty: not disturbed), from its `timing` block and history."""
    if not isinstance(timing, dict):
        return []
    reasons = []
    cpu, wall = timing.get("train_cpu_time_s"), timing.get("train_wall_time_s")
    if device == "cpu" and isinstance(cpu, (int, float)) and isinstance(wall, (int, float)) and wall > 0:
        share = cpu / wall
        if share < MIN_CPU_PER_WALL:
            reasons.append(f"the process had {share:.2f} of a CPU core on average while training (an undisturbed "
                           f"run has about 1 or more; threshold {MIN_CPU_PER_WALL}): other processes took the CPU")
    before, after = timing.get("calibration_before_s"), timing.get("calibration_after_s")
    if isinstance(before, (int, float)) and isinstance(after, (int, float)) and before > 0 and after > 0:
        change = after / before
        if not 1 / MAX_CALIBRATION_CHANGE <= change <= MAX_CALIBRATION_CHANGE:
            reasons.append(f"the calibration kernel took {change:.2f}x as long after training as before (threshold "
                           f"{MAX_CALIBRATION_CHANGE:g}x either way): the machine's speed changed during the run")
    if device == "cpu":
        for when in ("before", "after"):
            share = timing.get(f"calibration_{when}_cpu_per_wall")
            if isinstance(share, (int, float)) and share < MIN_CPU_PER_WALL:
                reasons.append(f"the calibration kernel {when} training had {share:.2f} of a CPU core (threshold "
                               f"{MIN_CPU_PER_WALL}): the machine was busy")
    spread = epoch_spread(history or [])
    if spread is not None and spread[0] > MAX_EPOCH_SPREAD and spread[1] >= MIN_EPOCH_EXCESS_S:
        reasons.append(f"its epochs of equal steps took from 1x to {spread[0]:.1f}x the fastest one's time (threshold "
                       f"{MAX_EPOCH_SPREAD:g}x): the machine's speed changed during the run")
    return reasons


def record_disturbance(record: dict[str, Any]) -> list[str]:
    """`assess` on a record (its `timing` block, history and device)."""
    device = str((record.get("config") or {}).get("device", ""))
    return assess(record.get("timing"), record.get("history"), device)
