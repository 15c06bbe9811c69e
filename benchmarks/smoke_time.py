"""Wall time of `optbench compare --preset smoke` at two commits, interleaved.

    .venv/bin/python benchmarks/smoke_time.py --base 13a3822 --head HEAD --pairs 2

Each commit is exported with `git archive` into a temporary folder and run with the current venv's
Python and libraries (PYTHONPATH points at the export), so only optbench's own code differs. Runs are
interleaved in ABBA order (pair 1: base then head, pair 2: head then base, ...) so a load that drifts
over the session falls on both alike; every run gets a fresh results folder (nothing reused, the
probe/FLOP cache cold for both) and the same, already written, digits split. OMP_NUM_THREADS and the
torch threads are pinned (default 1). The machine may be shared: each run's line shows the 1-minute load
average before and after it, and the summary gives median and min-max per commit, never one figure.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def export(ref: str, into: Path) -> str:
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", ref], check=True, capture_output=True,
                            text=True).stdout.strip()
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return commit


def load() -> float:
    return os.getloadavg()[0]


def one_run(code: Path, work: Path, data_dir: Path, threads: int, extra: list[str]) -> float:
    work.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env.pop("OPTBENCH_CONFIG_DIR", None)
    argv = [sys.executable, "-m", "optbench", "compare", "--preset", "smoke", "--results-dir", str(work / "results"),
            "--data-dir", str(data_dir), "--quiet", *extra]
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode not in (0, 4):  # 4: a course criterion failed, which is a result, not an error
        raise SystemExit(f"{code.name}: exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="13a3822")
    parser.add_argument("--head", default="HEAD")
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("extra", nargs="*", help="more compare options (after --), e.g. -- --epochs 2")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="smoke-time-"))
    codes = {"base": root / "base", "head": root / "head"}
    names = {"base": export(args.base, codes["base"]), "head": export(args.head, codes["head"])}
    data_dir = root / "data"
    # The digits split is written once, before any timed run, by the head's code.
    subprocess.run([sys.executable, "-c", f"from optbench.data import load_dataset; load_dataset('digits', {str(data_dir)!r})"],
                   env={**os.environ, "PYTHONPATH": str(codes["head"])}, check=True)
    print(f"optbench compare --preset smoke {' '.join(args.extra)}: {names['base']} (base) vs {names['head']} (head), "
          f"{args.pairs} interleaved pairs (ABBA), OMP_NUM_THREADS={args.threads}, {os.cpu_count()} CPUs, in {root}",
          flush=True)
    walls: dict[str, list[float]] = {"base": [], "head": []}
    for pair in range(args.pairs):
        order = ("base", "head") if pair % 2 == 0 else ("head", "base")
        for which in order:
            before = load()
            wall = one_run(codes[which], root / f"run-{pair}-{which}", data_dir, args.threads, args.extra)
            walls[which].append(wall)
            print(f"  pair {pair + 1} {which:4s} {names[which]}: {wall:7.1f} s   (load {before:.1f} -> {load():.1f})",
                  flush=True)
    for which in ("base", "head"):
        w = walls[which]
        print(f"{which} {names[which]}: median {statistics.median(w):.1f} s, min-max {min(w):.1f}-{max(w):.1f} s "
              f"over {len(w)} runs")
    ratio = statistics.median(walls["head"]) / statistics.median(walls["base"])
    print(f"head / base, medians: {ratio:.3f} ({ratio - 1:+.1%}); per pair: "
          + ", ".join(f"{h / b:.3f}" for h, b in zip(walls["head"], walls["base"])))


if __name__ == "__main__":
    main()
