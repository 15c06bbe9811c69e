"""The tuning report: from the study's trials, the trial records and the final runs' records.

Every number is recomputed from those: trial scores are the trial records' `final_val_acc` (the study
holds the same values and points at the records), test accuracies and verdicts come from the final
runs' records through compare's `build_report`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from optbench.analysis import DEFAULT_MARGIN, Verdict, model_facts_of, optimizer_order
from optbench.errors import RecordError
from optbench.models import model_label, model_title
from optbench.records import finished_runs
from optbench.render import tuning_display, tuning_markdown
from optbench.report import Report, build_report
from optbench.tune import TuneOutcome
from optbench.tune_analysis import (OptimizerTuning, lr_sensitivity, score, summarise_optimizer, tuning_curve,
                                    verdict_change)


@dataclass
class TuningReport:
    title: str
    protocol: list[str]
    summaries: list[OptimizerTuning]
    display: pd.DataFrame
    warnings: list[str]
    change: str | None  # None without final runs
    tuned: Report | None
    defaults: Report | None
    curves: dict[str, dict[str, list[float]]]
    sensitivity: dict[str, dict[Any, list[tuple[float, float]]]]
    files: list[Path] = field(default_factory=list)


def build_tuning_report(outcome: TuneOutcome, margin: float = DEFAULT_MARGIN, write: bool = True) -> TuningReport:
    plan = outcome.plan
    summaries, curves, sensitivity, warnings = [], {}, {}, []
    trial_records = finished_runs(plan.trials_dir, skipped=lambda problem: warnings.append(f"skipped: {problem}"))
    names = optimizer_order(list(plan.optimizers))
    specs = {s.optimizer: s for s in plan.studies}
    for opt in names:
        budget, trials = outcome.status[opt]
        summary = summarise_optimizer(
            opt, budget, specs[opt].space, plan.space == "grid", specs[opt].defaults, trial_records,
            [r for r in outcome.default_records if r["optimizer"] == opt],
            [r for r in outcome.tuned_records if r["optimizer"] == opt], trials)
        summaries.append(summary)
        warnings += summary.warnings
        curves[opt] = tuning_curve([score(budget.settled[s]) for s in sorted(budget.settled)], seed=plan.seed)
        sensitivity[opt] = lr_sensitivity(budget.settled)
    base = specs[names[0]].base
    facts = model_facts_of([*outcome.tuned_records, *outcome.default_records, *trial_records.values()])
    model = model_label(facts) if facts else (model_title(base.model) + (f", patch {base.patch_size}" if base.patch_size
                                                                        else "")
                                              + (f", depth {base.depth}" if base.depth else ""))
    workload = f"{base.dataset}, {model}, {base.epochs} epochs, batch {base.batch_size}, {base.device}/{base.precision}"
    title = f"optbench tune ({plan.space}, {plan.budget} trials per optimizer): {workload}"
    protocol = [
        f"every optimizer: {plan.budget} trials ({'grid points' if plan.space == 'grid' else 'scrambled Sobol points'}"
        f", seed {plan.seed}); trial 1 is its defaults",
        f"trials train on the training set minus a fixed class-balanced validation split of "
        f"{plan.validation_fraction:.0%} (seed 0) and are scored on its accuracy at the last epoch; the test split "
        "is never read; a diverged, out-of-memory or failed trial scores 0",
        "final runs: the chosen setting (ties go to the defaults) and the defaults, full training set, seeds "
        + (", ".join(map(str, outcome.final_seeds)) or "none (--final-seeds 0)") + ", scored on the test split",
    ]
    tuned = defaults = None
    change = None
    if outcome.tuned_records and outcome.default_records:
        tuned = build_report(outcome.tuned_records, plan.tune_dir / f"final-{plan.tag}" if write else None,
                             margin=margin, expected_optimizers=names, plots=write)
        defaults = build_report(outcome.default_records, None, margin=margin, expected_optimizers=names, plots=False)
        change = verdict_change(defaults.verdicts, tuned.verdicts)
    display = tuning_display(summaries)
    report = TuningReport(title, protocol, summaries, display, warnings, change, tuned, defaults, curves, sensitivity)
    if write:
        try:
            _write(report, outcome)
        except OSError as exc:
            raise RecordError(f"cannot write the tuning report to {plan.tune_dir} ({exc.strerror or exc})") from None
    return report


def _write(report: TuningReport, outcome: TuneOutcome) -> None:
    from optbench.plots import lr_sensitivity as lr_figure
    from optbench.plots import tuning_curves

    plan = outcome.plan
    stem = plan.tune_dir / f"tuning-{plan.tag}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for s in report.summaries:
        rows.append({"optimizer": s.optimizer, "budget": s.budget, "trials_used": s.trials_used,
                     **{f"default_{k}": v for k, v in s.defaults.items()}, **{f"chosen_{k}": v for k, v in s.chosen.items()},
                     "default_val_acc": s.default_val, "tuned_val_acc": s.tuned_val, "default_test_acc": s.default_test,
                     "tuned_test_acc": s.tuned_test, "tuning_epochs": s.compute["epochs"],
                     "tuning_device_seconds": s.compute["device_seconds"],
                     "tuning_hessian_updates": s.compute["hessian_updates"]})
    pd.DataFrame(rows).to_csv(f"{stem}.csv", index=False)
    no_verdicts: list[Verdict] = []
    markdown = tuning_markdown(
        report.title, report.protocol, report.display, report.warnings,
        report.change or "no final runs (--final-seeds 0): no verdicts",
        report.tuned.verdicts if report.tuned else no_verdicts,
        report.defaults.verdicts if report.defaults else no_verdicts, [])
    Path(f"{stem}.md").write_text(markdown)
    report.files += [Path(f"{stem}.csv"), Path(f"{stem}.md")]
    for path in (tuning_curves(report.curves, Path(f"{stem}-curve.png"), report.title),
                 lr_figure(report.sensitivity, outcome.chosen, Path(f"{stem}-lr.png"), report.title)):
        if path is not None:
            report.files.append(path)
    if report.tuned:
        report.files += report.tuned.files
