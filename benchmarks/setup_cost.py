"""Whole-process cost of a run (issue 17): set-up with and without reuse, compare end to end, vs timm's train.py.

    .venv/bin/python benchmarks/setup_cost.py --timm-train PATH/train.py [--before SRC] [--pairs 3]
    .venv/bin/python benchmarks/setup_cost.py --sections setup,dryrun --before /tmp/optbench-before

Sections (every process runs with OMP_NUM_THREADS=MKL_NUM_THREADS=1 and one intra-op torch thread;
the two sides of a comparison alternate, A B A B ..., and the median and min-max are printed):
  imports where a fresh process's import time goes, stage by stage in the order a run meets them: the CLI
          (typer, rich, yaml, the registry), torch, torch._dynamo (torch.optim imports it when the first
          optimizer is built, torchvision.ops when it is imported), torchvision (timm.layers imports it),
          timm (its package init imports every layer and model module), the library versions.
  dryrun  `optbench run -o adamw --preset smoke --dry-run`: process wall time.
  setup   a smoke run (`run -o adamw --preset smoke --epochs 1`) twice in a fresh results and data folder:
          set-up = record's total_wall_time_s - train_wall_time_s - eval_wall_time_s (the record's own
          clock: from run_experiment's start, so it holds the dataset, model, FLOP count and memory probe,
          but not the process's imports of torch and the CLI), and the whole process's time outside
          training (process wall - training - evaluation). The first run measures (cold), the second
          reuses the probe, the FLOP count and the digits split (warm). With --before, the same for that
          source tree (e.g. a worktree of the commit before issue 17), interleaved.
  inproc  a second smoke run in the same process, as `compare` runs seeds and `tune` runs trials:
          `compare --preset smoke --optimizers adamw --seeds 0,1,2` (8 epochs each), set-up in each record.
          compare loads the dataset once before the first run (outside both records' clocks).
  compare `optbench compare --preset smoke` end to end (four optimizers, fresh results folder), after and,
          with --before, before.
  timm    whole process: `optbench run -o adamw --preset smoke` against timm's train.py on the same
          workload: ViT-Tiny (timm), depth 4, patch 2, 8x8 one-channel digits (the same 1,437/360 split,
          written once as an image folder train/ validation/ with one PNG per image: the folder layout
          train.py reads natively, no change to the script), batch 32, AdamW lr 1e-3 weight decay 0.05,
          8 epochs, cosine per step with warmup, no augmentation, no label smoothing, evaluation each
          epoch, data loading in the main process (-j 0), CPU. Differences we cannot remove: timm's
          training loader drops the last partial batch (44 steps per epoch, 352 in all; optbench 45, 360),
          timm warms up in whole epochs (1 epoch; optbench 36 steps = 10% of the run) from warmup-lr 0,
          saves checkpoints (--checkpoint-hist 1), and decodes PNGs each epoch (that is what train.py does).
          optbench runs warm (its cache filled by one earlier run, as in any compare or tune after the first
          run); a cold optbench run is printed too. Each pair alternates which side runs first. Besides
          wall time, each process's CPU time (user + system, from getrusage) is printed: on a shared
          machine it moves much less with the load than wall time does.
  ceiling what the training itself leaves to gain: one smoke training step (optbench's model, registry optimizer
          and training_step, one thread) under torch.profiler, its CPU time split into matrix products
          (aten::mm, addmm, bmm, baddbmm: the same kernels in both programs) and the rest; the matrix products'
          rate against a large square product's on this core. With the timm section's figures it prints the
          whole-process ratio optbench would reach if everything of its training but the matrix products
          cost nothing: a floor no implementation of the same model reaches.

timm's train.py is not in the timm wheel nor in its source distribution on PyPI (timm-1.0.31.tar.gz holds
only the package): pass --timm-train with a copy of train.py from github.com/huggingface/pytorch-image-models
at the tag nearest the installed timm (kept outside the package, not committed).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("imports", "dryrun", "setup", "inproc", "compare", "timm", "ceiling")


def env_for(src: Path) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(src))
    return env


def timed_cpu(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float, str]:
    """(process wall s, process CPU s = user + system of the child, its stdout)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc.stdout


def timed(cmd: list[str], env: dict[str, str], cwd: Path) -> float:
    return timed_cpu(cmd, env, cwd)[0]


def optbench_cmd(*args: str) -> list[str]:
    # `import torch; torch.set_num_threads(1)` is what OMP_NUM_THREADS=1 already gives; the CLI as a user runs it.
    return [sys.executable, "-m", "optbench.cli", *args]


def stats(values: list[float]) -> str:
    return f"median {statistics.median(values):.2f} (min {min(values):.2f}, max {max(values):.2f}, n={len(values)})"


def newest_record(results: Path) -> dict[str, Any]:
    return json.loads(max(results.glob("*.json"), key=lambda p: p.stat().st_mtime).read_text())


def load_note() -> str:
    return f"load average at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (shared machine)"


def bench_dryrun(srcs: dict[str, Path], pairs: int, out: dict[str, Any]) -> None:
    times: dict[str, list[float]] = {name: [] for name in srcs}
    for _ in range(pairs):
        for name, src in srcs.items():
            with tempfile.TemporaryDirectory() as tmp:
                times[name].append(timed(optbench_cmd("run", "-o", "adamw", "--preset", "smoke", "--dry-run"),
                                         env_for(src), Path(tmp)))
    for name, values in times.items():
        print(f"dryrun [{name}] `optbench run --dry-run` wall s: {stats(values)}")
    out["dryrun"] = times


def smoke_run(src: Path, cwd: Path, results: Path, epochs: int | None = 1) -> tuple[float, dict[str, Any]]:
    extra = ["--epochs", str(epochs)] if epochs else []
    wall = timed(optbench_cmd("run", "-o", "adamw", "--preset", "smoke", *extra, "--results-dir", str(results), "-q"),
                 env_for(src), cwd)
    return wall, newest_record(results)


def bench_setup(srcs: dict[str, Path], pairs: int, out: dict[str, Any]) -> None:
    rows: dict[str, dict[str, list[float]]] = {name: {} for name in srcs}
    for _ in range(pairs):
        for name, src in srcs.items():
            with tempfile.TemporaryDirectory() as tmp:
                for label in ("first", "second"):
                    wall, rec = smoke_run(src, Path(tmp), Path(tmp) / "results")
                    inside = rec["total_wall_time_s"] - rec["train_wall_time_s"] - rec["eval_wall_time_s"]
                    outside = wall - rec["train_wall_time_s"] - rec["eval_wall_time_s"]
                    rows[name].setdefault(f"{label} run: set-up in the record", []).append(inside)
                    rows[name].setdefault(f"{label} run: process outside training", []).append(outside)
                    rows[name].setdefault(f"{label} run: process wall", []).append(wall)
    for name, table in rows.items():
        for label, values in table.items():
            print(f"setup [{name}] {label} s: {stats(values)}")
    out["setup"] = rows


IMPORT_STAGES = '''
import json, time
stages, t = {}, time.perf_counter()
def mark(name):
    global t
    now = time.perf_counter(); stages[name] = now - t; t = now
import optbench.cli; mark("optbench.cli (typer, rich, yaml, the registry)")
import torch; mark("torch")
import torch._dynamo; mark("torch._dynamo (torch.optim imports it at the first optimizer; torchvision.ops too)")
import torchvision; mark("torchvision (timm.layers imports torchvision.ops)")
import timm; mark("timm (its package init: every layer and model module, timm.data, its hub code)")
from optbench.optimizers import library_versions; library_versions(); mark("library versions (importlib.metadata)")
print(json.dumps(stages))
'''


def bench_imports(srcs: dict[str, Path], pairs: int, out: dict[str, Any]) -> None:
    """Where a fresh process's import time goes, stage by stage, in the order a run meets them."""
    rows: dict[str, list[float]] = {}
    for _ in range(pairs):
        with tempfile.TemporaryDirectory() as tmp:
            _, _, stdout = timed_cpu([sys.executable, "-c", IMPORT_STAGES], env_for(srcs["after"]), Path(tmp))
        for stage, seconds in json.loads(stdout.strip().splitlines()[-1]).items():
            rows.setdefault(stage, []).append(seconds)
    for stage, values in rows.items():
        print(f"imports {stage} s: {stats(values)}")
    print(f"imports total s: {stats([sum(v) for v in zip(*rows.values())])}")
    out["imports"] = rows


def bench_inproc(srcs: dict[str, Path], pairs: int, out: dict[str, Any]) -> None:
    """A second smoke run in the same process (as `compare` runs seeds and `tune` runs trials): set-up in the
    record of seed 0 (measures the probe and the FLOP count) and of seeds 1 and 2 (reuse both), 8 epochs each."""
    rows: dict[str, dict[str, list[float]]] = {name: {} for name in srcs}
    for _ in range(pairs):
        for name, src in srcs.items():
            with tempfile.TemporaryDirectory() as tmp:
                results = Path(tmp) / "results"
                timed(optbench_cmd("compare", "--preset", "smoke", "--optimizers", "adamw", "--seeds", "0,1,2",
                                   "--results-dir", str(results), "-q"), env_for(src), Path(tmp))
                records = sorted((json.loads(p.read_text()) for p in results.glob("digits-*.json")),
                                 key=lambda r: r["config"]["seed"])
                for rec in records:
                    label = "first (seed 0)" if rec["config"]["seed"] == 0 else "later (seeds 1, 2)"
                    inside = rec["total_wall_time_s"] - rec["train_wall_time_s"] - rec["eval_wall_time_s"]
                    rows[name].setdefault(label, []).append(inside)
    for name, table in rows.items():
        for label, values in table.items():
            print(f"inproc [{name}] `compare --optimizers adamw --seeds 0,1,2`, {label} run: set-up in the record s: "
                  f"{stats(values)}")
    out["inproc"] = rows


def bench_compare(srcs: dict[str, Path], pairs: int, out: dict[str, Any]) -> None:
    times: dict[str, list[float]] = {name: [] for name in srcs}
    for _ in range(pairs):
        for name, src in srcs.items():
            with tempfile.TemporaryDirectory() as tmp:
                times[name].append(timed(optbench_cmd("compare", "--preset", "smoke", "--results-dir",
                                                      str(Path(tmp) / "results"), "-q"), env_for(src), Path(tmp)))
    for name, values in times.items():
        print(f"compare [{name}] `optbench compare --preset smoke` wall s: {stats(values)}")
    out["compare"] = times


def digits_image_folder(root: Path) -> tuple[list[float], list[float]]:
    """optbench's digits split as train/ and validation/ folders of 8x8 grey PNGs; returns (mean, std)."""
    sys.path.insert(0, str(ROOT))
    from PIL import Image

    from optbench.data import load_dataset

    data = load_dataset("digits", data_dir=root / "npz")
    for split, xs, ys in (("train", data.train_x, data.train_y), ("validation", data.test_x, data.test_y)):
        for i, (x, y) in enumerate(zip(xs.numpy(), ys.tolist())):
            folder = root / split / str(y)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x[0], mode="L").save(folder / f"{i:05d}.png")
    return data.mean.tolist(), data.std.tolist()


def timm_cmd(train_py: Path, data_dir: Path, output: Path, mean: list[float], std: list[float]) -> list[str]:
    return [sys.executable, str(train_py), "--data-dir", str(data_dir), "--model", "vit_tiny_patch16_224",
            "--model-kwargs", "depth=4", "patch_size=2", "img_size=8", "--in-chans", "1", "--input-size", "1", "8", "8",
            "--num-classes", "10", "-b", "32", "--validation-batch-size", "512", "--opt", "adamw", "--lr", "1e-3",
            "--weight-decay", "0.05", "--sched", "cosine", "--sched-on-updates", "--epochs", "8",
            "--warmup-epochs", "1", "--warmup-lr", "0", "--min-lr", "0", "--cooldown-epochs", "0", "--no-aug",
            "--smoothing", "0", "--crop-pct", "1.0", "--interpolation", "bilinear", "--mean", *map(str, mean),
            "--std", *map(str, std), "-j", "0", "--no-prefetcher", "--device", "cpu", "--seed", "0",
            "--log-interval", "1000", "--checkpoint-hist", "1", "--output", str(output)]


def bench_timm(src: Path, train_py: Path, pairs: int, out: dict[str, Any]) -> None:
    work = Path(tempfile.mkdtemp(prefix="optbench-vs-timm-"))
    try:
        mean, std = digits_image_folder(work / "digits")
        results = work / "results"
        cold, cold_rec = smoke_run(src, work, results, epochs=None)  # fills the cache: later runs are warm
        ob, tm, ratios, setups, ob_cpu, tm_cpu, cpu_ratios = [], [], [], [], [], [], []
        run_args = ("run", "-o", "adamw", "--preset", "smoke", "--results-dir", str(results), "-q")
        for i in range(pairs):
            # Alternate which side goes first, so a load change between the two halves of a pair cancels out.
            sides = [("optbench", lambda: timed_cpu(optbench_cmd(*run_args), env_for(src), work)),
                     ("timm", lambda i=i: timed_cpu(timm_cmd(train_py, work / "digits", work / f"timm-out-{i}", mean,
                                                             std), dict(env_for(src), PYTHONPATH=""), work))]
            measured = {}
            for side, run in (sides if i % 2 == 0 else sides[::-1]):
                measured[side] = run()[:2]
            (a, a_cpu), (b, b_cpu) = measured["optbench"], measured["timm"]
            rec = newest_record(results)
            ob.append(a), tm.append(b), ob_cpu.append(a_cpu), tm_cpu.append(b_cpu)
            ratios.append(a / b)
            cpu_ratios.append(a_cpu / b_cpu)
            setups.append(rec["total_wall_time_s"] - rec["train_wall_time_s"] - rec["eval_wall_time_s"])
            print(f"  pair {i}: optbench {a:.1f} s wall, {a_cpu:.1f} s CPU (test acc {rec['final_test_acc']:.3f}); "
                  f"timm train.py {b:.1f} s wall, {b_cpu:.1f} s CPU; load {os.getloadavg()[0]:.1f}", flush=True)
        summary = work / "timm-out-0"
        accs = sorted(summary.rglob("summary.csv"))
        if accs:
            print(f"  timm's last epoch (pair 0; epoch, train loss, eval loss, top1, top5, lr): "
                  f"{accs[0].read_text().strip().splitlines()[-1]}")
        print(f"timm optbench (first, cold) process wall s: {cold:.1f}")
        print(f"timm optbench (warm) process wall s: {stats(ob)}; CPU s: {stats(ob_cpu)}")
        print(f"timm optbench 8-epoch smoke run, set-up in the record (total - train - eval) s: first (cold) "
              f"{cold_rec['total_wall_time_s'] - cold_rec['train_wall_time_s'] - cold_rec['eval_wall_time_s']:.2f}, "
              f"later (warm) {stats(setups)}")
        print(f"timm timm train.py process wall s: {stats(tm)}; CPU s: {stats(tm_cpu)}")
        print(f"RATIO optbench / timm train.py (whole process, wall): {stats(ratios)}  target <= 0.80  "
              f"{'PASS' if statistics.median(ratios) <= 0.8 else 'MISS'}")
        print(f"ratio optbench / timm train.py (whole process, CPU time, less sensitive to load): {stats(cpu_ratios)}")
        out["timm"] = {"optbench": ob, "timm": tm, "ratios": ratios, "optbench_cpu": ob_cpu, "timm_cpu": tm_cpu,
                       "cpu_ratios": cpu_ratios, "optbench_cold": cold, "optbench_setup": setups}
    finally:
        shutil.rmtree(work, ignore_errors=True)


CEILING_STEP = '''
import json, time, torch
from torch.profiler import profile, ProfilerActivity
torch.set_num_threads(1)
from optbench.config import resolve_config
from optbench.data import load_dataset, train_batches
from optbench.experiment import build_training
from optbench.optimizers import get_entry
from optbench.train import training_step
config = resolve_config("adamw", "smoke")
data = load_dataset(config.dataset, DATA_DIR)
entry = get_entry(config.optimizer)
built = build_training(config, entry, data, torch.device("cpu"))  # what the run trains, from the run's own builder
model, optimizer, amp, total = built.model, built.built.optimizer, built.amp, built.total_steps
batches = list(train_batches(data, config.batch_size, config.seed, 1, config.augment))
model.train()
def steps(n):
    for i in range(n):
        x, y = batches[i % len(batches)]
        training_step(model, optimizer, entry, x, y, amp, False)
steps(10)
start = time.process_time(); steps(40); plain = (time.process_time() - start) / 40
with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
    steps(40)
gemm = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}
events = prof.key_averages()
total_us = sum(e.self_cpu_time_total for e in events)
gemm_us = sum(e.self_cpu_time_total for e in events if e.key in gemm)
gemm_flops = sum(e.flops for e in events if e.key in gemm)
a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
for _ in range(3): a @ b
start = time.perf_counter(); [a @ b for _ in range(20)]; square = 2 * 1024 ** 3 * 20 / (time.perf_counter() - start)
print(json.dumps({"step_cpu_s": plain, "steps": total, "gemm_share": gemm_us / total_us, "square_gflops": square / 1e9, "gemm_gflops": gemm_flops / gemm_us / 1e3,
                  "top": [(e.key, e.self_cpu_time_total / total_us) for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:6]]}))
'''


def bench_ceiling(src: Path, pairs: int, out: dict[str, Any]) -> None:
    """The share of a training step's CPU time spent in matrix products, and the floor it puts on the
    whole-process ratio against timm's train.py (see the module docstring)."""
    shares, steps = [], []
    with tempfile.TemporaryDirectory() as tmp:
        script = CEILING_STEP.replace("DATA_DIR", repr(str(Path(tmp) / "data")))
        for _ in range(pairs):
            _, _, stdout = timed_cpu([sys.executable, "-c", script], env_for(src), Path(tmp))
            row = json.loads(stdout.strip().splitlines()[-1])
            shares.append(row["gemm_share"])
            steps.append(row["step_cpu_s"])
    print(f"ceiling smoke training step, CPU ms: {stats([1000 * s for s in steps])}")
    print(f"ceiling share of the step's CPU time in matrix products (mm/addmm/bmm/baddbmm): {stats(shares)}")
    print("ceiling the step's largest operators (share of its CPU time): "
          + ", ".join(f"{name} {share:.1%}" for name, share in row["top"]))
    print(f"ceiling the step's matrix products run at {row['gemm_gflops']:.0f} GFLOP/s; a 1024^2 fp32 product on this "
          f"core at {row['square_gflops']:.0f} GFLOP/s")
    result = {"step_cpu_s": steps, "gemm_share": shares, "square_gflops": row["square_gflops"],
              "gemm_gflops": row["gemm_gflops"]}
    timm = out.get("timm")
    if timm:
        # Whole process = imports and set-up + training; the floor removes everything of the training but its
        # matrix products, which timm's train.py runs with the same kernels on the same shapes.
        share = statistics.median(shares)
        run_steps = row["steps"]
        train_cpu = run_steps * statistics.median(steps)
        floor_cpu = statistics.median(timm["optbench_cpu"]) - (1 - share) * train_cpu
        floor = floor_cpu / statistics.median(timm["timm_cpu"])
        print(f"ceiling floor of optbench / timm train.py (CPU time) if all of optbench's training but its matrix "
              f"products were free: {floor:.2f}x (optbench {statistics.median(timm['optbench_cpu']):.1f} s CPU, of which "
              f"training ~{train_cpu:.1f} s over {run_steps} steps; timm {statistics.median(timm['timm_cpu']):.1f} s)")
        result["floor_cpu_ratio"] = floor
    out["ceiling"] = result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--pairs", type=int, default=3, help="interleaved repeats per side")
    parser.add_argument("--before", type=Path, help="source tree of optbench before the change (a git worktree)")
    parser.add_argument("--timm-train", type=Path, help="timm's train.py (see the module docstring)")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args(argv)
    sections = args.sections.split(",")
    srcs = {"after": ROOT, **({"before": args.before.resolve()} if args.before else {})}
    print(load_note())
    out: dict[str, Any] = {"load_average_start": os.getloadavg()}
    if "imports" in sections:
        bench_imports(srcs, args.pairs, out)
    if "dryrun" in sections:
        bench_dryrun(srcs, args.pairs, out)
    if "setup" in sections:
        bench_setup(srcs, args.pairs, out)
    if "inproc" in sections:
        bench_inproc(srcs, max(1, args.pairs // 2), out)
    if "compare" in sections:
        bench_compare(srcs, max(1, args.pairs // 2), out)
    if "timm" in sections:
        if not args.timm_train or not args.timm_train.is_file():
            print("timm: SKIPPED: pass --timm-train PATH/train.py (not shipped in timm's wheel or sdist)")
        else:
            bench_timm(ROOT, args.timm_train, args.pairs, out)
    if "ceiling" in sections:
        bench_ceiling(ROOT, args.pairs, out)
    out["load_average_end"] = os.getloadavg()
    print(load_note().replace("at start", "at end"))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
