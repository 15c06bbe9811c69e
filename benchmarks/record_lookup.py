"""What one run's look for its finished record costs in a results folder of N records, before and now.

    .venv/bin/python benchmarks/record_lookup.py [--records 1000] [--repeats 9]

`compare` (under each run's lock), `run --resume`, the workers and `tune` look once per run whether the run
has a finished record. Before, each look read and checked every record of the folder (`finished_runs(...)
.get(hash)`), so a grid of N runs read N^2 records; now a look reads the files named for its run only
(`find_finished`, records.records_of_runs: the folder is listed, not read). The folder is filled with N
records as `optbench run` writes them (a 50-epoch history with diagnostics, about 20 KB each, every one
another run); the look is for one of them. Interleaved rounds, median and min-max, load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from optbench.config import identity_hash, identity_of  # noqa: E402
from optbench.records import find_finished, load_records, write_record  # noqa: E402


def find_finished_before(results_dir: str, config_hash: str) -> dict | None:
    """records.find_finished as it was at f6c3f24 (finished_runs(results_dir).get(config_hash)), verbatim."""
    newest: dict[str, dict] = {}
    for rec in load_records(results_dir).records:
        if rec["status"] in ("ok", "diverged") and rec.get("finished_at", "") >= \
                newest.get(rec["config_hash"], {}).get("finished_at", ""):
            newest[rec["config_hash"]] = rec
    return newest.get(config_hash)


def record(seed: int, epochs: int = 50) -> dict:
    config = {"optimizer": "adamw", "hparams": {"lr": 1e-3, "weight_decay": 0.05, "betas": [0.9, 0.999]},
              "dataset": "cifar100", "model": "vit_tiny_patch16_224", "patch_size": 4, "depth": 12,
              "epochs": epochs, "batch_size": 128, "eval_batch_size": 512, "seed": seed, "subset": None,
              "test_subset": None, "augment": True, "warmup_steps": 500, "device": "cuda", "precision": "bf16",
              "compile": False, "memory_probe": True, "threads": 1, "validation_fraction": 0.0,
              "validation_seed": 0, "preset": "cifar100", "data_dir": "data", "download": True,
              "results_dir": "results", "log_every": 10}
    history = [{"epoch": e, "train_loss": 2.0 / e, "test_loss": 2.1 / e, "test_acc": min(0.9, 0.02 * e),
                "train_time_s": 30.0 * e, "train_cpu_time_s": 29.0 * e, "steps": 391 * e, "lr": 1e-3,
                "diagnostics": {"grad_norm": 1.0, "update_norm": 0.01, "update_to_weight": 1e-3,
                                "state_norm": 3.0}} for e in range(1, epochs + 1)]
    return {"schema_version": 1, "optimizer": "adamw", "status": "ok", "config": config,
            "config_hash": identity_hash(identity_of(config)), "final_test_acc": history[-1]["test_acc"],
            "train_wall_time_s": 30.0 * epochs, "history": history, "epochs_completed": epochs,
            "started_at": "2026-01-01T00:00:00Z", "finished_at": "2026-01-01T01:00:00Z"}


def stats(values: list[float]) -> str:
    return (f"median {statistics.median(values) * 1000:8.2f} ms  (min {min(values) * 1000:8.2f}, "
            f"max {max(values) * 1000:8.2f}, n={len(values)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="optbench-lookup-", dir=Path.cwd()) as folder:
        sought = None
        for seed in range(args.records):
            write_record(folder, record(seed))
            sought = sought or record(seed)["config_hash"]
        size = sum(p.stat().st_size for p in Path(folder).glob("*.json"))
        looks = {"before: every record read": lambda: find_finished_before(folder, sought),
                 "now: the run's own files read": lambda: find_finished(folder, sought)}
        assert all(look()["config_hash"] == sought for look in looks.values())
        times = {name: [] for name in looks}
        loads = [os.getloadavg()[0]]
        for round_ in range(args.repeats):
            for name in (list(looks) if round_ % 2 == 0 else list(looks)[::-1]):
                start = time.perf_counter()
                looks[name]()
                times[name].append(time.perf_counter() - start)
            loads.append(os.getloadavg()[0])
    print(f"{args.records} records ({size / args.records / 1000:.1f} kB each, {size / 1e6:.1f} MB) in a folder on "
          f"this machine's disk; {args.repeats} interleaved rounds; load average {min(loads):.2f}-{max(loads):.2f} "
          f"on {os.cpu_count()} cores")
    for name, values in times.items():
        print(f"one look, {name:38s} {stats(values)}")
    before, now = (statistics.median(v) for v in times.values())
    print(f"a grid of {args.records} runs looks {args.records} times: before ~{before * args.records:.0f} s, "
          f"now ~{now * args.records:.1f} s (medians x {args.records})")


if __name__ == "__main__":
    main()
