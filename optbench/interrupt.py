"""Ctrl-C and SIGTERM: the first asks training to stop after the current step (it then saves a
checkpoint and writes the record); a second one interrupts at once.

Under submitit (a SLURM array task), its preemption/time-limit signal (USR2) is a stop signal too while
a run trains (`defer_to_previous`): the run stops and saves like on SIGTERM, and only then does the
worker hand the signal to submitit's own handler (`deferred_handler`), which requeues the task. Had
submitit's handler run first, it would have exited mid-step with no checkpoint."""

from __future__ import annotations

import signal
import threading
from typing import Any, Callable

_DEFERRED: dict[int, Any] = {}  # signal -> the handler to call once the run has stopped and saved
last_stop_signal: int | None = None  # the signal that stopped the latest run


def defer_to_previous(sig: int) -> None:
    """Make `sig` a stop signal for runs; its current handler is called after the run has saved."""
    _DEFERRED[sig] = signal.getsignal(sig)


def deferred_handler() -> Callable[[int, Any], None] | None:
    """The deferred handler of the signal that stopped the latest run, if that signal was deferred."""
    handler = _DEFERRED.get(last_stop_signal) if last_stop_signal is not None else None
    return handler if callable(handler) else None


class StopOnSignal:
    """Context manager that turns SIGINT/SIGTERM into a polled flag (main thread only)."""

    def __init__(self, notify: Callable[[str], None] = lambda text: None):
        self.requested = False
        self._notify = notify
        self._previous: dict[int, object] = {}

    def __call__(self) -> bool:
        return self.requested

    def _handle(self, signum: int, frame) -> None:
        global last_stop_signal
        last_stop_signal = signum
        if self.requested:
            raise KeyboardInterrupt  # second signal: stop now, without a checkpoint
        self.requested = True
        self._notify(f"{signal.Signals(signum).name}: stopping after this step and saving a checkpoint, or before "
                     "training if it has not started (send it again to stop at once)")

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM, *_DEFERRED):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _terminate_as_interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt


def sigterm_as_ctrl_c() -> None:
    """From here on SIGTERM does what Ctrl-C does (KeyboardInterrupt, exit 130) wherever no StopOnSignal
    is active, e.g. while the CLI imports torch: the process never ends by the signal's default action."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate_as_interrupt)
