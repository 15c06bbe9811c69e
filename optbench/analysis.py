"""Analysis of run records: the comparison table, the course's criteria, time-to-target.

Pure functions over record dicts (as loaded by `records.load_records`): no training, no torch, so they
are tested with hand-written records. Every figure here is recomputable by hand from the JSON files;
the docstrings say how.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from statistics import mean, stdev
from typing import Any, Callable

import pandas as pd

from optbench.errors import OptbenchError
from optbench.models import model_label, model_title
from optbench.optimizers import BASELINE, COURSE_SET, MEMORY_CHALLENGER, REGISTRY, optimizer_names
from optbench.records import record_newness
from optbench.timing import ADVICE, DOES_NOT_STAND, STANDS, record_disturbance

MEMORY_TARGET = 0.30  # the course: "Lion must save >= 30% VRAM vs AdamW"
DEFAULT_MARGIN = 0.01  # accuracy non-inferiority margin, as a fraction (1 percentage point)
# Settings that define a workload: runs that differ in any of them are never compared in one table.
WORKLOAD_KEYS = ("dataset", "model", "patch_size", "depth", "epochs", "batch_size", "subset", "test_subset",
                 "augment", "warmup_steps", "device", "precision", "compile")


class AnalysisError(OptbenchError):
    """Records that cannot be analysed together."""


def workload_of(record: dict[str, Any]) -> dict[str, Any]:
    cfg = record.get("config", {})
    return {k: cfg.get(k) for k in WORKLOAD_KEYS}


def workload_id(workload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(workload, sort_keys=True, default=str).encode()).hexdigest()[:8]


def model_facts_of(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The `model` block of the first record that has one (what was built: patch, image size, depth,
    width), or None for records written before it existed."""
    for rec in records:
        if isinstance(rec.get("model"), dict):
            return rec["model"]
    return None


def workload_label(workload: dict[str, Any], facts: dict[str, Any] | None = None) -> str:
    """The workload in words; with a record's model facts, the model as it ran ("ViT-Tiny, patch 4 on
    32 px, depth 4, width 192"), else what the config says of it."""
    parts = [f"{workload['dataset']}"]
    if facts:
        parts.append(model_label(facts))
    else:
        parts.append(model_title(str(workload["model"])))
        if workload.get("patch_size"):
            parts.append(f"patch {workload['patch_size']}")
        if workload.get("depth"):
            parts.append(f"depth {workload['depth']}")
    parts.append(f"{workload['epochs']} epochs, batch {workload['batch_size']}")
    if workload.get("subset"):
        parts.append(f"subset {workload['subset']}")
    parts.append(f"{workload['device']}/{workload['precision']}")
    return ", ".join(str(p) for p in parts)


@dataclass
class Selection:
    records: list[dict[str, Any]]
    workload: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def select_workload(records: list[dict[str, Any]], workload: str | None = None) -> Selection:
    """The records of one workload, one record per (optimizer, seed): the newest finished one.

    Refuses to mix workloads: if the records span several and `workload` (an id) does not pick one, an
    AnalysisError lists them. Two hyperparameter settings of one optimizer in one workload are refused
    too: which one is "Lion" would be a guess.
    """
    if not records:
        raise AnalysisError("no run records to analyse: run `optbench compare` first")
    groups: dict[str, list[dict[str, Any]]] = {}
    labels: dict[str, str] = {}
    for rec in records:
        wl = workload_of(rec)
        key = workload_id(wl)
        groups.setdefault(key, []).append(rec)
        labels[key] = workload_label(wl)
    if workload is not None:
        if workload not in groups:
            raise AnalysisError(f"no records of workload {workload}; found: "
                                + "; ".join(f"{k} ({labels[k]})" for k in groups))
        chosen = workload
    elif len(groups) == 1:
        chosen = next(iter(groups))
    else:
        listing = "; ".join(f"{k} = {labels[k]} ({len(v)} records)" for k, v in groups.items())
        raise AnalysisError(f"records of {len(groups)} different workloads cannot share one table ({listing}): "
                            "pick one with --workload ID or keep each workload in its own results directory")
    notes = []
    chosen_runs: dict[tuple, dict[str, Any]] = {}
    for rec in groups[chosen]:
        key = (rec["optimizer"], rec["config"].get("seed"))
        if key in chosen_runs:
            notes.append(f"{key[0]} seed {key[1]}: several records; the newest finished one is used")
        if key not in chosen_runs or _preference(rec) > _preference(chosen_runs[key]):
            chosen_runs[key] = rec
    devices = {str(r["environment"].get("device_name")) for r in chosen_runs.values()
               if isinstance(r.get("environment"), dict)}
    if len(devices) > 1:
        notes.append("warning: these records come from different devices (" + "; ".join(sorted(devices))
                     + "): wall-times are not comparable across them")
    settings: dict[str, set[str]] = {}
    for rec in chosen_runs.values():
        hp = json.dumps(rec["config"].get("hparams", {}), sort_keys=True, default=str)
        settings.setdefault(rec["optimizer"], set()).add(hp)
    mixed = [opt for opt, hps in settings.items() if len(hps) > 1]
    if mixed:
        raise AnalysisError(f"{', '.join(mixed)}: runs with different hyperparameters in one workload; keep each "
                            "setting in its own results directory")
    return Selection(list(chosen_runs.values()), workload_of(groups[chosen][0]), sorted(set(notes)))


def _preference(record: dict[str, Any]) -> tuple[bool, tuple[str, str, int]]:
    """Which record stands for a run: a finished one (ok or diverged) over an unfinished one, then the newest
    by the rule compare and status use (records.newest_record: ties of finished_at by file name)."""
    return record["status"] in ("ok", "diverged"), record_newness(record)


# --- the table -------------------------------------------------------------------------------------


def _finite(values: list[Any]) -> list[float]:
    return [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


def _mean(values: list[Any]) -> float | None:
    vals = _finite(values)
    return mean(vals) if vals else None


def _std(values: list[Any]) -> float | None:
    vals = _finite(values)
    return stdev(vals) if len(vals) >= 2 else None


def optimizer_order(names: list[str]) -> list[str]:
    known = [n for n in optimizer_names() if n in names]  # the registry's order, the baseline first
    return known + sorted(n for n in names if n not in known)


def by_optimizer(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The records grouped by optimizer, in `optimizer_order`."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for rec in records:
        groups.setdefault(rec["optimizer"], []).append(rec)
    return {name: groups[name] for name in optimizer_order(list(groups))}


def summary_table(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per optimizer. Means over the seeds whose run finished (status ok); std with >= 2 seeds.

    Columns: runs, ok, diverged, failed (oom/interrupted), acc_mean/acc_std (fraction), time_mean/std
    (training wall-time, s), peak_mean (bytes, without the dataset held on the device: the course's
    situation), peak_with_data_mean (with it, as optbench runs), peak_source, state_bytes, throughput (images/s), and
    relative to AdamW: acc_diff (fraction points), time_ratio, peak_saving, state_saving (1 - x/AdamW).
    """
    rows = []
    for opt, runs in by_optimizer(records).items():
        ok = [r for r in runs if r["status"] == "ok"]
        sources = sorted({r.get("peak_memory_source") or "unknown" for r in ok})
        rows.append({
            "optimizer": opt,
            "runs": len(runs),
            "ok": len(ok),
            "diverged": sum(r["status"] == "diverged" for r in runs),
            "failed": sum(r["status"] in ("oom", "interrupted", "failed") for r in runs),
            "acc_mean": _mean([r.get("final_test_acc") for r in ok]),
            "acc_std": _std([r.get("final_test_acc") for r in ok]),
            "time_mean": _mean([r.get("train_wall_time_s") for r in ok]),
            "time_std": _std([r.get("train_wall_time_s") for r in ok]),
            "peak_mean": _mean([peak_without_dataset(r) for r in ok]),  # the course's: no resident dataset
            "peak_with_data_mean": _mean([peak_with_dataset(r) for r in ok]),
            "peak_source": "; ".join(sources) if ok else None,
            "state_bytes": _mean([r.get("optimizer_state_bytes") for r in ok]),
            "throughput": _mean([r.get("throughput_images_per_s") for r in ok]),
            "seeds": sorted({r["config"].get("seed") for r in runs}),
            # runs whose timing was disturbed (optbench/timing.py): their time figures do not stand
            "timing_disturbed": sum(bool(record_disturbance(r)) for r in ok),
            "cpu_per_wall": _mean([(r.get("timing") or {}).get("cpu_per_wall") for r in ok
                                   if isinstance(r.get("timing"), dict)]),
            "compile_warmup_s": _mean([r.get("compile_warmup_s") for r in ok]),
        })
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    base = df[df.optimizer == BASELINE]
    base_row = base.iloc[0] if len(base) else None

    def rel(col: str, fn):
        if base_row is None or base_row[col] is None or pd.isna(base_row[col]):
            return [None] * len(df)
        return [fn(v, base_row[col]) if v is not None and not pd.isna(v) else None for v in df[col]]

    df["acc_diff"] = rel("acc_mean", lambda v, b: v - b)
    df["time_ratio"] = rel("time_mean", lambda v, b: v / b if b else None)
    df["peak_saving"] = rel("peak_mean", lambda v, b: 1 - v / b if b else None)
    df["state_saving"] = rel("state_bytes", lambda v, b: 1 - v / b if b else None)
    return df


# --- timing ---------------------------------------------------------------------------------------


def timing_notes(records: list[dict[str, Any]]) -> list[str]:
    """Which runs' times were disturbed and why, what still stands, and what to do; on a CPU, which
    figures stand at all. Empty when every run was undisturbed on a GPU."""
    out = []
    disturbed = [(r, record_disturbance(r)) for r in records if r["status"] == "ok"]
    disturbed = [(r, why) for r, why in disturbed if why]
    for rec, why in disturbed:
        out.append(f"{rec['optimizer']} seed {rec['config'].get('seed')}: timing disturbed: {'; '.join(why)}")
    if disturbed:
        out.append(f"for the runs marked disturbed, {STANDS}; {DOES_NOT_STAND}: {ADVICE}")
    if any(str(r["config"].get("device")) == "cpu" for r in records):
        out.append("on a CPU: the steps, memory (tensor bytes) and accuracy figures stand as they would on any "
                   "device; the time figures (training time, images/s, time x AdamW, time-to-target) hold only for "
                   "this CPU, only where not marked disturbed, and do not predict a GPU's")
    return out


# --- what ran ---------------------------------------------------------------------------------------


def run_details(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per optimizer: its hyperparameters, seeds, library and version, code path, and the device
    and versions the runs were made with (as the records say; several values are joined with '; ')."""
    rows = []

    def joined(values) -> str:
        return "; ".join(sorted({str(v) for v in values if v is not None})) or "-"

    for opt, runs in by_optimizer(records).items():
        envs = [r.get("environment") if isinstance(r.get("environment"), dict) else {} for r in runs]
        packages = [e.get("packages") if isinstance(e.get("packages"), dict) else {} for e in envs]
        library = REGISTRY[opt].library if opt in REGISTRY else None
        impls = [r.get("optimizer_implementation") if isinstance(r.get("optimizer_implementation"), dict) else {}
                 for r in runs]
        rows.append({
            "optimizer": opt,
            "hparams": joined(json.dumps(r["config"].get("hparams", {}), sort_keys=True) for r in runs),
            "seeds": ",".join(str(s) for s in sorted({r["config"].get("seed") for r in runs if
                                                      r["config"].get("seed") is not None})),
            "library": library or "-",
            "library_version": joined(p.get(library) for p in packages) if library else "-",
            "code_path": joined(i.get("code_path") for i in impls),
            "device": joined(r["config"].get("device") for r in runs),
            "device_name": joined(e.get("device_name") for e in envs),
            "precision": joined(r["config"].get("precision") for r in runs),
            "cpu_threads": joined(e.get("cpu_threads") for e in envs),
            "python": joined(e.get("python") for e in envs),
            "optbench": joined(e.get("optbench") for e in envs),
            "torch": joined(p.get("torch") for p in packages),
            "timm": joined(p.get("timm") for p in packages),
        })
    return pd.DataFrame(rows)


def state_notes(records: list[dict[str, Any]]) -> list[str]:
    """Why each optimizer's state is the size it is (the registry entries' own notes), for the
    optimizers in these records."""
    return [REGISTRY[n].state_note for n in by_optimizer(records) if n in REGISTRY and REGISTRY[n].state_note]


def course_warnings(records: list[dict[str, Any]]) -> list[str]:
    """The course's common mistakes the runs' settings make, as each run was warned at its start
    (the record's `warnings`), once per optimizer and text."""
    out: list[str] = []
    for runs in by_optimizer(records).values():
        for rec in runs:
            for text in rec.get("warnings") or []:
                if isinstance(text, str) and text not in out:
                    out.append(text)
    return out


# --- criteria --------------------------------------------------------------------------------------


@dataclass
class Verdict:
    name: str
    passed: bool | None  # None: cannot be decided from these records
    summary: str
    details: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    key: str = ""  # memory | accuracy_literal | accuracy_statistical: what --strict --rule selects
    qualifier: str = ""  # e.g. "indicative" (one seed): shown beside PASS/FAIL


def _ok(records: list[dict[str, Any]], optimizer: str) -> list[dict[str, Any]]:
    return [r for r in records if r["optimizer"] == optimizer and r["status"] == "ok"]


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _mib(x: float) -> str:
    return f"{x / 2**20:,.1f} MiB"


def _resident_in_peak(record: dict[str, Any]) -> bool:
    """Whether the record's peak includes the dataset held on the device: a CUDA allocator peak over the
    whole training does (the data were put there before the peak was reset); the MemTracker probe
    (CPU) tracks one step's tensors only and does not."""
    return "cuda" in str(record.get("peak_memory_source"))


def peak_without_dataset(record: dict[str, Any]) -> float | None:
    """The peak a usual DataLoader set-up would see (the course's situation): the record's own figure,
    else the CUDA peak minus the dataset bytes held on the GPU (resident for the whole run, so the
    subtraction is exact up to the allocator's 512-byte rounding), else the probe's peak as it is."""
    value = record.get("peak_memory_without_dataset_bytes")
    if isinstance(value, (int, float)):
        return float(value)
    peak, data = record.get("peak_memory_bytes"), record.get("dataset_device_bytes")
    if not isinstance(peak, (int, float)):
        return None
    if _resident_in_peak(record):
        return float(peak - data) if isinstance(data, (int, float)) else None
    return float(peak)


def peak_with_dataset(record: dict[str, Any]) -> float | None:
    """The peak with the dataset held on the device, as optbench runs: the CUDA peak as measured, or
    the probe's step peak plus the dataset's bytes (the probe does not hold the dataset)."""
    peak, data = record.get("peak_memory_bytes"), record.get("dataset_device_bytes")
    if not isinstance(peak, (int, float)):
        return None
    if _resident_in_peak(record):
        return float(peak)
    return float(peak + data) if isinstance(data, (int, float)) else None


def memory_criterion(records: list[dict[str, Any]]) -> Verdict:
    """Lion's saving of peak memory vs AdamW (the course's wording), beside its optimizer-state saving.

    On the course's situation, the peak without the resident dataset (`peak_without_dataset`):
    saving = 1 - mean(Lion peak) / mean(AdamW peak) over finished runs. The same with the dataset held
    on the device (optbench's set-up) is shown beside it. When it falls short, the reason comes from
    the measured breakdown (memory_breakdown.plain_step of the AdamW runs): the share of the peak that
    optimizer state can touch at all, and the ceiling (state_AdamW - state_Lion) / (params + grads +
    state_AdamW) that holds even with no activations.
    """
    name = "Lion saves >= 30% peak memory vs AdamW"
    adamw, lion = _ok(records, BASELINE), _ok(records, MEMORY_CHALLENGER)
    missing = [n for n, runs in ((BASELINE, adamw), (MEMORY_CHALLENGER, lion)) if not runs]
    if missing:
        return Verdict(name, None, f"cannot be checked: no finished {' or '.join(missing)} run", key="memory")
    peak_a, peak_l = _mean([peak_without_dataset(r) for r in adamw]), _mean([peak_without_dataset(r) for r in lion])
    state_a = _mean([r.get("optimizer_state_bytes") for r in adamw])
    state_l = _mean([r.get("optimizer_state_bytes") for r in lion])
    if not peak_a or peak_l is None:
        return Verdict(name, None, "cannot be checked: peak memory was not measured", key="memory")
    sources = {r.get("peak_memory_source") for r in adamw + lion}
    saving = 1 - peak_l / peak_a
    state_saving = 1 - state_l / state_a if state_a else None
    with_a, with_l = _mean([peak_with_dataset(r) for r in adamw]), _mean([peak_with_dataset(r) for r in lion])
    with_saving = 1 - with_l / with_a if with_a and with_l is not None else None
    dataset = _mean([r.get("dataset_device_bytes") for r in adamw])
    figures = {"adamw_peak_bytes": peak_a, "lion_peak_bytes": peak_l, "peak_saving": saving,
               "adamw_peak_with_dataset_bytes": with_a, "lion_peak_with_dataset_bytes": with_l,
               "peak_saving_with_dataset": with_saving, "dataset_bytes": dataset,
               "adamw_state_bytes": state_a, "lion_state_bytes": state_l, "state_saving": state_saving,
               "peak_sources": sorted(s for s in sources if s)}
    passed = saving >= MEMORY_TARGET
    summary = (f"peak without the resident dataset {_mib(peak_l)} vs {_mib(peak_a)}: Lion saves {_pct(saving)} "
               f"of peak memory ({'meets' if passed else 'misses'} the 30% target)")
    details = []
    if with_saving is not None:
        measured = all(_resident_in_peak(r) for r in adamw + lion)
        details.append(f"with the dataset held on the device ({_mib(dataset or 0)}, as optbench keeps it"
                       + ("" if measured else "; the probe's step peak plus the dataset's bytes")
                       + f"): {_mib(with_l)} vs {_mib(with_a)}, Lion saves {_pct(with_saving)}; the criterion "
                       "uses the peak without it (a usual DataLoader set-up holds one batch, not the dataset)")
    if state_saving is not None:
        details.append(f"optimizer state {_mib(state_l)} vs {_mib(state_a)}: Lion saves {_pct(state_saving)} "
                       "of optimizer-state memory (the course's '50%')")
    if len(sources) > 1:
        details.append("warning: the peaks come from different measurement sources: " + "; ".join(sorted(map(str, sources))))
    if not passed:
        details.extend(_explain_memory_shortfall(adamw, state_a, state_l, peak_a))
    return Verdict(name, passed, summary, details, figures, key="memory")


def _explain_memory_shortfall(adamw: list[dict[str, Any]], state_a: float, state_l: float, peak_a: float) -> list[str]:
    parts = [r["memory_breakdown"]["plain_step"] for r in adamw
             if isinstance(r.get("memory_breakdown"), dict) and isinstance(r["memory_breakdown"].get("plain_step"), dict)]
    out = []
    param_bytes = _mean([r.get("param_bytes") for r in adamw])
    if param_bytes:
        # During step() weights, gradients and the full state are alive together; activations add on top.
        floor_a = 2 * param_bytes + state_a
        ceiling = (state_a - state_l) / floor_a
        out.append(f"why: even with no activations at all, weights + gradients + state are {_mib(floor_a)} for AdamW, "
                   f"so removing {_mib(state_a - state_l)} of state can save at most {_pct(ceiling)} "
                   "(the measured ceiling for this model and precision)")
    if parts:
        act = _mean([p.get("activations") for p in parts]) or 0.0
        total = _mean([p.get("peak_bytes") for p in parts]) or 0.0
        opt = _mean([p.get("optimizer_state") for p in parts]) or 0.0
        if total:
            out.append(f"measured breakdown of AdamW's step peak ({_mib(total)}): activations {_pct(act / total)}, "
                       f"optimizer state {_pct(opt / total)}; activations grow with batch size, state does not")
    if not out:
        out.append("why: the records carry no memory breakdown to explain it")
    return out


def _t_quantile_95(dof: float) -> float:
    from scipy.stats import t

    return float(t.ppf(0.95, dof))


ACCURACY_NAME = "at least one modern optimizer equals or beats AdamW's accuracy"
RULES = ("literal", "statistical", "both")
DEFAULT_RULE = "both"  # --strict: the course's rule as written and the statistics must both pass
INDICATIVE = ("indicative: one seed per optimizer, so no confidence bound and no evidence either way; "
              "run 3 seeds or more (--seeds 0,1,2, the homework preset's default)")


def _modern(records: list[dict[str, Any]]) -> list[str]:
    return [n for n in by_optimizer(records) if n != BASELINE]


def _unfinished(records: list[dict[str, Any]], opt: str) -> tuple[list[dict[str, Any]], list[float], int]:
    runs = [r for r in records if r["optimizer"] == opt]
    vals = _finite([r.get("final_test_acc") for r in _ok(records, opt)])
    return runs, vals, len(runs) - len(vals)


def _not_finished_line(opt: str, runs: list[dict[str, Any]], vals: list[float], failed: int) -> str:
    statuses = ", ".join(sorted({r["status"] for r in runs if r["status"] != "ok"}))
    if vals:
        # A seed that diverged (or failed) is a result against the optimizer, not a run to ignore.
        return f"{opt}: {failed} of {len(runs)} runs did not finish ({statuses}) -> does not match"
    return f"{opt}: no run finished ({statuses}) -> does not match"


@dataclass(frozen=True)
class AccuracyReading:
    """One reading of the accuracy criterion: what it calls a match, and its words. Everything else (the
    baseline, a seed that did not finish counting against its optimizer, the single-seed label, the
    summary's shape) is shared by `_accuracy_verdict`."""

    name: str
    key: str  # what --strict --rule selects
    rule: str  # the first detail line
    # (a finished optimizer's seeds, AdamW's) -> (it matches, its sample in words, more after the
    # difference, more figures)
    judge: Callable[[list[float], list[float]], tuple[bool, str, str, dict[str, Any]]]
    outcome: tuple[str, str]  # a finished optimizer's line ends with one: (matches, does not)
    passed: str  # summary when one matches; {} takes their names
    failed: str  # summary when none does
    figures: dict[str, Any] = field(default_factory=dict)  # besides AdamW's mean


def _accuracy_verdict(records: list[dict[str, Any]], reading: AccuracyReading) -> Verdict:
    """Each modern optimizer held against AdamW's mean by `reading`: PASS when at least one matches."""
    base = _finite([r.get("final_test_acc") for r in _ok(records, BASELINE)])
    if not base:
        return Verdict(reading.name, None, "cannot be checked: no finished AdamW run", key=reading.key)
    details = [reading.rule]
    matched, checked, figures = [], 0, {"adamw_acc_mean": mean(base), **reading.figures}
    for opt in _modern(records):
        runs, vals, failed = _unfinished(records, opt)
        if not runs:
            details.append(f"{opt}: no run")
            continue
        checked += 1
        diff = mean(vals) - mean(base) if vals else None
        if failed:
            details.append(_not_finished_line(opt, runs, vals, failed))
            if vals:
                figures[opt] = {"acc_mean": mean(vals), "diff": diff, "n": len(vals), "failed": failed}
            continue
        ok, sample, more, extra = reading.judge(vals, base)
        details.append(f"{opt}: {100 * mean(vals):.2f}% vs {100 * mean(base):.2f}% {sample}, "
                       f"difference {100 * diff:+.2f} pp{more} -> {reading.outcome[0] if ok else reading.outcome[1]}")
        figures[opt] = {"acc_mean": mean(vals), "diff": diff, **extra, "n": len(vals)}
        if ok:
            matched.append(opt)
    figures["matched"] = matched
    qualifier = "indicative" if _single_seed(records) else ""
    if qualifier:
        details.append(INDICATIVE)
    if checked == 0:
        return Verdict(reading.name, None, "cannot be checked: no modern optimizer run", details, figures,
                       key=reading.key)
    if matched:
        return Verdict(reading.name, True, reading.passed.format(", ".join(matched)), details, figures,
                       key=reading.key, qualifier=qualifier)
    return Verdict(reading.name, False, reading.failed, details, figures, key=reading.key, qualifier=qualifier)


def _seed_counts(vals: list[float], base: list[float]) -> str:
    return f"(n={len(vals)} vs {len(base)})"


def literal_accuracy_criterion(records: list[dict[str, Any]]) -> Verdict:
    """The course's rule as written: a modern optimizer "equals or beats" AdamW when its mean final
    accuracy over finished seeds is >= AdamW's mean (no margin, no statistics). A seed that did not
    finish counts against the optimizer."""
    def judge(vals: list[float], base: list[float]) -> tuple[bool, str, str, dict[str, Any]]:
        return mean(vals) >= mean(base), _seed_counts(vals, base), "", {}

    return _accuracy_verdict(records, AccuracyReading(
        f"{ACCURACY_NAME} (the course's rule as written)", "accuracy_literal",
        "rule: mean accuracy >= AdamW's mean accuracy", judge, ("equals or beats", "below"),
        "{}: mean accuracy >= AdamW's", "no modern optimizer's mean accuracy reaches AdamW's"))


def _single_seed(records: list[dict[str, Any]]) -> bool:
    counts = [len(_finite([r.get("final_test_acc") for r in _ok(records, n)])) for n in [BASELINE, *_modern(records)]]
    return any(c == 1 for c in counts)


def statistical_rule(margin: float) -> str:
    """What the statistical reading tests, in words; margin 0 is named for what it is."""
    if margin == 0:
        return ("superiority-or-equal test (margin 0): matches only if the one-sided 95% Welch lower bound of "
                "mean(modern) - mean(AdamW) is >= 0 pp, i.e. the seeds show it at least as good as AdamW with 95% "
                "confidence; stricter than the course's rule, a tie within noise fails")
    return (f"non-inferiority within {100 * margin:.1f} pp: matches if the one-sided 95% Welch lower bound of "
            f"mean(modern) - mean(AdamW) is >= -{100 * margin:.1f} pp")


def welch_lower_bound(vals: list[float], base: list[float]) -> float:
    """The one-sided 95% Welch lower confidence bound of mean(vals) - mean(base) (>= 2 values each)."""
    diff = mean(vals) - mean(base)
    va, vb = stdev(vals) ** 2 / len(vals), stdev(base) ** 2 / len(base)
    se = math.sqrt(va + vb)
    if se == 0:
        return diff
    dof = (va + vb) ** 2 / ((va ** 2) / (len(vals) - 1) + (vb ** 2) / (len(base) - 1))
    return diff - _t_quantile_95(dof) * se


def accuracy_criterion(records: list[dict[str, Any]], margin: float = DEFAULT_MARGIN) -> Verdict:
    """optbench's statistical reading of the course's accuracy criterion: non-inferiority within `margin`.

    With >= 2 finished seeds on both sides, an optimizer matches when the one-sided 95% Welch lower
    confidence bound of mean(modern) - mean(AdamW) is >= -margin. With one seed on either side there is
    no bound: the point difference is held against the margin and the verdict is labelled indicative.
    """
    def judge(vals: list[float], base: list[float]) -> tuple[bool, str, str, dict[str, Any]]:
        if len(vals) >= 2 and len(base) >= 2:
            lower = welch_lower_bound(vals, base)
            return (lower >= -margin, _seed_counts(vals, base), f", 95% lower bound {100 * lower:+.2f} pp",
                    {"lower_bound": lower})
        return mean(vals) - mean(base) >= -margin, "(one seed: no bound)", "", {}

    single = ("; with a single seed the point difference is held against the margin (no bound)"
              if _single_seed(records) else "")
    return _accuracy_verdict(records, AccuracyReading(
        f"{ACCURACY_NAME} (statistical reading)", "accuracy_statistical",
        "rule: " + statistical_rule(margin) + single, judge, ("matches", "does not match"),
        "{} match(es) or beat(s) AdamW", "no modern optimizer matches AdamW's accuracy", {"margin": margin}))


def accuracy_verdicts(records: list[dict[str, Any]], margin: float = DEFAULT_MARGIN) -> tuple[Verdict, Verdict, str | None]:
    """The accuracy criterion read twice: (literal, statistical, a sentence where they disagree or None)."""
    literal, statistical = literal_accuracy_criterion(records), accuracy_criterion(records, margin)
    return literal, statistical, disagreement(literal, statistical, margin)


def disagreement(literal: Verdict, statistical: Verdict, margin: float) -> str | None:
    """Why the course's rule and the statistics part ways, in one sentence; None where they agree."""
    if literal.passed is None or statistical.passed is None or literal.passed == statistical.passed:
        return None
    if literal.passed:
        opts = literal.figures.get("matched", [])
        bounds = [f"{o} {100 * statistical.figures[o]['lower_bound']:+.2f} pp" for o in opts
                  if isinstance(statistical.figures.get(o), dict) and "lower_bound" in statistical.figures[o]]
        return (f"The two readings disagree: by the course's rule as written {', '.join(opts)} equals or beats AdamW "
                f"(its mean accuracy is at least AdamW's), but the statistics do not support it: "
                + (f"the 95% lower bound ({'; '.join(bounds)}) is below -{100 * margin:.1f} pp, so a difference this "
                   "small is within the seeds' noise" if bounds else "the point difference misses the margin")
                + "; more seeds narrow the bound.")
    opts = statistical.figures.get("matched", [])
    diffs = [f"{o} {100 * statistical.figures[o]['diff']:+.2f} pp" for o in opts
             if isinstance(statistical.figures.get(o), dict)]
    return (f"The two readings disagree: no modern optimizer's mean reaches AdamW's, so the course's rule as "
            f"written fails, but {', '.join(opts)} is within the {100 * margin:.1f} pp non-inferiority margin "
            f"({'; '.join(diffs)}): the statistical reading treats a shortfall this small as a tie, the course's "
            "rule does not.")


def strict_verdicts(verdicts: list[Verdict], rule: str) -> list[Verdict]:
    """The verdicts --strict enforces under `rule`: the memory criterion and the accuracy reading(s)."""
    if rule not in RULES:
        raise AnalysisError(f"unknown rule '{rule}': choose one of {', '.join(RULES)}")
    keys = {"memory"} | ({"accuracy_literal"} if rule in ("literal", "both") else set()) \
        | ({"accuracy_statistical"} if rule in ("statistical", "both") else set())
    return [v for v in verdicts if v.key in keys]


def strict_rule_text(rule: str, margin: float) -> str:
    readings = {"literal": "the course's literal rule (mean accuracy >= AdamW's)",
                "statistical": f"the statistical reading ({statistical_rule(margin).split(':')[0]})",
                "both": "both the course's literal rule (mean accuracy >= AdamW's) and the statistical reading "
                        f"({statistical_rule(margin).split(':')[0]})"}[rule]
    return f"--strict --rule {rule} enforces the memory criterion and, for accuracy, {readings}"


# --- time to target --------------------------------------------------------------------------------


def time_to_target(records: list[dict[str, Any]]) -> pd.DataFrame:
    """Per optimizer: the first epoch, and training time then, at which test accuracy reached AdamW's
    mean final accuracy. Per run from its history; reported as the mean over the runs that reached it,
    with how many did ("never" when none)."""
    base = _finite([r.get("final_test_acc") for r in _ok(records, BASELINE)])
    if not base:
        return pd.DataFrame()
    target = mean(base)
    rows = []
    for opt, runs in by_optimizer([r for r in records if r["status"] in ("ok", "diverged")]).items():
        hits = []
        for rec in runs:
            for row in rec.get("history") or []:
                if isinstance(row.get("test_acc"), (int, float)) and row["test_acc"] >= target:
                    hits.append((row.get("epoch"), row.get("train_time_s")))
                    break
        rows.append({"optimizer": opt, "target_acc": target, "runs": len(runs), "reached": len(hits),
                     "epoch_mean": _mean([h[0] for h in hits]), "time_mean": _mean([h[1] for h in hits]),
                     "timing_disturbed": sum(bool(record_disturbance(r)) for r in runs)})
    return pd.DataFrame(rows)


def missing_runs(records: list[dict[str, Any]], expected_optimizers: list[str] | None = None) -> list[str]:
    """Lines naming what the table cannot show: optimizers without a finished run, failed runs."""
    present = {r["optimizer"] for r in records}
    expected = expected_optimizers or list(COURSE_SET)
    out = [f"{opt}: no record" for opt in expected if opt not in present]
    for rec in records:
        if rec["status"] != "ok":
            detail = rec.get("status_detail") or ""
            out.append(f"{rec['optimizer']} seed {rec['config'].get('seed')}: {rec['status']}"
                       + (f" ({detail})" if detail else ""))
    return out


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def update_size_per_lr(records: list[dict[str, Any]]) -> dict[str, float]:
    """Optimizer -> its step size per unit lr: the median over epochs of the history's diagnostics
    `update_rms` (RMS parameter change / lr at log points), averaged over finished seeds. Records
    without diagnostics are left out."""
    per_opt: dict[str, list[float]] = {}
    for rec in records:
        if rec.get("status") != "ok":
            continue
        values = _finite([(row.get("diagnostics") or {}).get("update_rms") for row in rec.get("history") or []
                          if isinstance(row, dict)])
        if values:
            per_opt.setdefault(rec["optimizer"], []).append(_median(values))
    return {name: mean(per_opt[name]) for name in optimizer_order(list(per_opt))}


def update_size_notes(records: list[dict[str, Any]]) -> list[str]:
    """Each optimizer's update RMS per unit lr against the baseline's: how many times further it moves
    the weights than the baseline would at the same lr (why an lr copied from AdamW can explode Lion)."""
    sizes = update_size_per_lr(records)
    if not sizes:
        return []
    base = sizes.get(BASELINE)
    parts = []
    for name, size in sizes.items():
        ratio = f" = {size / base:.1f}x {BASELINE}'s" if base and name != BASELINE else ""
        parts.append(f"{name} {size:.3g}{ratio}")
    return ["update RMS per unit lr (median over epochs, mean over seeds; at the same lr an optimizer moves the "
            "weights that many times as far as the baseline): " + "; ".join(parts)]
