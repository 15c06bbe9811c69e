"""benchmarks/run.py --quick works and prints every ratio with its target and verdict.

Runs the sections that need no Lightning (data pipeline, training step, optimizers). Without the bench
extra the end-to-end section is asked for too and must be skipped with a printed reason; with it, the
section is left out to keep this test short (`make bench` runs it).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "run.py"
RATIO = r"RATIO \[{id}\] .+: \d+\.\d+x\s+target (>=|<=) \d+(\.\d+)?x\s+(PASS|MISS)"


def test_quick_benchmark_prints_each_ratio_with_target():
    have_lightning = importlib.util.find_spec("lightning") is not None
    sections = "data,step,sophia" + ("" if have_lightning else ",e2e")
    threads = os.environ.get("OPTBENCH_TEST_THREADS", "1")  # as conftest.py: one intra-op thread on a shared machine
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--sections", sections, "--threads", threads],
                          capture_output=True, text=True, timeout=300, cwd=SCRIPT.parent.parent)
    out = proc.stdout
    assert proc.returncode == 0, f"benchmarks/run.py failed:\n{out[-3000:]}\n{proc.stderr[-3000:]}"
    for rid in ("1", "2", "3"):
        assert re.search(RATIO.format(id=rid), out), f"ratio [{rid}] with target and verdict missing:\n{out}"
    summary = out.split("SUMMARY", 1)[1]
    for rid, target in (("1", ">= 10x"), ("2", "<= 1.05x"), ("3", "<= 1.35x")):
        assert re.search(rf"^{rid}\s+.+\d+\.\d+x\s+{re.escape(target)}\s+(PASS|MISS)", summary, re.M), summary
    assert re.search(rf"machine: .+, \d+ cores .+torch threads {threads}\b", summary)
    assert "versions: " in summary and "torch " in summary
    if not have_lightning:
        assert re.search(r"\[4\] End to end against PyTorch Lightning: SKIPPED: lightning is not importable", out)


def test_setup_cost_imports_and_ceiling_sections_print_their_figures():
    """benchmarks/setup_cost.py (issue 17) keeps working on the real model and registry: the import anatomy
    and the ceiling (a smoke step's share in matrix products, their rate) print figures that are possible."""
    script = SCRIPT.parent / "setup_cost.py"
    proc = subprocess.run([sys.executable, str(script), "--sections", "imports,ceiling", "--pairs", "1"],
                          capture_output=True, text=True, timeout=300, cwd=SCRIPT.parent.parent,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    out = proc.stdout
    assert proc.returncode == 0, f"benchmarks/setup_cost.py failed:\n{out[-3000:]}\n{proc.stderr[-3000:]}"
    assert re.search(r"^imports torch s: median \d+\.\d+", out, re.M), out
    share = re.search(r"^ceiling share of the step's CPU time in matrix products .+: median (\d+\.\d+)", out, re.M)
    assert share and 0.0 < float(share.group(1)) <= 1.0, out
    rates = re.search(r"matrix products run at (\d+) GFLOP/s; a 1024\^2 fp32 product on this core at (\d+) GFLOP/s", out)
    assert rates and int(rates.group(1)) > 0 and int(rates.group(2)) > 0, out
    assert "aten::mm" in out  # the step's largest operators are named


def test_the_checkpoint_and_record_lookup_benchmarks_run_and_print_their_figures(tmp_path):
    """benchmarks/checkpoint_cost.py and record_lookup.py at their smallest: every line the README quotes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root = SCRIPT.parent.parent
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "checkpoint_cost.py"), "--repeats", "1",
                           "--dir", str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("save: torch.save", "save: before (v2)", "save: now", "load: before (v2)", "load: now",
                 "part: SHA-256 of the blob", "part: fsync"):
        assert re.search(rf"^{re.escape(name)} +median +\d+\.\d ms +\(min +\d+\.\d, max +\d+\.\d, n=1\)$", proc.stdout,
                         re.M), (name, proc.stdout)
    assert re.search(r"^save: now / before, per round: median \d+\.\d\dx", proc.stdout, re.M), proc.stdout
    assert re.search(r"^save: now +peak Python heap during the save \(tracemalloc\): \d+\.\d MB", proc.stdout, re.M)
    assert list(tmp_path.iterdir()) == []  # its files removed
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "record_lookup.py"), "--records", "20",
                           "--repeats", "1"], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"^one look, now: the run's own files read +median +\d+\.\d\d ms", proc.stdout, re.M), proc.stdout
    assert list(tmp_path.iterdir()) == []
