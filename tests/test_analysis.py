"""Analysis and report on hand-written run records: no training, milliseconds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from optbench.analysis import (AnalysisError, accuracy_criterion, memory_criterion, select_workload, summary_table,
                               time_to_target)
from optbench.cli import app
from optbench.render import verdict_text
from optbench.report import build_report

MiB = 2**20


def make_record(optimizer: str, seed: int = 0, acc: float | None = 0.5, time_s: float = 100.0,
                peak: int = 1000 * MiB, state: int = 40 * MiB, status: str = "ok", epochs: int = 3,
                curve: list[float] | None = None, **config_changes) -> dict:
    """A run record as `optbench run` writes it, with only the fields analysis reads."""
    config = {"dataset": "cifar100", "model": "vit_tiny_patch16_224", "patch_size": None, "depth": None,
              "epochs": epochs, "batch_size": 128, "subset": None, "test_subset": None, "augment": True,
              "warmup_steps": 500, "device": "cuda", "precision": "bf16", "compile": False, "seed": seed,
              "hparams": {"lr": 1e-3}}
    config.update(config_changes)
    curve = curve or [acc * (i + 1) / epochs if acc else 0.1 for i in range(epochs)]
    history = [{"epoch": i + 1, "train_loss": 2.0 / (i + 1), "test_loss": 2.0, "test_acc": a,
                "train_time_s": time_s * (i + 1) / epochs, "steps": 100 * (i + 1)} for i, a in enumerate(curve)]
    return {
        "schema_version": 1, "optimizer": optimizer, "status": status, "config": config,
        "config_hash": f"{optimizer}-{seed}-{json.dumps(config_changes, sort_keys=True)}",
        "final_test_acc": acc if status == "ok" else None, "train_wall_time_s": time_s,
        "peak_memory_bytes": peak, "peak_memory_source": "torch.cuda.max_memory_allocated (whole training)",
        "optimizer_state_bytes": state, "throughput_images_per_s": 1000.0, "param_bytes": 20 * MiB,
        "dataset_device_bytes": 150 * MiB,
        "memory_breakdown": {"plain_step": {"params": 20 * MiB, "grads": 20 * MiB, "optimizer_state": state,
                                            "activations": peak - 80 * MiB, "peak_bytes": peak}},
        "history": history if status in ("ok", "diverged") else history[:1],
        "finished_at": f"2026-11-22T00:00:0{seed}Z", "status_detail": "",
    }


def four(seed: int = 0, accs=(0.50, 0.48, 0.47, 0.52)) -> list[dict]:
    return [make_record("adamw", seed, accs[0], 100.0, 1265 * MiB, 40 * MiB),
            make_record("lion", seed, accs[1], 95.0, 1245 * MiB, 20 * MiB),
            make_record("sophia", seed, accs[2], 130.0, 2500 * MiB, 60 * MiB),
            make_record("schedulefree", seed, accs[3], 101.0, 1266 * MiB, 40 * MiB)]


def test_table_relative_figures_recompute_from_records():
    df = summary_table(four()).set_index("optimizer")
    assert df.loc["lion", "acc_diff"] == pytest.approx(0.48 - 0.50)
    assert df.loc["lion", "time_ratio"] == pytest.approx(95 / 100)
    assert df.loc["lion", "peak_saving"] == pytest.approx(1 - (1245 - 150) / (1265 - 150))  # without the dataset
    assert df.loc["lion", "state_saving"] == pytest.approx(0.5)
    assert df.loc["sophia", "state_saving"] == pytest.approx(-0.5)
    assert list(df.index) == ["adamw", "lion", "sophia", "schedulefree"]


def test_memory_criterion_fails_on_peak_and_explains_from_breakdown():
    verdict = memory_criterion(four())
    assert verdict.passed is False
    # the course's peak: the CUDA peak minus the 150 MiB dataset the records say was held on the GPU
    assert verdict.figures["peak_saving"] == pytest.approx(1 - (1245 - 150) / (1265 - 150))
    assert verdict.figures["peak_saving_with_dataset"] == pytest.approx(1 - 1245 / 1265)
    assert verdict.figures["state_saving"] == pytest.approx(0.5)
    text = " ".join(verdict.details)
    # ceiling = (40 - 20) / (2 * 20 + 40) = 25% from the records' own param_bytes and state bytes
    assert "25.0%" in text
    assert "activations" in text and "with the dataset held on the device (150.0 MiB" in text


def test_memory_criterion_passes_when_the_measurement_says_so():
    records = [make_record("adamw", peak=100 * MiB, state=60 * MiB), make_record("lion", peak=65 * MiB, state=30 * MiB)]
    for rec in records:
        rec["dataset_device_bytes"] = 0
    verdict = memory_criterion(records)
    assert verdict.passed is True and verdict.figures["peak_saving"] == pytest.approx(0.35)


def test_memory_criterion_undecided_without_lion():
    verdict = memory_criterion([make_record("adamw")])
    assert verdict.passed is None and "lion" in verdict.summary


def test_accuracy_criterion_single_seed_uses_margin():
    verdict = accuracy_criterion(four(accs=(0.50, 0.495, 0.40, 0.45)), margin=0.01)
    assert verdict.passed is True and verdict.figures["matched"] == ["lion"]
    verdict = accuracy_criterion(four(accs=(0.50, 0.485, 0.40, 0.45)), margin=0.01)
    assert verdict.passed is False
    assert "single seed" in verdict.details[0]


def test_accuracy_criterion_several_seeds_uses_welch_lower_bound():
    from scipy import stats

    records = []
    adamw_accs, sf_accs = [0.50, 0.52, 0.51], [0.515, 0.52, 0.53]
    for seed, (a, s) in enumerate(zip(adamw_accs, sf_accs)):
        records += [make_record("adamw", seed, a), make_record("schedulefree", seed, s)]
    verdict = accuracy_criterion(records, margin=0.01)
    fig = verdict.figures["schedulefree"]
    # Recompute the bound by hand: mean difference minus t(0.95, Welch dof) * standard error.
    va, vb = stats.tvar(sf_accs) / 3, stats.tvar(adamw_accs) / 3
    dof = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 2)
    expected = (sum(sf_accs) - sum(adamw_accs)) / 3 - stats.t.ppf(0.95, dof) * math.sqrt(va + vb)
    assert fig["lower_bound"] == pytest.approx(expected)
    assert expected > -0.01 and verdict.passed is True
    assert "lower bound" in verdict.details[0]


def test_time_to_target_from_history():
    records = [make_record("adamw", acc=0.6, curve=[0.2, 0.4, 0.6]),
               make_record("schedulefree", acc=0.7, curve=[0.3, 0.65, 0.7]),
               make_record("lion", acc=0.5, curve=[0.2, 0.4, 0.5])]
    ttt = time_to_target(records).set_index("optimizer")
    assert ttt.loc["schedulefree", "epoch_mean"] == 2
    assert ttt.loc["schedulefree", "time_mean"] == pytest.approx(100 * 2 / 3)
    assert ttt.loc["adamw", "epoch_mean"] == 3
    assert ttt.loc["lion", "reached"] == 0


def test_mixing_workloads_is_refused():
    records = four() + [make_record("adamw", epochs=10)]
    with pytest.raises(AnalysisError, match="different workloads"):
        select_workload(records)


def test_two_settings_of_one_optimizer_are_refused():
    records = four() + [make_record("lion", hparams={"lr": 3e-4}, seed=1)]
    records[-1]["config"]["hparams"] = {"lr": 3e-4}
    with pytest.raises(AnalysisError, match="different hyperparameters"):
        select_workload(records)


def test_report_renders_lost_diverged_missing_runs(tmp_path: Path):
    records = [make_record("adamw", 0, 0.5), make_record("lion", 0, None, status="diverged"),
               make_record("schedulefree", 0, 0.55)]
    records[1]["status_detail"] = "non-finite loss at step 17"
    report = build_report(records, tmp_path, expected_optimizers=["adamw", "lion", "sophia", "schedulefree"])
    assert report.verdicts[0].passed is None  # no finished Lion run: cannot be decided
    assert report.verdicts[1].passed is True
    assert any("sophia: no record" in n for n in report.notes)
    assert any("diverged" in n and "step 17" in n for n in report.notes)
    lion = report.table.set_index("optimizer").loc["lion"]
    assert lion["diverged"] == 1 and lion["ok"] == 0
    names = {p.name for p in report.files}
    assert any(n.endswith(".csv") for n in names) and any(n.endswith("-curves.png") for n in names)


def test_report_command_on_records_dir_with_a_broken_file(tmp_path: Path):
    for i, rec in enumerate(four()):
        (tmp_path / f"r{i}.json").write_text(json.dumps(rec))
    (tmp_path / "broken.json").write_text('{"optimizer": "adamw", "sta')  # truncated
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "broken.json" in result.output and "skipped" in result.output
    assert "FAIL" in result.output and "Lion saves" in result.output
    strict = CliRunner().invoke(app, ["report", str(tmp_path), "--strict"])
    assert strict.exit_code == 4


def test_report_on_empty_or_missing_dir_is_a_clean_error(tmp_path: Path):
    result = CliRunner().invoke(app, ["report", str(tmp_path / "nope")])
    assert result.exit_code == 1 and "does not exist" in result.output
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 1 and "no run records" in result.output
    assert "Traceback" not in result.output


def test_report_to_an_unwritable_folder_is_a_clean_error(tmp_path: Path):
    for i, rec in enumerate(four()):
        (tmp_path / f"r{i}.json").write_text(json.dumps(rec))
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = CliRunner().invoke(app, ["report", str(tmp_path), "--out", str(blocker / "out")])
    assert result.exit_code == 1 and "cannot write the report files" in result.output
    assert "Traceback" not in result.output


def test_diverged_seeds_count_against_an_optimizer():
    records = []
    for seed in range(3):
        records.append(make_record("adamw", seed, 0.50))
    records += [make_record("lion", 0, 0.60), make_record("lion", 1, None, status="diverged"),
                make_record("lion", 2, None, status="diverged")]
    verdict = accuracy_criterion(records)
    assert verdict.passed is False
    assert any("2 of 3 runs did not finish" in d for d in verdict.details)


def test_a_finished_record_stands_for_its_run_over_a_newer_interrupted_one():
    ok = make_record("adamw", 0, 0.5)
    interrupted = make_record("adamw", 0, None, status="interrupted")
    interrupted["finished_at"] = "2026-11-23T00:00:00Z"
    selection = select_workload([ok, interrupted])
    assert [r["status"] for r in selection.records] == ["ok"]


def test_of_two_records_finished_in_one_second_analysis_takes_the_one_compare_and_status_take(tmp_path: Path):
    """Two finished records of one run with the same finished_at (one-second stamps), listed in name order as
    load_records lists them: the report uses the one records.newest_record names (the later start)."""
    from optbench.records import newest_record

    earlier, later = make_record("adamw", 0, 0.5), make_record("adamw", 0, 0.75)
    earlier["_path"] = str(tmp_path / "cifar100-adamw-seed0-h-20261122T000000Z.json")
    later["_path"] = str(tmp_path / "cifar100-adamw-seed0-h-20261122T000001Z.json")
    assert newest_record([earlier, later]) is later
    assert [r["final_test_acc"] for r in select_workload([earlier, later]).records] == [0.75]


def _with_what_ran(rec: dict) -> dict:
    """A record with the blocks a run writes about what ran: the model built, the environment, warnings."""
    rec = json.loads(json.dumps(rec))
    rec["config"]["patch_size"] = 4
    rec["model"] = {"name": "vit_tiny_patch16_224", "patch_size": 4, "tokens": 65, "depth": 12, "width": 192,
                    "param_count": 5_000_000, "image_size": 32}
    libraries = {"adamw": "torch", "lion": "lion-pytorch", "sophia": "pytorch-optimizer", "schedulefree": "schedulefree"}
    rec["environment"] = {"optbench": "0.1.0", "python": "3.12.1", "device": "cuda", "device_name": "NVIDIA A100",
                          "cpu_threads": 8, "packages": {"torch": "2.14.1", "timm": "1.0.31",
                                                         libraries[rec["optimizer"]]: "9.9.9"}}
    rec["optimizer_implementation"] = {"code_path": "fused" if rec["optimizer"] == "adamw" else "forloop"}
    rec["config"]["hparams"] = {"lr": {"adamw": 1e-3, "lion": 1e-4, "sophia": 1e-2, "schedulefree": 1e-3}[rec["optimizer"]],
                                "weight_decay": 0.05}
    rec["warnings"] = (["Lion at batch size 32: the lecture says that with small batches (below 64) Lion does worse"]
                       if rec["optimizer"] == "lion" else [])
    return rec


def test_title_markdown_and_csv_say_what_ran(tmp_path: Path):
    """Model as it ran in the title; each optimizer's hyperparameters, seeds, library version, device and
    versions in the Markdown and the CSV; Sophia's 3x state explained beside the state column; the
    course's common mistakes the runs made, repeated in the report."""
    records = [_with_what_ran(r) for r in four(0) + four(1)]
    report = build_report(records, tmp_path, plots=False)
    assert "ViT-Tiny, patch 4 on 32 px, depth 12, width 192" in report.title
    markdown = next(p for p in report.files if p.suffix == ".md").read_text()
    assert "ViT-Tiny, patch 4 on 32 px" in markdown.splitlines()[0]
    assert '"lr": 0.0001' in markdown and "| 0,1 " in markdown  # Lion's hyperparameters and seeds
    assert "lion-pytorch 9.9.9" in markdown and "NVIDIA A100" in markdown and "torch 2.14.1" in markdown
    assert "hessian_moment" in markdown and "3x the parameters" in markdown
    assert "Lion at batch size 32" in markdown
    csv = pd.read_csv(next(p for p in report.files if p.suffix == ".csv")).set_index("optimizer")
    assert json.loads(csv.loc["sophia", "hparams"]) == {"lr": 0.01, "weight_decay": 0.05}
    assert str(csv.loc["lion", "seeds"]) == "0,1" and csv.loc["lion", "library_version"] == "9.9.9"
    assert csv.loc["adamw", "device_name"] == "NVIDIA A100" and csv.loc["adamw", "timm"] == "1.0.31"


# --- the course's verdicts as written, and the statistics beside them --------------------------------


def _seeds(opt: str, accs: list[float]) -> list[dict]:
    return [make_record(opt, seed, acc) for seed, acc in enumerate(accs)]


def test_memory_criterion_uses_the_peak_without_the_resident_dataset_and_shows_the_one_with_it():
    """CUDA peaks hold the dataset kept on the GPU (400 MiB here), the same for both: without it Lion saves
    30% (the course's situation: a DataLoader holds one batch), with it only 18%."""
    adamw = make_record("adamw", peak=1000 * MiB, state=60 * MiB)
    lion = make_record("lion", peak=820 * MiB, state=30 * MiB)
    for rec in (adamw, lion):
        rec["dataset_device_bytes"] = 400 * MiB
    verdict = memory_criterion([adamw, lion])
    assert verdict.passed is True
    assert verdict.figures["adamw_peak_bytes"] == 600 * MiB and verdict.figures["lion_peak_bytes"] == 420 * MiB
    assert verdict.figures["peak_saving"] == pytest.approx(0.30)
    assert verdict.figures["peak_saving_with_dataset"] == pytest.approx(0.18)
    assert "without the resident dataset" in verdict.summary
    assert any("820.0 MiB vs 1,000.0 MiB, Lion saves 18.0%" in d for d in verdict.details)
    # a CPU record's peak is the probe's step peak, which holds no dataset: used as it is
    cpu = make_record("adamw", peak=100 * MiB)
    cpu["peak_memory_source"] = "torch MemTracker: tensor memory of one training step, on a copy"
    assert summary_table([cpu]).loc[0, "peak_mean"] == 100 * MiB
    assert summary_table([cpu]).loc[0, "peak_with_data_mean"] == 250 * MiB


def test_literal_passes_and_statistics_fail_both_printed_with_the_sentence(tmp_path: Path):
    """Sophia's mean is above AdamW's (the course's rule holds) but its seeds scatter so widely that the
    95% lower bound is far below -1 pp: the statistics do not support it."""
    records = _seeds("adamw", [0.50, 0.50, 0.50]) + _seeds("sophia", [0.40, 0.62, 0.50])
    report = build_report(records, tmp_path, plots=False)
    memory, literal, statistical = report.verdicts
    assert literal.passed is True and literal.key == "accuracy_literal"
    assert statistical.passed is False and statistical.figures["sophia"]["lower_bound"] < -0.01
    assert report.disagreement.startswith("The two readings disagree: by the course's rule as written sophia")
    markdown = next(p for p in report.files if p.suffix == ".md").read_text()
    assert "[PASS] at least one modern optimizer equals or beats AdamW's accuracy (the course's rule as written)" in markdown
    assert "[FAIL] at least one modern optimizer equals or beats AdamW's accuracy (statistical reading)" in markdown
    assert report.disagreement in markdown
    assert "indicative" not in markdown  # three seeds each


def test_literal_fails_and_statistics_pass_with_the_sentence():
    """Lion is 0.3 pp below AdamW on every seed: the course's rule as written fails, non-inferiority within
    1 pp holds (tight seeds, lower bound above -1 pp)."""
    records = _seeds("adamw", [0.500, 0.502, 0.501]) + _seeds("lion", [0.497, 0.499, 0.498])
    report = build_report(records, None)
    _, literal, statistical = report.verdicts
    assert literal.passed is False and statistical.passed is True
    assert statistical.figures["lion"]["lower_bound"] > -0.01
    assert "the course's rule as written fails, but lion is within the 1.0 pp non-inferiority margin" \
        in report.disagreement
    agreeing = build_report(_seeds("adamw", [0.50, 0.51, 0.505]) + _seeds("lion", [0.52, 0.53, 0.525]), None)
    assert [v.passed for v in agreeing.verdicts[1:]] == [True, True] and agreeing.disagreement is None


def test_margin_zero_is_named_a_superiority_or_equal_test():
    records = _seeds("adamw", [0.500, 0.502, 0.501]) + _seeds("lion", [0.497, 0.499, 0.498])
    zero = accuracy_criterion(records, margin=0.0)
    assert "superiority-or-equal test (margin 0)" in zero.details[0] and zero.passed is False
    assert "non-inferiority within 1.0 pp" in accuracy_criterion(records, margin=0.01).details[0]


def test_single_seed_accuracy_verdicts_are_labelled_indicative():
    report = build_report(four(accs=(0.50, 0.51, 0.40, 0.45)), None)
    _, literal, statistical = report.verdicts
    for verdict in (literal, statistical):
        assert verdict.qualifier == "indicative"
        assert verdict_text(verdict)[0].startswith("[PASS, indicative]")
        assert any("one seed per optimizer" in d and "--seeds 0,1,2" in d for d in verdict.details)


@pytest.mark.parametrize("rule,code", [("literal", 0), ("statistical", 4), ("both", 4)])
def test_strict_names_the_rule_it_enforces_and_exits_by_it(tmp_path: Path, rule, code):
    """Memory passes (Lion 60% of AdamW's peak); accuracy: the literal rule passes, the statistics fail."""
    records = _seeds("adamw", [0.50, 0.50, 0.50]) + _seeds("sophia", [0.40, 0.62, 0.50]) + [
        make_record("lion", seed, 0.3, peak=int(0.4 * 1000 * MiB), state=20 * MiB) for seed in range(3)]
    for rec in records:
        rec["dataset_device_bytes"] = 0
    for i, rec in enumerate(records):
        (tmp_path / f"r{i}.json").write_text(json.dumps(rec))
    result = CliRunner().invoke(app, ["report", str(tmp_path), "--strict", "--rule", rule])
    text = " ".join(result.output.split())
    assert result.exit_code == code, result.output
    assert f"--strict --rule {rule} enforces the memory criterion and, for accuracy," in text
    bad = CliRunner().invoke(app, ["report", str(tmp_path), "--strict", "--rule", "loose"])
    assert bad.exit_code == 1 and "--rule must be one of literal, statistical, both" in bad.output
