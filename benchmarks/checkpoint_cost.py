"""What a checkpoint save costs, where it goes, and the save before and after issue 17's change.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/checkpoint_cost.py [--repeats 9] [--dir FOLDER]

The payload is what a run saves at an epoch's end (optbench/experiment.py `save`): ViT-Tiny on CIFAR-100
(patch 4, 32 px, depth 12) with AdamW's state after one step, its scheduler, RNG, progress and history:
66.7 MB serialised. It is built once; then, in each of --repeats rounds, every variant below runs once,
in an order that rotates from round to round (interleaved, so a change in the machine's load touches all
of them alike), one torch thread. Printed: the median and min-max per variant, and the load average.

  save: torch.save        torch.save(payload, file): no digest, no fsync, the zip's CRC-32 on (the floor)
  save: before (v2)       save_checkpoint as it was at f6c3f24 (kept below, verbatim): torch.save to a
                          BytesIO, getvalue(), SHA-256, header + blob written, fsync, rename
  save: now               optbench.checkpoints.save_checkpoint: torch.save streamed into the file through
                          a writer that hashes each chunk (no copy of the payload in memory), no zip
                          CRC-32, the header written in its kept place, fsync, rename
  part: ...               the parts of a save, timed one by one in the same rounds: torch.save into memory
                          with and without the zip's CRC-32, getvalue() (a copy of the blob), SHA-256 of it,
                          write to the page cache, fsync of that file
  load: before / now      load_checkpoint before (v2 code below) and now, of the file each wrote
and, once after the rounds, the peak of the Python heap during each save (tracemalloc: the in-memory copy
of the payload the save before made).

Files go to --dir (default: a temporary folder in the current directory, i.e. the disk `results/` is
on, since /tmp may be a RAM disk where fsync costs nothing); its file system is printed.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import statistics
import sys
import tempfile
import time
import tracemalloc
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from optbench.checkpoint_header import MAGIC  # noqa: E402
from optbench.checkpoints import capture_rng, load_checkpoint, save_checkpoint  # noqa: E402
from optbench.data import SPECS  # noqa: E402
from optbench.experiment import warmup_cosine  # noqa: E402
from optbench.models import DEFAULT_MODEL, build_model, resolve_patch_size  # noqa: E402
from optbench.optimizers import BASELINE, BuildContext, get_entry  # noqa: E402
from optbench.train import TrainResult  # noqa: E402


# --- the v2 save and load as they were at f6c3f24 (verbatim but for names and the error paths) ---------------


def save_before(path: Path, payload: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    blob = buffer.getvalue()
    header = MAGIC + b" %d %s\n" % (2, hashlib.sha256(blob).hexdigest().encode())
    tmp = path.parent / f".tmp-bench-{os.getpid()}.pt"
    try:
        with open(tmp, "xb") as handle:
            handle.write(header)
            handle.write(blob)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def load_before(path: Path, config_hash: str) -> dict[str, Any]:
    document = path.read_bytes()
    header, _, blob = document.partition(b"\n")
    parts = header.split(b" ")
    assert len(parts) == 3 and parts[0] == MAGIC and parts[1] == b"2"
    assert hashlib.sha256(blob).hexdigest().encode() == parts[2]
    payload = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    assert payload["config_hash"] == config_hash
    return payload


# --- the payload ---------------------------------------------------------------------------------------------


def epoch_end_payload() -> dict[str, Any]:
    """What experiment.py's `save` writes at the end of epoch 1 of a 50-epoch CIFAR-100 run."""
    torch.manual_seed(0)
    spec = SPECS["cifar100"]
    patch = resolve_patch_size(DEFAULT_MODEL, spec, None)
    model = build_model(DEFAULT_MODEL, spec, 0, patch, None)
    steps_per_epoch, epochs = 391, 50
    total = steps_per_epoch * epochs
    entry = get_entry(BASELINE)
    optimizer = entry.make(model, entry.defaults(), BuildContext("cpu", total_steps=total, warmup_steps=500)).optimizer
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total, 500))
    x, y = torch.randn(8, spec.channels, spec.image_size, spec.image_size), torch.randint(0, spec.num_classes, (8,))
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    progress = TrainResult(steps=steps_per_epoch, images_seen=50_000, train_time_s=600.0, eval_time_s=20.0,
                           epochs_done=1, history=[{"epoch": 1, "train_loss": 4.1, "test_loss": 3.9, "test_acc": 0.1,
                                                    "train_time_s": 600.0, "steps": steps_per_epoch, "lr": 1e-3}])
    return {"config_hash": "0123456789ab", "optimizer_name": BASELINE, "total_steps": total,
            "steps_per_epoch": steps_per_epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "rng": capture_rng(torch.device("cpu")),
            "progress": asdict(progress), "memory_probe": None, "memory_probe_reused_from": None,
            "hessian_estimates": None, "wall_time_s": 620.0}


# --- timing ----------------------------------------------------------------------------------------------------


def stats(values: list[float]) -> str:
    return (f"median {statistics.median(values) * 1000:7.1f} ms  (min {min(values) * 1000:7.1f}, "
            f"max {max(values) * 1000:7.1f}, n={len(values)})")


def file_system(folder: Path) -> str:
    best, kind = "", "?"
    try:
        for line in open("/proc/mounts"):
            _, mount, fs_type = line.split()[:3]
            if str(folder.resolve()).startswith(mount) and len(mount) > len(best):
                best, kind = mount, fs_type
    except OSError:
        pass
    return f"{kind} (mounted at {best or '?'})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--dir", type=Path, default=None, help="where the files go (default: ./.checkpoint-bench-*)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    folder = Path(tempfile.mkdtemp(prefix=".checkpoint-bench-", dir=args.dir or Path.cwd()))
    try:
        measure(folder, args.repeats)
    finally:
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()


def measure(folder: Path, repeats: int) -> None:
    payload = epoch_end_payload()

    held: dict[str, Any] = {}

    def part_serialise(crc: bool) -> Callable[[], None]:
        def run() -> None:
            before = torch.serialization.get_crc32_options()
            torch.serialization.set_crc32_options(crc)
            try:
                buffer = io.BytesIO()
                torch.save(payload, buffer)
            finally:
                torch.serialization.set_crc32_options(before)
            if crc:
                held["buffer"] = buffer  # what the v2 save went on with
        return run

    def part_getvalue() -> None:
        held["blob"] = held["buffer"].getvalue()

    def part_sha256() -> None:
        hashlib.sha256(held["blob"]).hexdigest()

    written = folder / "part.bin"

    def part_write() -> None:
        with open(written, "wb") as handle:
            handle.write(held["blob"])
            handle.flush()

    def part_fsync() -> None:  # the file part_write just left in the page cache
        fd = os.open(written, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    variants: dict[str, Callable[[], None]] = {
        "save: torch.save": lambda: torch.save(payload, folder / "plain.pt"),
        "save: before (v2)": lambda: save_before(folder / "before.pt", payload),
        "save: now": lambda: save_checkpoint(folder / "now.pt", payload),
        "load: before (v2)": lambda: load_before(folder / "before.pt", "0123456789ab"),
        "load: now": lambda: load_checkpoint(folder / "now.pt", "0123456789ab"),
        # the v2 save's steps, in its order (each needs the one before), then the serialisation without CRC-32
        "part: torch.save to memory, CRC-32 on": part_serialise(True),
        "part: getvalue()": part_getvalue,
        "part: SHA-256 of the blob": part_sha256,
        "part: write (to the page cache)": part_write,
        "part: fsync": part_fsync,
        "part: torch.save to memory, CRC-32 off": part_serialise(False),
    }
    saves = [k for k in variants if k.startswith("save:")]
    loads = [k for k in variants if k.startswith("load:")]
    parts = [k for k in variants if k.startswith("part:")]
    for name in variants:
        variants[name]()  # one untimed warm-up each
    times: dict[str, list[float]] = {name: [] for name in variants}
    load_avg = [os.getloadavg()[0]]
    for round_ in range(repeats):
        # saves in an order that rotates each round, then the loads of what they wrote (rotating too), then
        # the parts in the order they depend on each other
        turn = round_ % len(saves)
        order = saves[turn:] + saves[:turn] + (loads if round_ % 2 == 0 else loads[::-1]) + parts
        for name in order:
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
        load_avg.append(os.getloadavg()[0])
    sizes = {"blob": held["buffer"].getbuffer().nbytes}
    print(f"payload: {sizes['blob'] / 1e6:.1f} MB serialised ({DEFAULT_MODEL} on CIFAR-100, {BASELINE} state); "
          f"folder {folder} on {file_system(folder)}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} torch thread(s), OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS')}, {os.cpu_count()} cores; {repeats} interleaved rounds")
    print(f"load average (1 min) during the rounds: {min(load_avg):.2f}-{max(load_avg):.2f}")
    for name, values in times.items():
        print(f"{name:42s} {stats(values)}")
    for name in ("save: before (v2)", "save: now"):  # memory, once each after the timed rounds (tracemalloc slows)
        tracemalloc.start()
        variants[name]()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        print(f"{name:42s} peak Python heap during the save (tracemalloc): {peak / 1e6:.1f} MB")
    for what in ("save", "load"):
        ratios = [b / a for a, b in zip(times[f"{what}: before (v2)"], times[f"{what}: now"])]
        print(f"{what}: now / before, per round: median {statistics.median(ratios):.2f}x "
              f"(min {min(ratios):.2f}, max {max(ratios):.2f})")


if __name__ == "__main__":
    main()
