"""Console output for training: a rich progress bar, warnings, and the end-of-run summary."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from optbench.models import model_label
from optbench.optimizers import title_of

console = Console(stderr=True, highlight=False)


def mib(value: int | float | None) -> str:
    return "-" if value is None else f"{value / 2**20:,.1f} MiB"


class RichReporter:
    """Live progress for one run: epoch bar with steps, running loss and throughput."""

    def __init__(self, label: str, quiet: bool = False):
        self.label, self.quiet = label, quiet
        self._progress: Progress | None = None
        self._task = None

    def __enter__(self) -> "RichReporter":
        if not self.quiet:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]}"), TimeElapsedColumn(),
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
        if self._progress is None:
            return
        if self._task is not None:
            self._progress.remove_task(self._task)
        self._task = self._progress.add_task(f"{self.label} epoch {epoch}/{epochs}", total=steps, loss="-",
                                             speed="")

    def progress(self, steps_done_in_epoch: int, loss: float, images_per_s: float) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=steps_done_in_epoch, loss=f"{loss:.4f}",
                                  speed=f"{images_per_s:,.0f} img/s")

    def log_point(self, step: int, values: dict[str, Any]) -> None:
        """Loss, lr, throughput and diagnostics at a log point: for trackers; the bar shows progress()."""

    def epoch_end(self, row: dict[str, Any]) -> None:
        if not self.quiet:
            console.print(f"{self.label} epoch {row['epoch']}: train loss {row['train_loss']:.4f}  "
                          f"test loss {row['test_loss']:.4f}  test acc {row['test_acc']:.2%}  "
                          f"train time {row['train_time_s']:.1f}s", soft_wrap=True)


def run_summary(record: dict[str, Any], path: Any) -> str:
    acc = record["final_test_acc"]
    lines = [
        f"{title_of(record['optimizer'])}: status {record['status']}"
        + (f" ({record['status_detail']})" if record["status_detail"] else ""),
        *([f"  model {model_label(record['model'])}"] if isinstance(record.get("model"), dict) else []),
        f"  final test accuracy {acc:.2%}" if acc is not None else "  final test accuracy: none (run did not finish)",
        f"  training wall-time {record['train_wall_time_s']:.1f}s (evaluation {record['eval_wall_time_s']:.1f}s, "
        f"total {record['total_wall_time_s']:.1f}s), {record['steps']} steps, "
        f"{(record['throughput_images_per_s'] or 0):,.0f} images/s",
        f"  peak memory {mib(record['peak_memory_bytes'])} ({record['peak_memory_source']})",
        f"  optimizer state {mib(record['optimizer_state_bytes'])} for {record['param_count']:,} parameters",
    ]
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
