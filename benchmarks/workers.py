"""Wall time of `optbench compare --preset smoke`: serial (one process, --threads 1) vs --workers 2 (two
processes, 1 thread each), interleaved, and whether both give the same records.

    .venv/bin/python benchmarks/workers.py --pairs 2

Runs are interleaved in ABBA order (pair 1: serial then workers, pair 2: workers then serial, ...) so a
load that drifts over the session falls on both alike; every run gets a fresh results folder (nothing
reused, the probe/FLOP cache cold for both). Both modes run each run at 1 torch thread (OMP_NUM_THREADS=1),
so their records must be equal: the script checks that every run has exactly one record and that each
run's final_weights_sha256 is the same in every repeat of both modes. The machine may be shared: each
line shows the 1-minute load average before and after, and the summary gives median and min-max per mode.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODES = {"serial": ["--threads", "1"], "workers2": ["--workers", "2"]}


def run(mode: str, results: Path, extra: list[str]) -> tuple[float, dict[tuple[str, int], str], list[float]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    args = [sys.executable, "-m", "optbench", "compare", "--preset", "smoke", "--quiet", "--results-dir", str(results),
            *MODES[mode], *extra]
    start = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{mode} failed ({done.returncode}): {done.stderr[-2000:]}")
    records = [json.loads(p.read_text()) for p in results.glob("*.json")]
    counts = Counter(r["config_hash"] for r in records)
    if set(counts.values()) != {1}:
        raise SystemExit(f"{mode}: a run has more than one record: {counts}")
    digests = {(r["optimizer"], r["config"]["seed"]): r["final_weights_sha256"] for r in records}
    return wall, digests, [r["total_wall_time_s"] for r in records]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more compare options")
    args = parser.parse_args()
    walls: dict[str, list[float]] = {m: [] for m in MODES}
    per_run: list[float] = []
    reference: dict | None = None
    with tempfile.TemporaryDirectory() as tmp:
        for pair in range(args.pairs):
            order = list(MODES) if pair % 2 == 0 else list(reversed(MODES))
            for mode in order:
                before = os.getloadavg()[0]
                wall, digests, run_times = run(mode, Path(tmp) / f"{mode}-{pair}", args.extra)
                walls[mode].append(wall)
                if mode == "serial":
                    per_run += run_times
                reference = reference or digests
                same = digests == reference
                print(f"pair {pair + 1} {mode:9s} {wall:7.1f} s  runs {len(digests)}  weights equal to the first "
                      f"repeat: {same}  load {before:.1f} -> {os.getloadavg()[0]:.1f}", flush=True)
                if not same:
                    raise SystemExit("records differ between repeats/modes: see final_weights_sha256")
    for mode, values in walls.items():
        print(f"{mode:9s} median {statistics.median(values):7.1f} s  min-max {min(values):.1f}-{max(values):.1f} s "
              f"({len(values)} runs)")
    ratio = [s / w for s, w in zip(walls["serial"], walls["workers2"])]
    print(f"serial / workers2 per pair: median {statistics.median(ratio):.2f}x  min-max {min(ratio):.2f}-{max(ratio):.2f}x")
    print(f"one smoke run (serial, record total_wall_time_s): median {statistics.median(per_run):.1f} s  "
          f"min-max {min(per_run):.1f}-{max(per_run):.1f} s ({len(per_run)} runs)")


if __name__ == "__main__":
    main()
