"""What the optimizer diagnostics cost: step time with and without them, on the CPU. Target: <= 2%.

    .venv/bin/python benchmarks/diagnostics.py                 # ViT-Tiny depth 4, 32px CIFAR shape, batch 32
    .venv/bin/python benchmarks/diagnostics.py --quick         # depth 1, few repeats: shows it runs

The loop measures diagnostics on the step that ends at a log point (every `log_every` = 10 steps, the
default) and reads them there. So one unit of comparison is one log interval: 10 `training_step`s,
the last one measured and read (`StepDiagnostics.before_step`/`after_step`/`read`, exactly what
train() does), against the same 10 steps without diagnostics, on the same model and batches. Both
variants run interleaved (ABAB, the order alternating each pair) on one thread. Two figures, each the
median over pairs with its min-max:
- direct (the verdict): 1 + (time spent inside the three diagnostics calls) / (the plain interval's
  time): the cost itself, timed where it happens, robust on a shared machine;
- wall: the measured interval's time over the plain one's: the same cost plus the machine's noise
  (on a 2-core machine shared with other jobs it swings by +-15%, far more than the 2% it would check).
Sophia's intervals each hold one Hessian step, as in training. Diagnostics are cheaper relatively at larger batches (their cost scales with the
parameters, the step's with the images), so batch 32 is a conservative choice against the presets' 128.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from optbench.data import SPECS
from optbench.diagnostics import StepDiagnostics
from optbench.models import build_model
from optbench.optimizers import BuildContext, get_entry
from optbench.train import training_step

TARGET = 1.02


class TimedDiagnostics:
    """The real StepDiagnostics, with the time spent in its three calls added up (the direct cost)."""

    def __init__(self, diag: StepDiagnostics):
        self.diag, self.spent = diag, 0.0

    def _timed(self, call):
        start = time.perf_counter()
        out = call()
        self.spent += time.perf_counter() - start
        return out

    def before_step(self):
        self._timed(self.diag.before_step)

    def after_step(self):
        self._timed(self.diag.after_step)

    def read(self):
        return self._timed(self.diag.read)


def interval(model, opt, entry, batches, diag):
    """One log interval: len(batches) steps, the last measured and read when `diag` is given."""
    amp = torch.autocast("cpu", enabled=False)
    start = time.perf_counter()
    for i, (x, y) in enumerate(batches):
        last = i == len(batches) - 1
        training_step(model, opt, entry, x, y, amp, entry.hessian_due(opt), diag if last else None)
        if last and diag is not None:
            diag.read()
    return time.perf_counter() - start


def bench(name: str, depth: int, batch: int, pairs: int, log_every: int) -> dict:
    spec = SPECS["cifar10"]
    entry = get_entry(name)
    model = build_model("vit_tiny_patch16_224", spec, 0, depth=depth)
    hp = entry.defaults()
    opt = entry.make(model, hp, BuildContext("cpu", total_steps=10_000, warmup_steps=10)).optimizer
    entry.train_mode(opt)
    model.train()
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(batch, 3, 32, 32, generator=gen), torch.randint(0, 10, (batch,), generator=gen))
               for _ in range(log_every)]
    diag = TimedDiagnostics(StepDiagnostics(list(model.parameters()), opt, entry))
    interval(model, opt, entry, batches, diag)  # warm-up: state allocated, caches filled
    ratios, plain_times, measured_times, direct = [], [], [], []
    for i in range(pairs):
        order = (None, diag) if i % 2 == 0 else (diag, None)
        times = {}
        for d in order:
            diag.spent = 0.0
            times[d is not None] = interval(model, opt, entry, batches, d)
            if d is not None:
                direct.append(diag.spent)
        plain_times.append(times[False])
        measured_times.append(times[True])
        ratios.append(times[True] / times[False])
        direct[-1] = 1 + direct[-1] / times[False]  # the interval's time grown by what the three calls took
    return {"direct_median": statistics.median(direct), "direct_min": min(direct), "direct_max": max(direct),"optimizer": name, "ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
            "ratio_max": max(ratios), "plain_step_s": statistics.median(plain_times) / log_every,
            "measured_interval_extra_s": statistics.median(measured_times) - statistics.median(plain_times),
            "params": sum(p.numel() for p in model.parameters())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--optimizers", default="adamw,lion,sophia,schedulefree")
    parser.add_argument("--depth", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--pairs", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    depth = args.depth or (1 if args.quick else 2)
    pairs = args.pairs or (2 if args.quick else 8)
    print(f"diagnostics cost: ViT-Tiny depth {depth}, 32px, batch {args.batch_size}, log every 10 steps, "
          f"{pairs} interleaved pairs per optimizer, torch threads {torch.get_num_threads()}")
    rows = [bench(n.strip(), depth, args.batch_size, pairs, 10) for n in args.optimizers.split(",")]
    print(f"{'optimizer':<14}{'params':>10}{'step (s)':>10}{'direct: 1 + diag time / interval':>36}"
          f"{'wall: with / without':>34}{'verdict':>9}")
    for r in rows:
        verdict = "PASS" if r["direct_median"] <= TARGET else "MISS"
        print(f"{r['optimizer']:<14}{r['params']:>10,}{r['plain_step_s']:>10.3f}"
              f"{r['direct_median']:>18.4f}x [{r['direct_min']:.4f}-{r['direct_max']:.4f}]"
              f"{r['ratio_median']:>16.4f}x [{r['ratio_min']:.4f}-{r['ratio_max']:.4f}]{verdict:>9}")
    worst = max(r["direct_median"] for r in rows)
    print(f"RATIO diagnostics cost (worst optimizer, median): {worst:.4f}x target <= {TARGET:.2f}x "
          f"{'PASS' if worst <= TARGET else 'MISS'}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared with other "
          f"jobs), torch {torch.__version__}")


if __name__ == "__main__":
    main()
