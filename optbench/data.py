"""Datasets as uint8 tensors on the training device, a seeded batch order, and batched augmentation.

The whole dataset lives on the device as one (N, C, H, W) uint8 tensor; an epoch is a permutation;
augmentation (random crop with zero padding, horizontal flip) is one gather over the whole batch, and
normalisation happens on the float batch. No DataLoader, no workers, no per-image Python.

The batch order and augmentation draws for (seed, epoch) come from a CPU generator and are copied to
the device once per epoch, so they are the same for every optimizer and on every device.

Loading goes through torchvision's dataset classes (they verify the md5 of every CIFAR file; pickle is
code execution, so an unverified CIFAR file is never unpickled outside tests).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from optbench.errors import DataError
from optbench.tempfiles import remove_stale, temp_name


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    title: str
    num_classes: int
    image_size: int
    channels: int
    patch_size: int  # ViT patch: 32 -> 4 gives an 8x8 grid (65 tokens with the class token)
    crop_padding: int  # 0: no random crop
    flip: bool


SPECS = {
    "cifar10": DatasetSpec("cifar10", "CIFAR-10", 10, 32, 3, 4, 4, True),
    "cifar100": DatasetSpec("cifar100", "CIFAR-100", 100, 32, 3, 4, 4, True),
    "fashion_mnist": DatasetSpec("fashion_mnist", "Fashion-MNIST", 10, 28, 1, 4, 2, True),
    # Digits are not mirror-symmetric and 8x8 leaves no room to crop: no augmentation.
    "digits": DatasetSpec("digits", "scikit-learn digits (8x8)", 10, 8, 1, 2, 0, False),
    "synthetic": DatasetSpec("synthetic", "synthetic class templates (16x16)", 10, 16, 3, 4, 2, True),
}


@dataclass
class ImageData:
    """Train and test splits as uint8 (N, C, H, W) images and int64 labels, plus normalisation stats."""

    spec: DatasetSpec
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: torch.Tensor  # per channel, in [0, 1] units, from the training split
    std: torch.Tensor

    def to(self, device: torch.device | str) -> "ImageData":
        return ImageData(self.spec, self.train_x.to(device), self.train_y.to(device), self.test_x.to(device),
                         self.test_y.to(device), self.mean.to(device), self.std.to(device))

    @property
    def device_bytes(self) -> int:
        return sum(t.nbytes for t in (self.train_x, self.train_y, self.test_x, self.test_y))

    def normalize(self, images_uint8: torch.Tensor) -> torch.Tensor:
        x = images_uint8.float()
        if x is images_uint8:  # already float: never scale the caller's tensor in place
            x = x.clone()
        x = x.div_(255.0)
        return x.sub_(self.mean.view(1, -1, 1, 1)).div_(self.std.view(1, -1, 1, 1))


# --- loading ---------------------------------------------------------------------------------------


def _cifar(spec: DatasetSpec, root: Path, download: bool) -> tuple[np.ndarray, ...]:
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if spec.name == "cifar10" else CIFAR100
    folder = root / cls.base_folder

    def load(train: bool):
        return cls(root=str(root), train=train, download=False)

    try:
        train, test = load(True), load(False)
    except RuntimeError:
        if folder.exists() and any(folder.iterdir()):
            raise DataError(
                f"{spec.title} files in {folder} fail torchvision's checksum (corrupt or incomplete): "
                f"delete that folder and download again, or point --data-dir at a good copy"
            ) from None
        if not download:
            raise DataError(f"{spec.title} not found in {root}: pass --data-dir with a folder holding "
                            f"{cls.base_folder}/, or allow downloading") from None
        try:
            cls(root=str(root), train=True, download=True)
            train, test = load(True), load(False)
        except Exception as exc:  # network errors come in many classes (URLError, OSError, ...)
            raise DataError(
                f"{spec.title} not found in {root} and could not be downloaded ({exc.__class__.__name__}): "
                f"download it where there is network and pass --data-dir with the folder holding {cls.base_folder}/"
            ) from None
    # torchvision keeps CIFAR as (N, H, W, C) uint8.
    return (train.data.transpose(0, 3, 1, 2), np.asarray(train.targets),
            test.data.transpose(0, 3, 1, 2), np.asarray(test.targets))


def _fashion_mnist(spec: DatasetSpec, root: Path, download: bool) -> tuple[np.ndarray, ...]:
    from torchvision.datasets import FashionMNIST

    try:
        train = FashionMNIST(root=str(root), train=True, download=download)
        test = FashionMNIST(root=str(root), train=False, download=download)
    except Exception as exc:
        raise DataError(
            f"Fashion-MNIST not found in {root} and could not be downloaded ({exc.__class__.__name__}): "
            "download it where there is network and pass --data-dir with the folder holding FashionMNIST/"
        ) from None
    return (train.data.numpy()[:, None], train.targets.numpy(), test.data.numpy()[:, None], test.targets.numpy())


# The only temporaries optbench writes in a data folder: the digits split's, as `_digits` names them now
# (tempfiles.temp_name: host, pid) and as it did before (.tmp-PID-). Nothing else in a folder the user and
# torchvision share is optbench's to delete.
DIGITS_TEMPORARIES = re.compile(r"^\.tmp-(?:[A-Za-z0-9_.]+-\d+-[0-9a-f]{8}|\d+)-digits-split-sklearn-.+\.npz$")


def _digits(spec: DatasetSpec, data_dir: str | Path = "data") -> tuple[np.ndarray, ...]:
    """The split below, stored once in DATA_DIR/digits-split-sklearn-VERSION.npz: importing scikit-learn
    costs seconds per process (1.5-7 s here), reading the 140 KB file milliseconds. Same arrays either way;
    an unreadable file is split afresh, an unwritable folder only costs the reuse."""
    from importlib import metadata

    stored = Path(data_dir) / f"digits-split-sklearn-{metadata.version('scikit-learn')}.npz"
    try:
        with np.load(stored) as saved:
            return tuple(saved[k] for k in ("train_x", "train_y", "test_x", "test_y"))
    except (OSError, ValueError, KeyError, EOFError):
        pass
    arrays = _digits_split()
    tmp = stored.with_name(temp_name(f"-{stored.name}"))  # names its writer: see DIGITS_TEMPORARIES
    try:
        stored.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as handle:
            np.savez(handle, **dict(zip(("train_x", "train_y", "test_x", "test_y"), arrays)))
        os.replace(tmp, stored)  # atomic: a concurrent reader sees no file or the whole file
    except OSError:
        try:  # a full disk: the half-written file goes at once
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
    return arrays


def _digits_split() -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # 0..16 -> 0..255
    # A fixed stratified 80/20 split: 1,437 train and 360 test images.
    tr_x, te_x, tr_y, te_y = train_test_split(images, digits.target, test_size=0.2, random_state=0,
                                              stratify=digits.target)
    return tr_x, tr_y, te_x, te_y


def _synthetic(spec: DatasetSpec, n_train: int = 1000, n_test: int = 300) -> tuple[np.ndarray, ...]:
    """Deterministic, learnable test data: one random template per class plus per-image noise and shift."""
    rng = np.random.default_rng(1234)
    size, c, k = spec.image_size, spec.channels, spec.num_classes
    templates = rng.uniform(0, 255, size=(k, c, size, size))

    def make(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.arange(n) % k
        noise = rng.normal(0, 60, size=(n, c, size, size))
        return np.clip(templates[labels] + noise, 0, 255).astype(np.uint8), labels

    tr_x, tr_y = make(n_train)
    te_x, te_y = make(n_test)
    return tr_x, tr_y, te_x, te_y


def balanced_subset(labels: np.ndarray, size: int, num_classes: int, seed: int = 0) -> np.ndarray:
    """Indices of `size` items, as equal per class as the data allows, chosen by a fixed seed."""
    if size >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
    chosen: list[int] = []
    depth = 0
    while len(chosen) < size:  # round-robin over classes keeps the counts within one of each other
        for idx in per_class:
            if depth < len(idx) and len(chosen) < size:
                chosen.append(int(idx[depth]))
        depth += 1
    return np.sort(np.asarray(chosen))


def load_dataset(name: str, data_dir: str | Path = "data", download: bool = True, subset: int | None = None,
                 test_subset: int | None = None) -> ImageData:
    """Load a dataset into CPU tensors. `subset`/`test_subset`: fixed class-balanced subsets (seed 0)."""
    if name not in SPECS:
        raise DataError(f"unknown dataset '{name}': choose one of {', '.join(SPECS)}")
    spec = SPECS[name]
    root = Path(data_dir)
    # A writer killed mid-write (kill -9, a preempted job) leaves its temporary: stale ones go now, as the
    # results folder's do at every run's start (optbench/tempfiles.py).
    remove_stale(root, names=DIGITS_TEMPORARIES)
    if name in ("cifar10", "cifar100"):
        arrays = _cifar(spec, root, download)
    elif name == "fashion_mnist":
        arrays = _fashion_mnist(spec, root, download)
    elif name == "digits":
        arrays = _digits(spec, data_dir)
    else:
        arrays = _synthetic(spec)
    tr_x, tr_y, te_x, te_y = arrays
    if subset:
        keep = balanced_subset(tr_y, subset, spec.num_classes)
        tr_x, tr_y = tr_x[keep], tr_y[keep]
    if test_subset:
        keep = balanced_subset(te_y, test_subset, spec.num_classes)
        te_x, te_y = te_x[keep], te_y[keep]
    train_x = torch.from_numpy(np.ascontiguousarray(tr_x))
    stats = train_x.float().div(255.0)
    mean = stats.mean(dim=(0, 2, 3))
    std = stats.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return ImageData(spec, train_x, torch.as_tensor(tr_y, dtype=torch.int64),
                     torch.from_numpy(np.ascontiguousarray(te_x)), torch.as_tensor(te_y, dtype=torch.int64),
                     mean, std)


def validation_size(fraction: float, train_images: int) -> int:
    """How many of `train_images` a validation share of `fraction` holds out."""
    return round(fraction * train_images)


def holdout_validation(data: ImageData, fraction: float, seed: int) -> ImageData:
    """The training split minus a fixed, class-balanced validation split, with that split to evaluate on.

    The validation images are `round(fraction * N)` training images, as equal per class as the data
    allows, chosen by `seed` (the same for every optimizer and trial). In the returned ImageData,
    `test_x`/`test_y` hold the validation split (the loop evaluates whatever sits there) and the real
    test split is not carried at all, so nothing downstream can read it. Normalisation statistics are
    recomputed from the images trained on.
    """
    labels = data.train_y.cpu().numpy()
    size = validation_size(fraction, len(labels))
    if size < data.spec.num_classes or size >= len(labels):
        raise DataError(f"a validation fraction of {fraction:g} of {len(labels)} training images gives {size} "
                        f"validation images: need at least one per class ({data.spec.num_classes}) and some left "
                        "to train on")
    val = balanced_subset(labels, size, data.spec.num_classes, seed)
    keep = np.setdiff1d(np.arange(len(labels)), val)
    val_t, keep_t = torch.from_numpy(val).to(data.train_x.device), torch.from_numpy(keep).to(data.train_x.device)
    train_x = data.train_x.index_select(0, keep_t)
    stats = train_x.float().div(255.0)
    return ImageData(data.spec, train_x, data.train_y.index_select(0, keep_t), data.train_x.index_select(0, val_t),
                     data.train_y.index_select(0, val_t), stats.mean(dim=(0, 2, 3)),
                     stats.std(dim=(0, 2, 3)).clamp_min(1e-3))


# --- batches ---------------------------------------------------------------------------------------


@dataclass
class EpochPlan:
    """The draws of one epoch, made on the CPU from (seed, epoch) and moved to the device once."""

    order: torch.Tensor  # permutation of the training set
    shift_y: torch.Tensor  # crop offsets in [0, 2 * padding]
    shift_x: torch.Tensor
    flip: torch.Tensor  # bool


def epoch_plan(num_images: int, seed: int, epoch: int, padding: int, flip: bool, device) -> EpochPlan:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_images, generator=gen)
    shift_y = torch.randint(0, 2 * padding + 1, (num_images,), generator=gen)
    shift_x = torch.randint(0, 2 * padding + 1, (num_images,), generator=gen)
    flips = torch.rand(num_images, generator=gen) < 0.5 if flip else torch.zeros(num_images, dtype=torch.bool)
    return EpochPlan(order.to(device), shift_y.to(device), shift_x.to(device), flips.to(device))


def crop_flip(images: torch.Tensor, shift_y: torch.Tensor, shift_x: torch.Tensor, flip: torch.Tensor,
              padding: int) -> torch.Tensor:
    """Random crop (zero padding) and horizontal flip of a whole uint8 batch, contiguous (B, C, H, W).

    The padded batch is viewed as all its HxW windows (no copy); one index picks each image's window.
    """
    b, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    windows = padded.unfold(2, h, 1).unfold(3, w, 1)  # (B, C, 2p+1, 2p+1, H, W), a view
    out = windows[torch.arange(b, device=images.device), :, shift_y, shift_x]  # (B, C, H, W)
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def train_batches(data: ImageData, batch_size: int, seed: int, epoch: int, augment: bool, start_step: int = 0
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Normalised float batches for one epoch, from batch `start_step` on (resume). The last may be smaller."""
    n = data.train_x.shape[0]
    padding = data.spec.crop_padding if augment else 0
    plan = epoch_plan(n, seed, epoch, padding, data.spec.flip and augment, data.train_x.device)
    for start in range(start_step * batch_size, n, batch_size):
        idx = plan.order[start:start + batch_size]
        images = data.train_x.index_select(0, idx)  # far cheaper than advanced indexing on dim 0
        if augment and (padding or data.spec.flip):
            images = crop_flip(images, plan.shift_y[idx], plan.shift_x[idx], plan.flip[idx], padding)
        yield data.normalize(images), data.train_y[idx]


def steps_per_epoch(num_images: int, batch_size: int) -> int:
    return -(-num_images // batch_size)
