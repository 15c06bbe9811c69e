"""Rendering of analysis results: rich tables for the terminal, Markdown and CSV files."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd
from rich.table import Table

from optbench.analysis import Verdict
from optbench.optimizers import BASELINE, title_of


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _pct(v: Any, spread: Any = None) -> str:
    if _missing(v):
        return "-"
    return f"{100 * v:.2f}%" + ("" if _missing(spread) else f" ± {100 * spread:.2f}")


def _signed_pp(v: Any) -> str:
    return "-" if _missing(v) else f"{100 * v:+.2f} pp"


def _seconds(v: Any, spread: Any = None) -> str:
    if _missing(v):
        return "-"
    return f"{v:,.1f} s" + ("" if _missing(spread) else f" ± {spread:,.1f}")


def _ratio(v: Any) -> str:
    return "-" if _missing(v) else f"{v:.2f}x"


def _saving(v: Any) -> str:
    return "-" if _missing(v) else f"{100 * v:+.1f}%"


def _mib(v: Any) -> str:
    return "-" if _missing(v) else f"{v / 2**20:,.1f} MiB"


DISTURBED = "DISTURBED"  # beside a time figure whose run's timing was disturbed (optbench/timing.py)


def _disturbed(r: Any) -> str:
    n = r.get("timing_disturbed")
    return "" if _missing(n) or not n else f" {DISTURBED}" + ("" if n == r.get("ok") else f" {int(n)}/{r.get('ok')}")


def display_table(df: pd.DataFrame) -> pd.DataFrame:
    """The summary table as text, column names included: one shape for the terminal and Markdown.
    A time figure from a run whose timing was disturbed carries DISTURBED (with how many of the
    optimizer's runs, when not all); a ratio to AdamW carries it when either side's was."""
    base = df[df.optimizer == BASELINE]
    base_mark = _disturbed(base.iloc[0]) if len(base) else ""
    rows = []
    for _, r in df.iterrows():
        mark = _disturbed(r)
        rows.append({
            "optimizer": title_of(r.optimizer),
            "runs ok/div/fail": f"{r.ok}/{r.diverged}/{r.failed}",
            "test acc": _pct(r.acc_mean, r.acc_std),
            "vs AdamW": _signed_pp(r.acc_diff),
            "train time": _seconds(r.time_mean, r.time_std) + mark,
            "time x AdamW": _ratio(r.time_ratio) + (f" {DISTURBED}" if (mark or base_mark)
                                                    and not _missing(r.time_ratio) else ""),
            "peak memory": _mib(r.peak_mean),
            "peak saving": _saving(r.peak_saving),
            "peak incl. data": _mib(r.get("peak_with_data_mean")),
            "optimizer state": _mib(r.state_bytes),
            "state saving": _saving(r.state_saving),
            "images/s": ("-" if _missing(r.throughput) else f"{r.throughput:,.0f}") + mark,
        })
    return pd.DataFrame(rows)


def ttt_display(ttt: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for _, r in ttt.iterrows():
        reached = r.reached > 0
        rows.append({
            "optimizer": title_of(r.optimizer),
            "target (AdamW final acc)": _pct(r.target_acc),
            "reached": f"{r.reached}/{r.runs}",
            "epoch": f"{r.epoch_mean:.1f}" if reached else "never",
            "training time": (_seconds(r.time_mean) + _disturbed({"timing_disturbed": r.get("timing_disturbed"),
                                                                  "ok": r.runs})) if reached else "never",
        })
    return pd.DataFrame(rows)


def rich_table(display: pd.DataFrame, title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for i, col in enumerate(display.columns):
        table.add_column(col, justify="left" if i == 0 else "right")
    for _, row in display.iterrows():
        table.add_row(*[str(v) for v in row])
    return table


def verdict_text(verdict: Verdict) -> list[str]:
    mark = {True: "PASS", False: "FAIL", None: "UNDECIDED"}[verdict.passed]
    if verdict.qualifier and verdict.passed is not None:
        mark += f", {verdict.qualifier}"
    return [f"[{mark}] {verdict.name}: {verdict.summary}"] + [f"    {d}" for d in verdict.details]


def _bullets(items: list[str]) -> list[str]:
    return [f"- {item}" for item in items]


def _verdict_bullets(verdict: Verdict, bold: bool = False) -> list[str]:
    """A verdict as a Markdown bullet (its PASS/FAIL line) with its reasons nested below."""
    head, *reasons = verdict_text(verdict)
    return [f"- **{head}**" if bold else f"- {head}"] + [f"  - {line.strip()}" for line in reasons]


def details_display(details: pd.DataFrame) -> pd.DataFrame:
    """What ran, per optimizer: hyperparameters, seeds, library and version, code path."""
    rows = []
    for _, r in details.iterrows():
        rows.append({"optimizer": title_of(r.optimizer), "hyperparameters": r.hparams, "seeds": r.seeds,
                     "library": f"{r.library} {r.library_version}", "code path": r.code_path})
    return pd.DataFrame(rows)


def environment_line(details: pd.DataFrame) -> str:
    """Device and versions, once (joined with '; ' where runs differ)."""
    if details.empty:
        return ""

    def one(col: str) -> str:
        return "; ".join(sorted({str(v) for v in details[col] if v and v != "-"})) or "-"

    return (f"Device: {one('device')} ({one('device_name')}), {one('precision')}, {one('cpu_threads')} CPU threads; "
            f"optbench {one('optbench')}, Python {one('python')}, torch {one('torch')}, timm {one('timm')}")


def markdown_report(title: str, display: pd.DataFrame, sources: list[str], ttt: pd.DataFrame,
                    verdicts: list[Verdict], notes: list[str], details: pd.DataFrame | None = None,
                    state_notes: list[str] | None = None, warnings: list[str] | None = None,
                    disagreement: str | None = None, timing: list[str] | None = None) -> str:
    parts = [f"# {title}", "", display.to_markdown(index=False), ""]
    if sources:
        parts += ["Peak memory source: " + "; ".join(sources), ""]
    if timing:
        parts += ["## Timing", "", *_bullets(timing), ""]
    if state_notes:
        parts += ["Optimizer state:", "", *_bullets(state_notes), ""]
    if warnings:
        parts += ["## The course's common mistakes in these runs", "", *_bullets(warnings), ""]
    parts += ["## Criteria", ""]
    for verdict in verdicts:
        parts += _verdict_bullets(verdict, bold=True)
    if disagreement:
        parts += ["", f"**{disagreement}**"]
    if not ttt.empty:
        parts += ["", "## Time to AdamW's final accuracy", "", ttt_display(ttt).to_markdown(index=False)]
    if details is not None and not details.empty:
        parts += ["", "## What ran", "", details_display(details).to_markdown(index=False), "",
                  environment_line(details)]
    if notes:
        parts += ["", "## Notes", "", *_bullets(notes)]
    return "\n".join(parts) + "\n"


def write_tables(out_dir: Path, stem: str, df: pd.DataFrame, markdown: str) -> list[Path]:
    """Write the raw numbers (CSV) and the rendered report (Markdown); returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.md"
    df.to_csv(csv_path, index=False)
    md_path.write_text(markdown)
    return [csv_path, md_path]


# --- tuning ----------------------------------------------------------------------------------------


def _params(params: dict[str, Any]) -> str:
    short = {"lr": "lr", "weight_decay": "wd"}
    return ", ".join(f"{short.get(k, k)} {v:.3g}" for k, v in params.items()) or "-"


def tuning_display(summaries: list[Any]) -> pd.DataFrame:
    """Per optimizer (optbench.tune_analysis.OptimizerTuning): defaults beside the chosen setting, on
    validation (trials) and test (final seeds), and the compute the trials spent."""
    rows = []
    for s in summaries:
        rows.append({
            "optimizer": title_of(s.optimizer),
            "trials": f"{s.trials_used}/{s.budget}",
            "defaults": _params(s.defaults),
            "chosen": _params(s.chosen) + (" (= defaults)" if s.chosen == s.defaults else ""),
            "val defaults": _pct(s.default_val),
            "val tuned": _pct(s.tuned_val),
            "test defaults": _pct(s.default_test),
            "test tuned": _pct(s.tuned_test),
            "tuning epochs": f"{s.compute['epochs']:,}",
            "device-s": _seconds(s.compute["device_seconds"]),
            "Hessian est.": f"{s.compute['hessian_updates']:,}" if s.compute["hessian_updates"] else "-",
        })
    return pd.DataFrame(rows)


def tuning_markdown(title: str, protocol: list[str], display: pd.DataFrame, warnings: list[str], change: str,
                    tuned: list[Verdict], defaults: list[Verdict], notes: list[str]) -> str:
    parts = [f"# {title}", "", *_bullets(protocol), "", display.to_markdown(index=False), ""]
    if warnings:
        parts += ["## Warnings", "", *_bullets(warnings), ""]
    parts += ["## Verdicts", "", f"**{change}**", "", "With the tuned settings (final seeds, test split):", ""]
    for verdict in tuned:
        parts += _verdict_bullets(verdict)
    parts += ["", "With the defaults (same seeds, test split):", ""]
    parts += _bullets([verdict_text(verdict)[0] for verdict in defaults])
    if notes:
        parts += ["", "## Notes", "", *_bullets(notes)]
    return "\n".join(parts) + "\n"


# --- `optbench memory` ------------------------------------------------------------------------------


def fmt_bytes(value: int | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 2**30:
        return f"{value / 2**30:,.2f} GiB"
    return f"{value / 2**20:,.1f} MiB"


def _saving_text(saving: float | None) -> str:
    """'-12.3%' when the optimizer needs 12.3% less than AdamW, '+4.0%' when more."""
    if saving is None:
        return "-"
    return "±0.0%" if abs(saving) < 5e-4 else f"{-saving:+.1%}"


_TABLE_ROWS: tuple[tuple[str, str], ...] = (
    ("Peak", "peak_bytes"), ("  reached in", "peak_phase"), ("Parameters", "params"), ("Gradients", "grads"),
    ("Optimizer state", "optimizer_state"), ("Activations", "activations"),
    ("Backward temporaries", "backward_temporaries"), ("step() temporaries", "step_temporaries"),
    ("Input batch", "inputs"),
)


def render_memory_report(report, console) -> None:
    """`optbench memory`'s report (a memory.MemoryReport): one column per optimizer (Sophia: plain and Hessian step), the batch sizes behind Lion's
    verdict, the verdict line and the notes. Byte columns share one unit, given in the title."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    spec = report.spec
    # GiB only when even the weights reach one: small parts must not round to 0.00.
    unit, scale = ("GiB", 2**30) if report.results[0].param_bytes >= 2**30 else ("MiB", 2**20)
    patches = f" / patch {spec.patch_size} ({spec.tokens} tokens)" if spec.patch_size else ""
    model = spec.model if spec.title in ("", spec.model) else f"{spec.title} ({spec.model})"
    table = Table(title=f"Training-step memory ({unit}): {model}, {spec.param_count:,} parameters, "
                        f"{spec.image_size}px{patches}, batch {spec.batch_size}, {spec.precision}",
                  caption=report.method_label, title_justify="left", caption_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("", no_wrap=True)
    columns = []
    for result in report.results:
        for step in result.steps:
            label = result.implementation.get("code_path", "") if len(result.steps) == 1 else f"{step.kind} step"
            table.add_column(f"{result.title.split(' (')[0]}\n{label}", justify="right")
            columns.append((result, step))
    digits = 2 if unit == "GiB" else 1
    rows = list(_TABLE_ROWS)
    if spec.method == "cuda":
        rows += [("Allocator excess", "unattributed"), ("Reserved (cache incl.)", "allocator_reserved_bytes")]
    for label, attribute in rows:
        cells = []
        for _, step in columns:
            value = getattr(step, attribute)
            cells.append(value if isinstance(value, str) else "-" if value is None else f"{value / scale:,.{digits}f}")
        table.add_row(label, *cells)
    for label, attribute in (("Peak vs AdamW", "saving_vs_adamw"), ("State vs AdamW", "state_saving_vs_adamw")):
        cells = []
        for result, step in columns:
            # A saving is about the optimizer's peak: for Sophia that is its Hessian step.
            sets_peak = step is max(result.steps, key=lambda s: s.peak_bytes)
            cells.append("baseline" if result.optimizer == BASELINE
                         else _saving_text(getattr(result, attribute)) if sets_peak else "")
        table.add_row(label, *cells, style="bold" if label.startswith("Peak") else None)
    console.print(table)

    verdict = report.verdict
    if verdict is not None:
        sweep = Table(title=f"Lion vs AdamW ({verdict.adamw_impl}) by batch size, {verdict.method}",
                      title_justify="left", box=box.SIMPLE_HEAD)
        for name in ("Batch", "AdamW peak", "Lion peak", "Lion vs AdamW"):
            sweep.add_column(name, justify="right")
        for point in verdict.points:
            sweep.add_row(str(point.batch_size), fmt_bytes(point.adamw_peak_bytes), fmt_bytes(point.lion_peak_bytes),
                          _saving_text(point.saving))
        console.print(sweep)
        console.print(f"[bold]{escape(verdict.message)}[/bold]", soft_wrap=True)
    for note in report.notes:
        console.print(f"[dim]{escape(note)}[/dim]", soft_wrap=True)
    console.print(f"[dim]Took {report.seconds:.1f}s. {', '.join(f'{k} {v}' for k, v in report.versions.items())}"
                  "[/dim]", soft_wrap=True)
