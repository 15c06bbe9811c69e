"""optbench speed benchmarks (issue 7, "Fast by design"): measured side by side, in one run, on this machine.

    .venv/bin/python benchmarks/run.py            # full mode, about 5-10 minutes on 2 CPU cores
    .venv/bin/python benchmarks/run.py --quick    # smoke check, every section with very few steps (< 1 min)
    .venv/bin/python benchmarks/run.py --sections data,step --json bench.json

Sections (each prints its ratio with the target and PASS/MISS; a summary table closes the run):
  data    [1] optbench's `train_batches` (device-resident uint8, batched crop+flip, normalisation) against
              torchvision's DataLoader with the same augmentation in PIL, in images/s.
  step    [2] optbench's `training_step` fed by its data path against a bare hand-written PyTorch loop
              (forward, cross_entropy, backward, step, zero_grad on pre-made tensors): same model, batch,
              AdamW. Steps are interleaved ABAB.
  sophia  [3] Sophia's amortised step time (a Hessian every 10 steps) against AdamW's, and each of the four
              optimizers' `optimizer.step()` time alone.
  hbatch  [5] Sophia's Hessian estimate on the full batch against `hessian_batch` = a quarter of it: 10-step
              blocks (one Hessian step each) of AdamW and both Sophias interleaved, each ratio the median
              of the per-round block ratios with its min-max; and each step kind's peak under MemTracker.
  e2e     [4] optbench's `train()` against PyTorch Lightning's `Trainer` with a standard DataLoader + PIL
              transforms: the time ratio and the share of time spent outside forward/backward/step.
              Needs the bench extra (`pip install -e '.[bench]'`); skipped with a reason otherwise.

Everything runs on the CPU (`torch.get_num_threads()` threads, the default). Images are synthetic random
uint8 arrays of CIFAR's shape (32x32x3, 10 classes): CIFAR itself is not downloadable everywhere, and
throughput does not depend on pixel values. Wall-clock timers are `time.perf_counter()`; no device
synchronisation is needed on the CPU.

The two sides of every comparison run interleaved in the same process, and the statistics are chosen to
survive a shared machine (other processes taking a core can slow a 2-thread torch op tenfold for seconds):
every ratio is the median over interleaved repeats of the per-repeat ratio, printed with its min-max:
[1] per repetition, optbench's epoch / the epoch of the DataLoader variant with the best median (run
right after it); [2] per pair of steps; [3] and [5] per round of 10-step blocks (each with one Hessian
step; median plain-step and Hessian-step times are printed as a cross-check); [4] per repetition,
optbench's run / the run of the Lightning variant with the best median wall.
The quick mode also cuts ViT-Tiny to depth 1: its figures only show that every section runs.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from optbench.config import resolved_warmup_steps
from optbench.data import SPECS, ImageData, train_batches
from optbench.experiment import warmup_cosine
from optbench.measure import tracked_step_phases
from optbench.models import build_model
from optbench.optimizers import BASELINE, COURSE_SET, BuildContext, get_entry
from optbench.train import train, training_step

perf = time.perf_counter
SPEC = SPECS["cifar10"]  # 32x32x3, 10 classes, patch 4, crop padding 4, flip
VIT_TINY = "vit_tiny_patch16_224"  # built by optbench at 32x32 with patch 4: 65 tokens, dim 192, depth 12
# The small end-to-end configuration: timm's narrowest ViT (dim 64, 2 heads) cut to depth 1. Its
# forward+backward+step on 128 images costs about as much as augmenting 128 images in PIL, so data
# handling is a visible share of every step (see the section text printed at run time).
SMALL_VIT, SMALL_DEPTH = "test_vit", 1
OPTIMIZERS = COURSE_SET  # the registry's default set
SOPHIA = next(n for n in COURSE_SET if get_entry(n).force_hessian_next is not None)  # the Hessian-step optimizer
SECTIONS = ("data", "step", "sophia", "e2e", "hbatch")


@dataclass(frozen=True)
class Profile:
    name: str
    # [1] data pipeline
    data_images: int
    data_batch: int
    data_reps: int
    data_workers: tuple[int, ...]
    # [2]-[4a]: ViT-Tiny's depth (None: its own 12; the quick mode cuts it to keep the smoke check short)
    vit_depth: int | None
    # [2] training step
    step_batch: int
    step_warmup: int
    step_pairs: int
    # [3] optimizers
    opt_batch: int
    opt_rounds: int
    opt_warmup: bool
    # [4] end to end
    vit_batch: int
    vit_steps: int
    small_batch: int
    small_steps: int
    vit_reps: int
    small_reps: int
    e2e_workers: tuple[int, ...]


FULL = Profile("full", data_images=10_000, data_batch=128, data_reps=5, data_workers=(0, 1, 2), vit_depth=None,
               step_batch=32, step_warmup=3, step_pairs=64,
               opt_batch=32, opt_rounds=5, opt_warmup=True,
               vit_batch=32, vit_steps=30, small_batch=128, small_steps=150, vit_reps=3, small_reps=5,
               e2e_workers=(0, 2))
QUICK = Profile("quick", data_images=2_048, data_batch=128, data_reps=1, data_workers=(0, 2), vit_depth=1,
                step_batch=8, step_warmup=1, step_pairs=3,
                opt_batch=8, opt_rounds=1, opt_warmup=False,
                vit_batch=8, vit_steps=3, small_batch=128, small_steps=8, vit_reps=1, small_reps=1, e2e_workers=(0, 2))

TARGETS = {  # id -> (comparison, bound, short label for the summary table)
    "1": (">=", 10.0, "data pipeline images/s: optbench / DataLoader"),
    "2": ("<=", 1.05, "training step time: optbench / bare PyTorch loop"),
    "3": ("<=", 1.35, "amortised step: Sophia (Hessian every 10) / AdamW"),
    "4a": ("<=", 1.0, "end to end, ViT-Tiny: optbench / Lightning"),
    "4b": ("<=", 0.8, "end to end, small ViT: optbench / Lightning"),
    "5a": ("<=", 1.2, "amortised step: Sophia hessian_batch=batch/4 / AdamW"),
    "5b": ("<=", 1.5, "step peak: Sophia Hessian step (batch/4) / plain step"),
    "5c": ("<=", 1.35, "amortised step: Sophia full-batch estimate / AdamW"),
}


# --- shared helpers --------------------------------------------------------------------------------


def vit_title(p: Profile) -> str:
    depth = f"depth cut to {p.vit_depth} for the quick mode" if p.vit_depth else "depth 12"
    return f"ViT-Tiny 32x32 (timm {VIT_TINY}, patch 4, dim 192, {depth})"


def say(text: str = "") -> None:
    print(text, flush=True)


def ratio_line(rid: str, label: str, ratio: float, results: dict[str, Any],
               repeats: list[float] | None = None, **figures: Any) -> None:
    """Prints one ratio with its target and verdict, and files it for the summary table.

    `repeats`: the per-repeat ratios `ratio` is the median of; their min-max is printed and recorded."""
    op, bound, short = TARGETS[rid]
    ok = ratio >= bound if op == ">=" else ratio <= bound
    verdict = "PASS" if ok else "MISS"
    spread = f"   (median of {len(repeats)} repeats, min-max {min(repeats):.3f}-{max(repeats):.3f})" if repeats else ""
    if repeats:
        figures = {**figures, "repeats": repeats, "min": min(repeats), "max": max(repeats)}
    say(f"  RATIO [{rid}] {label}: {ratio:.3f}x   target {op} {bound:g}x   {verdict}{spread}")
    results.setdefault("ratios", []).append({"id": rid, "label": short, "detail": label, "ratio": ratio,
                                             "target": f"{op} {bound:g}x", "verdict": verdict, **figures})


def hparams(name: str) -> dict[str, Any]:
    return get_entry(name).defaults()


def synthetic_cifar(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n random uint8 images in CIFAR's layout as torchvision keeps it, (N, 32, 32, 3), and labels 0..9."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8),
            rng.integers(0, SPEC.num_classes, size=n).astype(np.int64))


def optbench_data(hwc: np.ndarray, labels: np.ndarray) -> ImageData:
    """The same images as optbench holds them: (N, C, H, W) uint8 plus per-channel mean/std (as load_dataset)."""
    x = torch.from_numpy(np.ascontiguousarray(hwc.transpose(0, 3, 1, 2)))
    y = torch.from_numpy(labels)
    count = x.shape[0] * x.shape[2] * x.shape[3]
    s1 = x.sum(dim=(0, 2, 3), dtype=torch.float64) / 255.0
    s2 = x.double().div_(255.0).square_().sum(dim=(0, 2, 3)) if x.shape[0] <= 4096 else sum(
        chunk.double().div_(255.0).square_().sum(dim=(0, 2, 3)) for chunk in x.split(4096))
    mean = s1 / count
    std = ((s2 - count * mean ** 2) / (count - 1)).sqrt().clamp_min(1e-3)
    test = min(128, x.shape[0])
    return ImageData(SPEC, x, y, x[:test].clone(), y[:test].clone(), mean.float(), std.float())


class PILImages(Dataset):
    """A Dataset exactly like torchvision.datasets.CIFAR10: (N, H, W, C) uint8 in memory, one PIL image per
    __getitem__ (`Image.fromarray`), then the transform."""

    def __init__(self, hwc: np.ndarray, labels: np.ndarray, transform: Callable):
        self.data, self.targets, self.transform = hwc, labels, transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.data[index])), int(self.targets[index])


def pil_transform(mean: torch.Tensor, std: torch.Tensor):
    import torchvision.transforms as T

    return T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(mean.tolist(), std.tolist())])


def endless_batches(data: ImageData, batch_size: int, seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """optbench's own batches, epoch after epoch (full batches only, so every step has the same size)."""
    epoch = 1
    while True:
        for x, y in train_batches(data, batch_size, seed, epoch, augment=True):
            if y.shape[0] == batch_size:
                yield x, y
        epoch += 1


def median(values) -> float:
    return float(statistics.median(values))


def quartiles(values) -> tuple[float, float]:
    if len(values) < 2:
        return float(values[0]), float(values[0])
    q = statistics.quantiles(values, n=4, method="inclusive")
    return float(q[0]), float(q[2])


def shutdown(loader: DataLoader) -> None:
    it = getattr(loader, "_iterator", None)
    if it is not None and hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()


# --- [1] data pipeline -----------------------------------------------------------------------------


def bench_data(p: Profile, results: dict[str, Any]) -> None:
    say(f"\n[1] Data pipeline: {p.data_images:,} synthetic 32x32x3 uint8 images, batch {p.data_batch}, "
        f"random crop (pad 4) + horizontal flip + normalise, float32 NCHW batches out")
    say("    optbench: train_batches() on the uint8 tensor in memory (one gather per batch, no workers)")
    say("    torchvision: DataLoader(shuffle=True) over a CIFAR10-like Dataset of PIL images with "
        "RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor, Normalize;")
    say(f"                 num_workers in {list(p.data_workers)} (persistent workers; {os.cpu_count()} cores), "
        "the one with the best median is the baseline")
    hwc, labels = synthetic_cifar(p.data_images)
    data = optbench_data(hwc, labels)
    dataset = PILImages(hwc, labels, pil_transform(data.mean, data.std))
    loaders = {w: DataLoader(dataset, batch_size=p.data_batch, shuffle=True, num_workers=w,
                             persistent_workers=w > 0) for w in p.data_workers}

    def optbench_epoch(epoch: int) -> float:
        n, t0 = 0, perf()
        for x, y in train_batches(data, p.data_batch, 0, epoch, augment=True):
            n += y.shape[0]
        return n / (perf() - t0)

    def loader_epoch(loader: DataLoader) -> float:
        n, t0 = 0, perf()
        for x, y in loader:
            n += y.shape[0]
        return n / (perf() - t0)

    # One untimed epoch each: starts the persistent workers, warms allocators and caches.
    optbench_epoch(0)
    for loader in loaders.values():
        loader_epoch(loader)
    threads = torch.get_num_threads()
    one_thread = "optbench, 1 thread" if threads > 1 else None
    rates: dict[str, list[float]] = {"optbench": [], **{f"workers={w}": [] for w in loaders}}
    if one_thread:
        rates[one_thread] = []
    for rep in range(p.data_reps):  # interleaved: optbench, loader(w0), loader(w1), ... per repetition
        rates["optbench"].append(optbench_epoch(rep + 1))
        for w, loader in loaders.items():
            rates[f"workers={w}"].append(loader_epoch(loader))
        if one_thread:  # diagnostic only: the same pipeline with torch's intra-op pool cut to one thread
            torch.set_num_threads(1)
            try:
                rates[one_thread].append(optbench_epoch(rep + 1))
            finally:
                torch.set_num_threads(threads)
    for loader in loaders.values():
        shutdown(loader)
    del loaders
    gc.collect()

    med = {k: median(v) for k, v in rates.items()}
    say(f"    images/s per interleaved epoch ({p.data_reps} each): "
        + "; ".join(f"{k} {', '.join(f'{r:,.0f}' for r in v)}" for k, v in rates.items()))
    for key, value in med.items():
        say(f"    {key:>14}: median {value:>10,.0f} images/s   (min-max {min(rates[key]):,.0f}-{max(rates[key]):,.0f})")
    # The baseline is the worker count with the best median; each repetition's ratio pairs optbench's epoch
    # with that loader's epoch run right after it, so a load spike moves both sides of a ratio.
    base_key = max((k for k in med if k.startswith("workers=")), key=lambda k: med[k])
    per_rep = [a / b for a, b in zip(rates["optbench"], rates[base_key])]
    if one_thread:
        say(f"    diagnostic: optbench with torch.set_num_threads(1) reaches {med[one_thread] / med[base_key]:.2f}x "
            f"the baseline's median (the ratio below uses the default {threads} threads, as training does)")
    results["data"] = {"images": p.data_images, "batch": p.data_batch, "images_per_s": rates, "median": med,
                       "baseline": base_key}
    ratio_line("1", f"data pipeline images/s, optbench / torchvision DataLoader ({base_key}, the best median)",
               median(per_rep), results, repeats=per_rep, optbench=f"{med['optbench']:,.0f} img/s (median)",
               baseline=f"{med[base_key]:,.0f} img/s (DataLoader {base_key}, median)")


# --- [2] training step -----------------------------------------------------------------------------


def bench_step(p: Profile, results: dict[str, Any]) -> None:
    b = p.step_batch
    say(f"\n[2] Training step: {vit_title(p)}, batch {b}, AdamW, fp32")
    data = optbench_data(*synthetic_cifar(max(4 * b, 2048)))
    entry, hp = get_entry(BASELINE), hparams(BASELINE)
    model_a = build_model(VIT_TINY, SPEC, seed=0, depth=p.vit_depth)
    model_b = copy.deepcopy(model_a)
    built = entry.make(model_a, hp, BuildContext("cpu", total_steps=1000, warmup_steps=0))
    opt_a = built.optimizer
    opt_b = torch.optim.AdamW(model_b.parameters(), lr=hp["lr"], betas=tuple(hp["betas"]), eps=hp["eps"],
                              weight_decay=hp["weight_decay"])  # torch's default code path: for-loop on CPU
    batches = endless_batches(data, b)
    x_pre = data.normalize(data.train_x[:b]).contiguous()  # the bare loop's pre-made tensors
    y_pre = data.train_y[:b].clone()
    amp = contextlib.nullcontext()
    say(f"    optbench: next(train_batches) + training_step() [AdamW from the registry: {built.implementation}]")
    say("    bare:     loss = F.cross_entropy(model(x), y); loss.backward(); opt.step(); opt.zero_grad() on "
        "pre-made tensors [torch.optim.AdamW, default arguments but the course's lr/wd: for-loop on CPU]")

    def step_optbench() -> None:
        x, y = next(batches)
        training_step(model_a, opt_a, entry, x, y, amp, hessian=False)

    def step_bare() -> None:
        loss = F.cross_entropy(model_b(x_pre), y_pre)
        loss.backward()
        opt_b.step()
        opt_b.zero_grad()

    def timed(fn: Callable[[], None]) -> float:
        t0 = perf()
        fn()
        return perf() - t0

    for _ in range(p.step_warmup):
        step_optbench()
        step_bare()
    ta, tb = [], []
    t_section = perf()
    for i in range(p.step_pairs):  # ABAB..., the order inside a pair alternating: AB, BA, AB, ...
        if i % 2 == 0:
            ta.append(timed(step_optbench))
            tb.append(timed(step_bare))
        else:
            tb.append(timed(step_bare))
            ta.append(timed(step_optbench))
    elapsed = perf() - t_section
    pair_ratios = [a / c for a, c in zip(ta, tb)]
    ratio = median(pair_ratios)
    q1, q3 = quartiles(pair_ratios)
    say(f"    {p.step_pairs} interleaved pairs after {p.step_warmup} warm-up step(s) each ({elapsed:.0f} s)")
    say(f"    optbench step: median {1e3 * median(ta):8.1f} ms   mean {1e3 * statistics.fmean(ta):8.1f} ms")
    say(f"    bare step:     median {1e3 * median(tb):8.1f} ms   mean {1e3 * statistics.fmean(tb):8.1f} ms")
    say(f"    per-pair ratio: median {ratio:.3f}, quartiles {q1:.3f}-{q3:.3f}; ratio of means "
        f"{statistics.fmean(ta) / statistics.fmean(tb):.3f}")
    results["step"] = {"batch": b, "pairs": p.step_pairs, "optbench_s": ta, "bare_s": tb,
                       "median_pair_ratio": ratio, "quartiles": [q1, q3],
                       "ratio_of_means": statistics.fmean(ta) / statistics.fmean(tb),
                       "optbench_adamw": built.implementation}
    ratio_line("2", "training-step time, optbench (data path + training_step) / bare PyTorch loop "
               "(median of paired steps)", ratio, results, repeats=pair_ratios,
               optbench=f"{1e3 * median(ta):.1f} ms/step", baseline=f"{1e3 * median(tb):.1f} ms/step (bare loop)")


# --- [3] optimizers --------------------------------------------------------------------------------


def bench_optimizers(p: Profile, results: dict[str, Any]) -> None:
    b, block = p.opt_batch, 10
    say(f"\n[3] Optimizers: {vit_title(p)}, batch {b}, optbench's training_step + data path; blocks of {block} "
        f"steps, the four optimizers interleaved per round (order rotated each round), {p.opt_rounds} round(s)")
    data = optbench_data(*synthetic_cifar(max(4 * b, 2048)))
    base = build_model(VIT_TINY, SPEC, seed=0, depth=p.vit_depth)
    total = (p.opt_rounds + 2) * block
    ctx = BuildContext("cpu", total_steps=total, warmup_steps=resolved_warmup_steps(500, total))
    amp = contextlib.nullcontext()
    runs: dict[str, dict[str, Any]] = {}
    for name in OPTIMIZERS:
        entry = get_entry(name)
        model = copy.deepcopy(base)
        built = entry.make(model, hparams(name), ctx)
        run = {"entry": entry, "model": model, "opt": built.optimizer, "impl": built.implementation,
               "batches": endless_batches(data, b), "blocks": [], "step_plain": [], "step_hessian": [],
               "hessian": False, "t0": 0.0}

        def pre(opt, args, kwargs, run=run):
            run["t0"] = perf()

        def post(opt, args, kwargs, run=run):
            (run["step_hessian"] if run["hessian"] else run["step_plain"]).append(perf() - run["t0"])

        built.optimizer.register_step_pre_hook(pre)
        built.optimizer.register_step_post_hook(post)
        entry.train_mode(built.optimizer)
        runs[name] = run

    def one_step(run: dict[str, Any]) -> None:
        x, y = next(run["batches"])
        run["hessian"] = run["entry"].hessian_due(run["opt"])
        t0 = perf()
        training_step(run["model"], run["opt"], run["entry"], x, y, amp, run["hessian"])
        (run["steps_hessian"] if run["hessian"] else run["steps_plain"]).append(perf() - t0)

    for run in runs.values():
        run["steps_plain"], run["steps_hessian"] = [], []
    if p.opt_warmup:  # Sophia: one whole period (its Hessian path included), so timed blocks start aligned
        for name, run in runs.items():
            for _ in range(block if name == SOPHIA else 2):
                one_step(run)
            for key in ("step_plain", "step_hessian", "steps_plain", "steps_hessian"):
                run[key].clear()
    t_section = perf()
    for r in range(p.opt_rounds):
        order = OPTIMIZERS[r % 4:] + OPTIMIZERS[:r % 4]
        for name in order:
            run = runs[name]
            t0 = perf()
            for _ in range(block):
                one_step(run)
            run["blocks"].append(perf() - t0)
    elapsed = perf() - t_section

    def amortised(plain: list[float], hessian: list[float]) -> float:
        """Median plain and median Hessian time, weighted by their shares of the steps: robust to load spikes."""
        share = len(hessian) / (len(plain) + len(hessian))
        return (share * median(hessian) if hessian else 0.0) + (1 - share) * median(plain)

    hessian_steps = len(runs[SOPHIA]["steps_hessian"])
    say(f"    ({elapsed:.0f} s; Sophia made {hessian_steps} Hessian step(s) in {p.opt_rounds * block} timed steps)")
    say(f"    {'optimizer':<21}{'plain step':>12}{'Hessian step':>14}{'amortised':>12}{'vs AdamW':>10}"
        f"{'step() plain':>14}{'step() Hessian':>16}{'step() amort.':>15}   implementation")
    table = {}
    for name, run in runs.items():
        amort = amortised(run["steps_plain"], run["steps_hessian"])
        step_amort = amortised(run["step_plain"], run["step_hessian"])
        hess = median(run["steps_hessian"]) if run["steps_hessian"] else None
        step_hess = median(run["step_hessian"]) if run["step_hessian"] else None
        table[name] = {"amortised_step_s": amort, "plain_step_median_s": median(run["steps_plain"]),
                       "hessian_step_median_s": hess, "block_s": run["blocks"],
                       "block_mean_step_s": sum(run["blocks"]) / (block * len(run["blocks"])),
                       "step_call_plain_median_s": median(run["step_plain"]), "step_call_hessian_median_s": step_hess,
                       "step_call_amortised_s": step_amort, "steps_plain_s": run["steps_plain"],
                       "steps_hessian_s": run["steps_hessian"], "implementation": run["impl"]}
    adamw = table[BASELINE]["amortised_step_s"]
    for name, row in table.items():
        row["vs_adamw"] = row["amortised_step_s"] / adamw
        row["vs_adamw_block_median"] = median([s / a for s, a in zip(row["block_s"], table[BASELINE]["block_s"])])

        def ms(value: float | None, width: int) -> str:
            return f"{1e3 * value:{width - 3}.1f} ms" if value is not None else f"{'-':>{width}}"

        impl = row["implementation"]
        say(f"    {get_entry(name).title:<21}{ms(row['plain_step_median_s'], 12)}{ms(row['hessian_step_median_s'], 14)}"
            f"{ms(row['amortised_step_s'], 12)}{row['vs_adamw']:9.3f}x{ms(row['step_call_plain_median_s'], 14)}"
            f"{ms(row['step_call_hessian_median_s'], 16)}{ms(row['step_call_amortised_s'], 15)}   "
            f"{impl.get('class')} ({impl.get('code_path')})")
    say("    a step = data + forward + backward + step() (optbench's training_step); plain/Hessian = medians of the "
        "steps of each kind; amortised = those medians")
    say(f"    weighted by their shares of the steps (Sophia: 1 in {block}); step() columns time optimizer.step() alone "
        "(pre/post hooks), same statistics.")
    sophia = table[SOPHIA]
    say(f"    cross-check from raw block times (sensitive to load spikes): Sophia / AdamW = "
        f"{sophia['vs_adamw_block_median']:.3f} (median over rounds of the block ratio), "
        f"{sophia['block_mean_step_s'] / table['adamw']['block_mean_step_s']:.3f} (ratio of mean block times)")
    if runs[SOPHIA]["steps_hessian"]:
        share = len(runs[SOPHIA]["steps_hessian"]) / (len(runs[SOPHIA]["steps_hessian"]) +
                                                       len(runs[SOPHIA]["steps_plain"]))
        least = share * min(runs[SOPHIA]["steps_hessian"]) + (1 - share) * min(runs[SOPHIA]["steps_plain"])
        sophia["least_disturbed_vs_adamw"] = least / min(runs[BASELINE]["steps_plain"])
        say(f"    least-disturbed estimate (fastest Hessian and fastest plain step, over AdamW's fastest step): "
            f"{sophia['least_disturbed_vs_adamw']:.3f}; Hessian steps are the most sensitive to a shared machine")
    results["optimizers"] = {"batch": b, "rounds": p.opt_rounds, "block": block, "table": table}
    # The verdict: the median over interleaved rounds of the block ratio (each block holds one Hessian step),
    # with its min-max, so no single noisy round decides it; the weighted medians above are a cross-check.
    block_ratios = [s / a for s, a in zip(sophia["block_s"], table["adamw"]["block_s"])]
    ratio_line("3", "Sophia (Hessian every 10 steps) / AdamW amortised step time (block ratio, median of rounds)",
               median(block_ratios), results, repeats=block_ratios,
               optbench=f"Sophia {1e3 * sophia['amortised_step_s']:.1f} ms/step",
               baseline=f"AdamW {1e3 * adamw:.1f} ms/step")


# --- [5] Sophia's Hessian estimate: full batch against a quarter of it ------------------------------


def bench_hessian_batch(p: Profile, results: dict[str, Any]) -> None:
    b, block = p.opt_batch, 10
    n = max(1, b // 4)
    rounds = max(p.opt_rounds, 2)
    say(f"\n[5] Sophia's Hessian estimate, full batch ({b}) against hessian_batch={n}: {vit_title(p)}; blocks of "
        f"{block} steps (one Hessian step each), AdamW and both Sophias interleaved, order rotated, {rounds} rounds")
    data = optbench_data(*synthetic_cifar(max(4 * b, 2048)))
    base = build_model(VIT_TINY, SPEC, seed=0, depth=p.vit_depth)
    ctx = BuildContext("cpu", total_steps=(rounds + 2) * block, warmup_steps=0)
    amp = contextlib.nullcontext()
    variants = {"adamw": (BASELINE, {}), "sophia full": (SOPHIA, {}), f"sophia n={n}": (SOPHIA, {"hessian_batch": n})}

    def build(name: str, extra: dict[str, Any]):
        entry = get_entry(name)
        model = copy.deepcopy(base)
        return entry, model, entry.make(model, {**hparams(name), **extra}, ctx).optimizer

    runs = {}
    for label, (name, extra) in variants.items():
        entry, model, opt = build(name, extra)
        runs[label] = {"entry": entry, "model": model, "opt": opt, "batches": endless_batches(data, b),
                       "blocks": [], "plain": [], "hessian": []}

    def one_step(run: dict[str, Any]) -> None:
        x, y = next(run["batches"])
        hessian = run["entry"].hessian_due(run["opt"])
        t0 = perf()
        training_step(run["model"], run["opt"], run["entry"], x, y, amp, hessian)
        run["hessian" if hessian else "plain"].append(perf() - t0)

    for run in runs.values():  # one whole period: state allocated, the timed blocks start with a Hessian step
        for _ in range(block if p.opt_warmup else 1):
            one_step(run)
        run["plain"].clear(), run["hessian"].clear()
    if not p.opt_warmup:  # the untimed step was the Hessian one: realign so each block holds one
        for run in runs.values():
            if run["entry"].force_hessian_next is not None:
                run["entry"].force_hessian_next(run["opt"])
    labels = list(runs)
    t_section = perf()
    for r in range(rounds):
        for label in labels[r % 3:] + labels[:r % 3]:
            run = runs[label]
            t0 = perf()
            for _ in range(block):
                one_step(run)
            run["blocks"].append(perf() - t0)
    elapsed = perf() - t_section
    say(f"    ({elapsed:.0f} s; load average {[round(x, 2) for x in os.getloadavg()]})")
    adamw_blocks = runs["adamw"]["blocks"]
    table: dict[str, Any] = {}
    say(f"    {'variant':<16}{'plain step':>12}{'Hessian step':>14}{'Hessian/plain':>15}{'block/AdamW median':>20}"
        f"{'min-max':>15}")
    for label, run in runs.items():
        per_round = [s / a for s, a in zip(run["blocks"], adamw_blocks)]
        hess, plain = (median(run["hessian"]) if run["hessian"] else None), median(run["plain"])
        table[label] = {"plain_step_median_s": plain, "hessian_step_median_s": hess,
                        "block_s": run["blocks"], "vs_adamw_rounds": per_round, "vs_adamw": median(per_round)}
        say(f"    {label:<16}{1e3 * plain:9.1f} ms"
            f"{(f'{1e3 * hess:11.1f} ms') if hess else '-':>14}"
            f"{(f'{hess / plain:14.2f}x') if hess else '-':>15}"
            f"{median(per_round):19.3f}x{min(per_round):8.3f}-{max(per_round):.3f}")

    # Peaks: a fresh copy per variant, state made by one untracked step, then a plain and a Hessian step.
    peaks: dict[str, dict[str, int]] = {}
    x, y = next(runs["adamw"]["batches"])
    for label, (name, extra) in variants.items():
        if name != SOPHIA:
            continue
        entry, model, opt = build(name, extra)
        training_step(model, opt, entry, x, y, amp, entry.hessian_due(opt))
        kinds = {}
        for kind in ("plain", "hessian"):
            if kind == "hessian":
                entry.force_hessian_next(opt)
            due = entry.hessian_due(opt)
            assert due == (kind == "hessian")
            phases = tracked_step_phases(model, opt, lambda: training_step(model, opt, entry, x, y, amp, due), (x, y))
            kinds[kind] = max(phases["forward_backward"]["total"], phases["step"]["total"])
        peaks[label] = kinds
        say(f"    {label:<16} step peak (MemTracker): plain {kinds['plain'] / 2**20:.1f} MiB, "
            f"Hessian {kinds['hessian'] / 2**20:.1f} MiB ({kinds['hessian'] / kinds['plain']:.2f}x)")
    full, sub = table["sophia full"], table[f"sophia n={n}"]
    results["hessian_batch"] = {"batch": b, "hessian_batch": n, "rounds": rounds, "block": block, "table": table,
                                "peaks_bytes": peaks}
    ratio_line("5a", f"Sophia hessian_batch={n} / AdamW amortised step (block of {block} / AdamW's block)",
               sub["vs_adamw"], results, repeats=sub["vs_adamw_rounds"],
               optbench=f"Sophia n={n} {1e3 * median(sub['block_s']) / block:.1f} ms/step",
               baseline=f"AdamW {1e3 * median(adamw_blocks) / block:.1f} ms/step")
    sub_peak = peaks[f"sophia n={n}"]
    ratio_line("5b", f"Sophia hessian_batch={n}: Hessian step peak / plain step peak (MemTracker)",
               sub_peak["hessian"] / sub_peak["plain"], results,
               optbench=f"Hessian step {sub_peak['hessian'] / 2**20:.1f} MiB",
               baseline=f"plain step {sub_peak['plain'] / 2**20:.1f} MiB")
    ratio_line("5c", f"Sophia full-batch estimate / AdamW amortised step (block of {block} / AdamW's block)",
               full["vs_adamw"], results, repeats=full["vs_adamw_rounds"],
               optbench=f"Sophia full {1e3 * median(full['block_s']) / block:.1f} ms/step",
               baseline=f"AdamW {1e3 * median(adamw_blocks) / block:.1f} ms/step")


# --- [4] end to end against Lightning --------------------------------------------------------------


class PhaseTimer:
    """Wall time spent in the model's forward, its backward and the optimizer's update, from hooks only.

    forward:  module forward pre-hook -> forward hook on the model (training forwards with grad only);
    backward: gradient hook on the model's output (the logits) -> the last parameter's
              post-accumulate-grad hook;
    step:     optimizer step pre-hook -> step post-hook. Lightning calls `optimizer.step(closure)`, which
              runs forward and backward inside the step, so there the update starts at the
              LightningModule's `on_before_optimizer_step` hook (after the closure) instead.
    Everything else (data, loss function, zero_grad, schedulers, loop and framework code) is "outside".
    The same hooks are installed on both sides, so their own small cost is the same for both.
    """

    def __init__(self, model: torch.nn.Module):
        self.forward = self.backward = self.step = 0.0
        self.steps = 0
        self.first_forward: float | None = None
        self._f0 = self._b0 = self._b1 = self._s0 = self._u0 = None
        model.register_forward_pre_hook(self._fwd_pre)
        model.register_forward_hook(self._fwd_post)
        for param in model.parameters():
            if param.requires_grad:
                param.register_post_accumulate_grad_hook(self._grad_done)

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.register_step_pre_hook(self._step_pre)
        optimizer.register_step_post_hook(self._step_post)

    def mark_update_start(self) -> None:
        self._u0 = perf()

    def _fwd_pre(self, module, args) -> None:
        if module.training and torch.is_grad_enabled():
            self._f0 = perf()
            if self.first_forward is None:
                self.first_forward = self._f0

    def _fwd_post(self, module, args, output) -> None:
        if self._f0 is None:
            return
        self.forward += perf() - self._f0
        self._f0 = None
        if torch.is_tensor(output) and output.requires_grad:
            output.register_hook(self._bwd_start)

    def _bwd_start(self, grad) -> None:
        self._b0, self._b1 = perf(), None

    def _grad_done(self, param) -> None:
        self._b1 = perf()

    def _step_pre(self, optimizer, args, kwargs) -> None:
        self._s0 = perf()

    def _step_post(self, optimizer, args, kwargs) -> None:
        end = perf()
        if self._b0 is not None and self._b1 is not None:
            self.backward += self._b1 - self._b0
        self._b0 = self._b1 = None
        self.step += end - (self._u0 if self._u0 is not None else self._s0)
        self._u0 = None
        self.steps += 1


class _Silent:
    def epoch_start(self, epoch, epochs, steps): pass
    def progress(self, steps_done_in_epoch, loss, images_per_s): pass
    def log_point(self, step, values): pass
    def epoch_end(self, row): pass


@dataclass
class E2EConfig:
    key: str
    title: str
    model: str
    depth: int | None
    batch: int
    steps: int
    reps: int


def e2e_model(cfg: "E2EConfig") -> torch.nn.Module:
    """The model of an end-to-end configuration, seeded, the same for both runners. The small one is timm's
    `test_vit` made directly by timm (optbench's model registry takes other timm ViTs by their `vit_` names)."""
    if cfg.model != SMALL_VIT:
        return build_model(cfg.model, SPEC, seed=0, depth=cfg.depth)
    import timm

    torch.manual_seed(0)
    return timm.create_model(SMALL_VIT, pretrained=False, img_size=32, patch_size=SPEC.patch_size,
                             in_chans=SPEC.channels, num_classes=SPEC.num_classes, depth=cfg.depth)


def run_optbench_e2e(cfg: E2EConfig, data: ImageData, steps: int) -> dict[str, Any]:
    """optbench's real train() for one epoch of `steps` steps: AdamW from the registry, warmup+cosine."""
    entry, hp = get_entry(BASELINE), hparams(BASELINE)
    model = e2e_model(cfg)
    warmup = resolved_warmup_steps(500, steps)
    optimizer = entry.make(model, hp, BuildContext("cpu", steps, warmup)).optimizer
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, warmup))
    timer = PhaseTimer(model)
    timer.attach(optimizer)
    t0 = perf()
    result = train(model, optimizer, entry, scheduler, data, epochs=1, batch_size=cfg.batch,
                   eval_batch_size=128, seed=0, augment=True, precision="fp32", log_every=10, reporter=_Silent())
    wall = perf() - t0 - result.eval_time_s  # evaluation (one test batch at the epoch's end) is booked apart
    if result.status != "ok" or result.steps != steps:
        raise RuntimeError(f"optbench train() ended with {result.status} after {result.steps} steps: {result.detail}")
    return {"wall_s": wall, "forward_s": timer.forward, "backward_s": timer.backward, "step_s": timer.step,
            "steps": timer.steps, "to_first_forward_s": (timer.first_forward or t0) - t0,
            "eval_s_excluded": result.eval_time_s, "train_time_s_own_clock": result.train_time_s}


def run_lightning_e2e(cfg: E2EConfig, hwc: np.ndarray, labels: np.ndarray, mean: torch.Tensor, std: torch.Tensor,
                      steps: int, workers: int) -> dict[str, Any]:
    """Lightning's Trainer.fit for one epoch of `steps` steps over a standard DataLoader + PIL transforms."""
    import lightning as L

    hp = hparams(BASELINE)
    model = e2e_model(cfg)
    warmup = resolved_warmup_steps(500, steps)
    timer = PhaseTimer(model)

    class LitClassifier(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.model(x), y)

        def configure_optimizers(self):
            optimizer = torch.optim.AdamW(self.parameters(), lr=hp["lr"], betas=tuple(hp["betas"]), eps=hp["eps"],
                                          weight_decay=hp["weight_decay"])
            timer.attach(optimizer)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, warmup))
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

        def on_before_optimizer_step(self, optimizer):
            timer.mark_update_start()

    loader = DataLoader(PILImages(hwc, labels, pil_transform(mean, std)), batch_size=cfg.batch, shuffle=True,
                        num_workers=workers)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, max_steps=steps, logger=False,
                        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0)
    t0 = perf()
    trainer.fit(LitClassifier(), train_dataloaders=loader)
    wall = perf() - t0
    if trainer.global_step != steps:
        raise RuntimeError(f"Lightning stopped after {trainer.global_step} of {steps} steps")
    return {"wall_s": wall, "forward_s": timer.forward, "backward_s": timer.backward, "step_s": timer.step,
            "steps": timer.steps, "to_first_forward_s": (timer.first_forward or t0) - t0}


def quiet_lightning() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*GPU available.*")
    warnings.filterwarnings("ignore", message=".*litlogger.*")
    warnings.filterwarnings("ignore", message=".*LitModels.*")
    warnings.filterwarnings("ignore", message=".*You defined a `validation_step`.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # lightning 2.6 on torch 2.14: a deprecation notice


def bench_e2e(p: Profile, results: dict[str, Any]) -> None:
    try:
        import lightning
    except ImportError as exc:
        reason = (f"lightning is not importable ({exc}); install the bench extra: "
                  ".venv/bin/pip install -e '.[bench]' (or `make bench`)")
        say(f"\n[4] End to end against PyTorch Lightning: SKIPPED: {reason}")
        results["e2e"] = {"skipped": reason}
        return
    quiet_lightning()
    say(f"\n[4] End to end: optbench train() vs PyTorch Lightning {lightning.__version__} Trainer.fit(), same model, "
        "AdamW (same arguments; torch's for-loop code path on CPU in both), warmup+cosine LambdaLR per step,")
    say("    same number of steps (one epoch of synthetic CIFAR-shaped images, random crop+flip+normalise).")
    say("    Lightning: progress bar, logger, checkpointing, model summary, sanity check and validation off;")
    say("    DataLoader(shuffle=True) + PIL RandomCrop/RandomHorizontalFlip/ToTensor/Normalize, num_workers in "
        f"{list(p.e2e_workers)}: the one with the best median wall is the baseline.")
    say("    optbench: train() (its device-resident data, one epoch); its end-of-epoch evaluation is excluded.")
    say("    Runs alternate (optbench, Lightning w0, Lightning w2, rotated per repetition); the ratio is the median over "
        "repetitions of optbench's run / the baseline's run in that repetition, with its min-max.")
    say("    Time in forward/backward/step: hooks (PhaseTimer): model forward pre/post hooks; output-gradient hook to "
        "the last parameter's post-accumulate-grad hook;")
    say("    optimizer step pre/post hooks (Lightning: from its on_before_optimizer_step hook, as its step() runs the "
        "closure). Outside = wall - forward - backward - step.")
    configs = [
        E2EConfig("4a", vit_title(p), VIT_TINY, p.vit_depth, p.vit_batch, p.vit_steps, p.vit_reps),
        E2EConfig("4b", f"small: timm {SMALL_VIT} (dim 64, 2 heads) at depth {SMALL_DEPTH}", SMALL_VIT, SMALL_DEPTH,
                  p.small_batch, p.small_steps, p.small_reps),
    ]
    results["e2e"] = {"lightning": lightning.__version__, "configs": {}}
    for cfg in configs:
        bench_e2e_config(p, cfg, results)


def bench_e2e_config(p: Profile, cfg: E2EConfig, results: dict[str, Any]) -> None:
    say(f"\n  [{cfg.key}] {cfg.title}, batch {cfg.batch}, {cfg.steps} steps, {cfg.reps} interleaved repetition(s)")
    if cfg.key == "4b":
        say("      why this one: a depth-1, 64-wide ViT's forward+backward+step on 128 images costs about as much as "
            "augmenting 128 images in PIL (tens of ms on this class of CPU),")
        say("      so data handling is a visible share of each step, as for small models or fast GPUs; the model is "
            "timm's own (test_vit) at 32 px, patch 4, made by timm.create_model.")
    hwc, labels = synthetic_cifar(cfg.batch * cfg.steps, seed=1)
    data = optbench_data(hwc, labels)
    warm = E2EConfig(cfg.key, cfg.title, cfg.model, cfg.depth, cfg.batch, 2, 1)
    warm_hwc, warm_labels = hwc[:2 * cfg.batch], labels[:2 * cfg.batch]
    # Untimed warm-up of both (Lightning's first fit imports and sets up lazily; allocator and thread pools).
    run_optbench_e2e(warm, optbench_data(warm_hwc, warm_labels), 2)
    run_lightning_e2e(warm, warm_hwc, warm_labels, data.mean, data.std, 2, 0)
    variants = ["optbench"] + [f"lightning workers={w}" for w in p.e2e_workers]
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    t_section = perf()
    for rep in range(cfg.reps):
        order = variants[rep % len(variants):] + variants[:rep % len(variants)]
        for v in order:
            if v == "optbench":
                runs[v].append(run_optbench_e2e(cfg, data, cfg.steps))
            else:
                runs[v].append(run_lightning_e2e(cfg, hwc, labels, data.mean, data.std, cfg.steps,
                                                 int(v.split("=")[1])))
            gc.collect()
    elapsed = perf() - t_section
    summary = {}
    say(f"      ({elapsed:.0f} s) {'':<24}{'wall':>9}{'per step':>11}{'forward':>10}{'backward':>10}{'step':>8}"
        f"{'outside':>10}{'outside share':>15}{'to 1st fwd':>12}")
    n = cfg.steps
    for v, rs in runs.items():
        for r in rs:
            r["outside_s"] = r["wall_s"] - r["forward_s"] - r["backward_s"] - r["step_s"]
            r["outside_share"] = r["outside_s"] / r["wall_s"]
        walls = [r["wall_s"] for r in rs]
        typical = sorted(rs, key=lambda r: r["wall_s"])[(len(rs) - 1) // 2]  # the run with the (lower) median wall
        summary[v] = {"wall_s_median": median(walls), "wall_s_runs": walls,
                      "outside_share": typical["outside_share"], "median_run": typical, "runs": rs}
        per_step = {k: 1e3 * typical[k] / n for k in ("wall_s", "forward_s", "backward_s", "step_s", "outside_s")}
        say(f"      {v:<24}{median(walls):8.2f}s{per_step['wall_s']:9.1f}ms{per_step['forward_s']:8.1f}ms"
            f"{per_step['backward_s']:8.1f}ms{per_step['step_s']:6.1f}ms{per_step['outside_s']:8.1f}ms"
            f"{100 * typical['outside_share']:14.1f}%{typical['to_first_forward_s']:11.2f}s")
    # The baseline is the Lightning variant with the best median wall; each repetition's ratio pairs the
    # optbench run with that variant's run of the same repetition (interleaved, so both saw the same load).
    base = min((v for v in variants if v != "optbench"), key=lambda v: summary[v]["wall_s_median"])
    per_rep = [a / b for a, b in zip(summary["optbench"]["wall_s_runs"], summary[base]["wall_s_runs"])]
    say(f"      (wall: the median of the {cfg.reps} interleaved run(s) of each; the other columns: the run with the "
        "median wall; all walls: "
        + "; ".join(f"{v} " + ", ".join(f"{w:.2f}" for w in summary[v]["wall_s_runs"]) for v in variants)
        + f" s;\n       per-step columns divide by the {n} steps; 'to 1st fwd' = from the start of train()/fit() to "
        "the first training forward)")
    results["e2e"]["configs"][cfg.key] = {"title": cfg.title, "model": cfg.model, "depth": cfg.depth,
                                          "batch": cfg.batch, "steps": cfg.steps, "reps": cfg.reps,
                                          "baseline": base, "variants": summary}
    ratio_line(cfg.key, f"end-to-end time, optbench / Lightning ({base}), {cfg.title}", median(per_rep), results,
               repeats=per_rep,
               optbench=f"{summary['optbench']['wall_s_median']:.2f} s median "
                        f"(outside F/B/S {100 * summary['optbench']['outside_share']:.1f}%)",
               baseline=f"{summary[base]['wall_s_median']:.2f} s median "
                        f"(outside F/B/S {100 * summary[base]['outside_share']:.1f}%)")


# --- machine and summary ---------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for name in ("optbench", "torch", "torchvision", "timm", "lightning", "pytorch-optimizer", "lion-pytorch",
                 "schedulefree", "numpy", "pillow"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"cpu": cpu, "cores": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "platform": platform.platform(), "versions": versions}


def print_summary(results: dict[str, Any]) -> None:
    m = results["machine"]
    say("\n" + "=" * 110)
    quick_note = "; QUICK: smoke-check figures, not measurements" if results["mode"] == "quick" else ""
    say(f"SUMMARY ({results['mode']} mode{quick_note})")
    header = f"{'id':<5}{'figure':<52}{'ratio':>9}  {'target':<10}{'result':<7}"
    say(header)
    say("-" * len(header))
    for r in results.get("ratios", []):
        say(f"{r['id']:<5}{r['label']:<52}{r['ratio']:>8.3f}x  {r['target']:<10}{r['verdict']:<7}")
        say(f"{'':<5}  optbench: {r.get('optbench', '')};  baseline: {r.get('baseline', '')}")
    for key, value in results.get("skipped", {}).items():
        say(f"{key:<5}SKIPPED: {value}")
    say("-" * len(header))
    v = m["versions"]
    say(f"machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), torch threads {m['torch_threads']}, "
        f"Python {m['python']}, {m['platform']}")
    say("versions: " + ", ".join(f"{k} {v[k]}" for k in v if v[k]))
    say(f"load average (1/5/15 min) at start {results['load_start']}, at end {results['load_end']}; "
        f"wall time {results['wall_s']:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="very few steps per section: a smoke check (< 1 min)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)")
    parser.add_argument("--json", metavar="PATH", help="also write every figure to this JSON file")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="torch intra-op threads (default: torch's own default, printed in the summary)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}: choose from {', '.join(SECTIONS)}")
    profile = QUICK if args.quick else FULL
    warnings.filterwarnings("ignore", message=".*worker processes in total.*")
    results: dict[str, Any] = {"mode": profile.name, "profile": asdict(profile), "machine": machine(),
                               "load_start": [round(x, 2) for x in os.getloadavg()]}
    m = results["machine"]
    say(f"optbench benchmarks ({profile.name} mode): {m['cpu']}, {m['cores']} cores, torch {torch.__version__} with "
        f"{m['torch_threads']} threads; load average at start {results['load_start']}")
    if profile.name == "quick":
        say("QUICK MODE: very few steps per section; checks that the script works, the figures mean little.")
    t0 = perf()
    runners = {"data": bench_data, "step": bench_step, "sophia": bench_optimizers, "e2e": bench_e2e,
               "hbatch": bench_hessian_batch}
    for name in SECTIONS:
        if name in sections:
            runners[name](profile, results)
    if "e2e" in sections and "skipped" in results.get("e2e", {}):
        results.setdefault("skipped", {})["4"] = results["e2e"]["skipped"]
    results["wall_s"] = perf() - t0
    results["load_end"] = [round(x, 2) for x in os.getloadavg()]
    print_summary(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
        say(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
