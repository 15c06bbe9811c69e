"""A comparison report from run records alone: table, criteria, time-to-target, files and figures."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from optbench.analysis import (DEFAULT_MARGIN, DEFAULT_RULE, Verdict, accuracy_verdicts, course_warnings,
                               memory_criterion, strict_rule_text, strict_verdicts,
                               missing_runs, model_facts_of, run_details, select_workload, state_notes, summary_table,
                               time_to_target, timing_notes, update_size_notes, workload_id, workload_label)
from optbench.errors import RecordError
from optbench.render import display_table, markdown_report, write_tables


@dataclass
class Report:
    title: str
    workload_id: str
    table: pd.DataFrame  # raw numbers, one row per optimizer
    display: pd.DataFrame  # the same, formatted
    time_to_target: pd.DataFrame
    verdicts: list[Verdict]
    sources: list[str]
    notes: list[str]
    files: list[Path] = field(default_factory=list)
    details: pd.DataFrame = field(default_factory=pd.DataFrame)  # what ran: hyperparameters, seeds, versions
    state_notes: list[str] = field(default_factory=list)  # why each optimizer's state is its size (registry)
    warnings: list[str] = field(default_factory=list)  # the course's common mistakes these runs make
    disagreement: str | None = None  # where the course's literal rule and the statistics part ways
    margin: float = DEFAULT_MARGIN
    timing: list[str] = field(default_factory=list)  # disturbed timings, what stands, what to do

    @property
    def all_passed(self) -> bool:
        return all(v.passed is True for v in self.verdicts)

    def strict_passed(self, rule: str = DEFAULT_RULE) -> bool:
        """What --strict enforces under `rule` (literal, statistical or both): every selected verdict PASS."""
        return all(v.passed is True for v in strict_verdicts(self.verdicts, rule))

    def strict_text(self, rule: str = DEFAULT_RULE) -> str:
        failed = [v.name for v in strict_verdicts(self.verdicts, rule) if v.passed is not True]
        return (strict_rule_text(rule, self.margin) + ": "
                + ("all pass" if not failed else "not passed: " + "; ".join(failed)))


def build_report(records: list[dict[str, Any]], out_dir: Path | None, workload: str | None = None,
                 margin: float = DEFAULT_MARGIN, expected_optimizers: list[str] | None = None,
                 problems: list[str] | None = None, plots: bool = True, diagnostics: bool = False,
                 html: bool = False) -> Report:
    """Analyse one workload's records; with `out_dir`, also write CSV, Markdown and PNG files there.
    `diagnostics`: also each optimizer's update size per unit lr against the baseline's (a note) and a
    figure of the optimizer diagnostics recorded in the runs' history. `html`: also one self-contained
    HTML page of the report with the figures embedded (optbench/html_report.py)."""
    selection = select_workload(records, workload)
    wid = workload_id(selection.workload)
    title = f"optbench comparison: {workload_label(selection.workload, model_facts_of(selection.records))}"
    table = summary_table(selection.records)
    ttt = time_to_target(selection.records)
    literal, statistical, disagreement = accuracy_verdicts(selection.records, margin)
    verdicts = [memory_criterion(selection.records), literal, statistical]
    sources = sorted({str(s) for s in table.get("peak_source", pd.Series(dtype=object)).dropna()})
    notes = list(problems or []) + selection.notes + missing_runs(selection.records, expected_optimizers)
    notes.append(_implementations(selection.records))
    if diagnostics:
        notes += update_size_notes(selection.records) or ["no optimizer diagnostics in these records"]
    display = display_table(table)
    report = Report(title, wid, table, display, ttt, verdicts, sources, notes, details=run_details(selection.records),
                    state_notes=state_notes(selection.records), warnings=course_warnings(selection.records),
                    disagreement=disagreement, margin=margin, timing=timing_notes(selection.records))
    if out_dir is not None:
        try:
            _write_files(report, selection.records, out_dir, title, plots, diagnostics, html)
        except OSError as exc:
            raise RecordError(f"cannot write the report files to {out_dir} ({exc.strerror or exc}): "
                              "choose a writable folder with --out") from None
    return report


def _implementations(records: list[dict[str, Any]]) -> str:
    """Which code path each optimizer ran (fused, foreach, for-loop): it moves both time and memory."""
    paths = sorted({f"{r['optimizer']} {r['optimizer_implementation'].get('code_path')}" for r in records
                    if isinstance(r.get("optimizer_implementation"), dict)})
    return "implementations (they move time and memory): " + ("; ".join(paths) if paths else "not recorded")


def _write_files(report: Report, records: list[dict[str, Any]], out_dir: Path, title: str, plots: bool,
                 diagnostics: bool = False, html: bool = False) -> None:
    """CSV (raw numbers), Markdown (the rendered report) and PNG figures, named by workload id."""
    stem = f"comparison-{report.workload_id}"
    markdown = markdown_report(title, report.display, report.sources, report.time_to_target, report.verdicts,
                               report.notes, details=report.details, state_notes=report.state_notes,
                               warnings=report.warnings, disagreement=report.disagreement, timing=report.timing)
    # The CSV carries what ran beside the numbers: each optimizer's hyperparameters, seeds, device, versions.
    csv = report.table.drop(columns=["seeds"], errors="ignore")
    if not report.details.empty:
        csv = csv.merge(report.details, on="optimizer", how="left")
    report.files += write_tables(out_dir, stem, csv, markdown)
    if plots:
        from optbench.plots import learning_curves, memory_chart

        for path in (learning_curves(records, out_dir / f"{stem}-curves.png", title),
                     memory_chart(records, out_dir / f"{stem}-memory.png", title, report.table)):
            if path is not None:
                report.files.append(path)
        if diagnostics:
            from optbench.plots import diagnostics_curves

            path = diagnostics_curves(records, out_dir / f"{stem}-diagnostics.png", title)
            if path is not None:
                report.files.append(path)
    if html:
        from optbench.html_report import render_html

        captions = {"-curves.png": "Test accuracy and train loss per epoch and per training wall-time (red x: timing "
                                   "disturbed)",
                    "-memory.png": "Where each optimizer's step peak goes, its peak saving vs AdamW in %, and the "
                                   "course's 30% line",
                    "-diagnostics.png": "Optimizer diagnostics recorded in the runs"}
        figures = [(p, caption) for p in report.files for suffix, caption in captions.items()
                   if p.name == f"{stem}{suffix}"]
        page = out_dir / f"{stem}.html"
        page.write_text(render_html(report, records, figures), encoding="utf-8")
        report.files.append(page)
