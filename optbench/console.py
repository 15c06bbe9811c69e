"""Console output for training: a rich progress bar, warnings, and the end-of-run summary."""

from __future__ import annotations

import time
from typing import Any, Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from optbench.models import model_label
from optbench.optimizers import title_of

console = Console(stderr=True, highlight=False)


def mib(value: int | float | None) -> str:
    return "-" if value is None else f"{value / 2**20:,.1f} MiB"


def duration_text(seconds: float) -> str:
    """45s, 3m05s, 2h07m: an ETA needs no more precision than that."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class RunEta:
    """Time left in a run from its own measured pace: wall-time per step between the first log point this
    process saw and the latest one (so the first interval's warm-up, lazy optimizer state and compilation
    are left out, and evaluation is in once an epoch has ended), times the steps still planned."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.total_steps = 0
        self._first: tuple[int, float] | None = None  # (steps done, time) at the first log point
        self._last: tuple[int, float] | None = None

    def plan(self, epochs: int, steps_per_epoch: int) -> None:
        self.total_steps = epochs * steps_per_epoch

    def mark(self, steps_done: int) -> None:
        point = (steps_done, self.clock())
        if self._first is None:
            self._first = point
        self._last = point

    def seconds_left(self) -> float | None:
        if self._first is None or self._last is None or self._last[0] <= self._first[0]:
            return None  # one log point measures no pace yet
        per_step = (self._last[1] - self._first[1]) / (self._last[0] - self._first[0])
        return per_step * max(0, self.total_steps - self._last[0])

    def text(self) -> str:
        left = self.seconds_left()
        return "" if left is None else f"ETA {duration_text(left)}"


class RichReporter:
    """Live progress for one run: epoch bar with steps, running loss, throughput and the run's ETA."""

    def __init__(self, label: str, quiet: bool = False, clock: Callable[[], float] = time.perf_counter):
        self.label, self.quiet = label, quiet
        self._progress: Progress | None = None
        self._task = None
        self._eta = RunEta(clock)
        self._epoch, self._steps_per_epoch = 1, 0

    def __enter__(self) -> "RichReporter":
        if not self.quiet:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]}"), TimeElapsedColumn(),
                TextColumn("{task.fields[eta]}"),
                console=console, transient=True,
            )
            self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def phase(self, text: str) -> None:
        if not self.quiet:
            console.print(f"[dim]{self.label}: {text}[/dim]", soft_wrap=True)

    def warn(self, text: str) -> None:
        console.print(f"[yellow]warning:[/yellow] {text}", soft_wrap=True)  # shown even with --quiet

    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None:
        self._epoch, self._steps_per_epoch = epoch, steps
        self._eta.plan(epochs, steps)
        if self._progress is None:
            return
        if self._task is not None:
            self._progress.remove_task(self._task)
        self._task = self._progress.add_task(f"{self.label} epoch {epoch}/{epochs}", total=steps, loss="-",
                                             speed="", eta=self._eta.text())

    def progress(self, steps_done_in_epoch: int, loss: float, images_per_s: float) -> None:
        self._eta.mark((self._epoch - 1) * self._steps_per_epoch + steps_done_in_epoch)
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=steps_done_in_epoch, loss=f"{loss:.4f}",
                                  speed=f"{images_per_s:,.0f} img/s", eta=self._eta.text())

    def log_point(self, step: int, values: dict[str, Any]) -> None:
        """Loss, lr, throughput and diagnostics at a log point: for trackers; the bar shows progress()."""

    def epoch_end(self, row: dict[str, Any]) -> None:
        self._eta.mark(row["epoch"] * self._steps_per_epoch)  # the evaluation just done counts in the pace
        if not self.quiet:
            left = self._eta.seconds_left()
            eta = f"  ETA {duration_text(left)} for this run" if left else ""
            console.print(f"{self.label} epoch {row['epoch']}: train loss {row['train_loss']:.4f}  "
                          f"test loss {row['test_loss']:.4f}  test acc {row['test_acc']:.2%}  "
                          f"train time {row['train_time_s']:.1f}s{eta}", soft_wrap=True)


def run_summary(record: dict[str, Any], path: Any) -> str:
    acc = record["final_test_acc"]
    lines = [
        f"{title_of(record['optimizer'])}: status {record['status']}"
        + (f" ({record['status_detail']})" if record["status_detail"] else ""),
        *([f"  model {model_label(record['model'])}"] if isinstance(record.get("model"), dict) else []),
        f"  final test accuracy {acc:.2%}" if acc is not None else "  final test accuracy: none (run did not finish)",
        f"  training wall-time {record['train_wall_time_s']:.1f}s (evaluation {record.get('eval_wall_time_s') or 0:.1f}s, "
        f"total {record['total_wall_time_s']:.1f}s), {record['steps']} steps, "
        f"{(record.get('throughput_images_per_s') or 0):,.0f} images/s",
        f"  peak memory {mib(record['peak_memory_bytes'])} ({record['peak_memory_source']})",
        f"  optimizer state {mib(record['optimizer_state_bytes'])}"
        + (f" for {record['param_count']:,} parameters" if record.get("param_count") is not None else ""),
    ]
    timing = record.get("timing") if isinstance(record.get("timing"), dict) else {}
    if timing.get("cpu_per_wall") is not None:
        lines.append(f"  timing: process CPU {timing['train_cpu_time_s']:.1f}s over {record['train_wall_time_s']:.1f}s "
                     f"of training ({timing['cpu_per_wall']:.2f} cores), calibration {1e3 * timing['calibration_before_s']:.1f}"
                     f" ms before / {1e3 * timing['calibration_after_s']:.1f} ms after"
                     + (": DISTURBED, the times do not stand (see the warning)" if timing.get("disturbed") else
                        ": undisturbed"))
    if record.get("compile_warmup_s") is not None:
        lines.append(f"  compilation (untimed warm-up, not in the training time): {record['compile_warmup_s']:.1f}s")
    if record.get("hessian_updates") is not None:
        lines.append(f"  Hessian estimates: {record['hessian_updates']} in {record['steps']} steps")
    lines.append(f"  record: {path}" + (" (this run had finished already: reusing its record, nothing trained)"
                                        if record.get("_reused") else ""))
    return "\n".join(lines)


def show_report(report: Any) -> None:
    """Print a comparison report (optbench.report.Report) to stdout."""
    from rich.console import Console

    from optbench.render import environment_line, rich_table, ttt_display, verdict_text

    out = Console(highlight=False)
    if not out.is_terminal:  # logs and pipes: wide enough that the table never folds
        out = Console(highlight=False, width=170)
    out.print(rich_table(report.display, report.title))
    for source in report.sources:
        out.print(f"[dim]peak memory source: {source}[/dim]")
    details = getattr(report, "details", None)
    if details is not None and not details.empty:
        out.print(f"[dim]{environment_line(details)}[/dim]", soft_wrap=True)
    for note in getattr(report, "timing", []):
        color = "red" if "disturbed" in note else "dim"
        out.print(f"[{color}]timing: {note}[/{color}]", soft_wrap=True)
    for note in getattr(report, "state_notes", []):
        out.print(f"[dim]optimizer state: {note}[/dim]", soft_wrap=True)
    for warning in getattr(report, "warnings", []):
        out.print(f"[yellow]course's common mistake:[/yellow] {warning}", soft_wrap=True)
    out.print()
    for verdict in report.verdicts:
        lines = verdict_text(verdict)
        color = {True: "green", False: "red", None: "yellow"}[verdict.passed]
        out.print(f"[{color}]{lines[0]}[/{color}]", soft_wrap=True)
        for line in lines[1:]:
            out.print(line, soft_wrap=True)
    if getattr(report, "disagreement", None):
        out.print(f"[bold]{report.disagreement}[/bold]", soft_wrap=True)
    if not report.time_to_target.empty:
        out.print()
        out.print(rich_table(ttt_display(report.time_to_target), "Time to AdamW's final accuracy"))
    if report.notes:
        out.print()
        out.print("[bold]Notes (missing or failed runs, skipped files, implementations):[/bold]")
        for note in report.notes:
            out.print(f"  - {note}", soft_wrap=True)
    if report.files:
        out.print()
        out.print("written: " + ", ".join(str(p) for p in report.files), soft_wrap=True)


def show_tuning(report: Any) -> None:
    """Print a tuning report (optbench.tune_report.TuningReport): the tuned comparison, then what tuning did."""
    from rich.console import Console

    from optbench.render import rich_table, verdict_text

    out = Console(highlight=False)
    if not out.is_terminal:
        out = Console(highlight=False, width=170)
    if report.tuned is not None:
        show_report(report.tuned)
        out.print()
    for line in report.protocol:
        out.print(f"[dim]{line}[/dim]", soft_wrap=True)
    out.print(rich_table(report.display, "What tuning did (val: validation accuracy of the trials; test: test accuracy over the final seeds; "
                              "epochs, device-s: compute the trials spent)"))
    for warning in report.warnings:
        out.print(f"[yellow]warning:[/yellow] {warning}", soft_wrap=True)
    if report.defaults is not None:
        out.print("With the defaults (same final seeds):")
        for verdict in report.defaults.verdicts:
            out.print("  " + verdict_text(verdict)[0], soft_wrap=True)
    if report.change:
        out.print(f"[bold]{report.change}[/bold]", soft_wrap=True)
    own = [p for p in report.files if report.tuned is None or p not in report.tuned.files]
    if own:
        out.print("written: " + ", ".join(str(p) for p in own), soft_wrap=True)
