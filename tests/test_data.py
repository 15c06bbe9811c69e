"""Datasets (real loading code), class-balanced subsets, the seeded batch order and batched augmentation."""

from __future__ import annotations

import os
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from optbench.data import (SPECS, balanced_subset, crop_flip, epoch_plan, load_dataset, steps_per_epoch,
                           train_batches)
from optbench.errors import DataError

# --- real datasets ---------------------------------------------------------------------------------


def test_digits_loads_the_fixed_stratified_split(digits_data):
    d = digits_data
    assert d.train_x.shape == (1437, 1, 8, 8) and d.test_x.shape == (360, 1, 8, 8)
    assert d.train_x.dtype == torch.uint8 and d.train_y.dtype == torch.int64
    assert int(d.train_x.max()) == 255 and int(d.train_x.min()) == 0  # 0..16 scaled to 0..255
    assert sorted(Counter(d.test_y.tolist())) == list(range(10))
    train_counts, test_counts = Counter(d.train_y.tolist()), Counter(d.test_y.tolist())
    for c in range(10):  # stratified: every class split 80/20
        assert abs(test_counts[c] - 0.2 * (train_counts[c] + test_counts[c])) <= 1
    again = load_dataset("digits")
    assert torch.equal(again.train_x, d.train_x) and torch.equal(again.test_y, d.test_y)  # fixed split
    assert torch.allclose(d.mean, d.train_x.float().div(255).mean(dim=(0, 2, 3)))


def test_synthetic_is_deterministic_and_shaped_by_its_spec():
    a, b = load_dataset("synthetic"), load_dataset("synthetic")
    assert a.train_x.shape == (1000, 3, 16, 16) and a.test_x.shape == (300, 3, 16, 16)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_x, b.test_x)
    assert not torch.equal(a.train_x[:300], a.test_x)  # fresh noise for the test split


def test_unknown_dataset_is_a_data_error():
    with pytest.raises(DataError, match="unknown dataset 'mnist'"):
        load_dataset("mnist")


def test_fashion_mnist_missing_without_download_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="Fashion-MNIST not found in .*--data-dir"):
        load_dataset("fashion_mnist", tmp_path, download=False)


def test_normalize_uses_training_statistics(synthetic_data):
    x = synthetic_data.normalize(synthetic_data.train_x)
    assert x.dtype == torch.float32
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(x.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-3)
    assert synthetic_data.train_x.dtype == torch.uint8  # the stored images are untouched


# --- CIFAR through torchvision's own loader, on tiny files in its format ---------------------------


def _pickle(path: Path, obj) -> None:
    path.write_bytes(pickle.dumps(obj))


def write_tiny_cifar(root: Path, name: str, per_file: int = 20, seed: int = 0) -> dict[str, np.ndarray]:
    """Files as torchvision expects them: pickled dicts, `data` N x 3072 uint8 (1024 R, 1024 G, 1024 B,
    row-major), labels under `labels` (CIFAR-10) or `fine_labels` (CIFAR-100), plus the meta file."""
    rng = np.random.default_rng(seed)
    classes = 10 if name == "cifar10" else 100
    folder = root / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    folder.mkdir(parents=True)
    train_files = [f"data_batch_{i}" for i in range(1, 6)] if name == "cifar10" else ["train"]
    test_file = "test_batch" if name == "cifar10" else "test"
    written = {"train_data": [], "train_labels": [], "test_data": None, "test_labels": None}
    for file, split in [(f, "train") for f in train_files] + [(test_file, "test")]:
        data = rng.integers(0, 256, size=(per_file, 3072), dtype=np.uint8)
        labels = (np.arange(per_file) % classes).tolist()
        if name == "cifar10":
            _pickle(folder / file, {"batch_label": file, "data": data, "labels": labels})
        else:
            _pickle(folder / file, {"data": data, "fine_labels": labels, "coarse_labels": [0] * per_file})
        if split == "train":
            written["train_data"].append(data)
            written["train_labels"] += labels
        else:
            written["test_data"], written["test_labels"] = data, labels
    if name == "cifar10":
        _pickle(folder / "batches.meta", {"label_names": [f"class{i}" for i in range(10)]})
    else:
        _pickle(folder / "meta", {"fine_label_names": [f"fine{i}" for i in range(100)],
                                  "coarse_label_names": ["all"]})
    written["train_data"] = np.concatenate(written["train_data"])
    return written


@pytest.fixture
def skip_md5_only(monkeypatch):
    """Bypass torchvision's md5 comparison (tiny files cannot match the real sums) but keep its
    file-exists check. `check_integrity` is what both CIFAR10._check_integrity and _load_meta call."""
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_loads_through_torchvision_in_channel_first_layout(tmp_path, skip_md5_only, name):
    written = write_tiny_cifar(tmp_path, name)
    d = load_dataset(name, tmp_path, download=False)
    n_train = len(written["train_labels"])
    assert d.spec.name == name and d.spec.num_classes == (10 if name == "cifar10" else 100)
    assert d.train_x.shape == (n_train, 3, 32, 32) and d.test_x.shape == (20, 3, 32, 32)
    assert d.train_x.dtype == torch.uint8
    expected_train = torch.from_numpy(written["train_data"].reshape(-1, 3, 32, 32))
    assert torch.equal(d.train_x, expected_train)  # R, G, B planes land in channels 0, 1, 2
    assert torch.equal(d.test_x, torch.from_numpy(written["test_data"].reshape(-1, 3, 32, 32)))
    assert d.train_y.tolist() == written["train_labels"] and d.test_y.tolist() == written["test_labels"]


def test_cifar10_subset_is_class_balanced(tmp_path, skip_md5_only):
    write_tiny_cifar(tmp_path, "cifar10")
    d = load_dataset("cifar10", tmp_path, download=False, subset=30, test_subset=10)
    assert d.train_x.shape[0] == 30 and d.test_x.shape[0] == 10
    assert set(Counter(d.train_y.tolist()).values()) == {3}
    assert set(Counter(d.test_y.tolist()).values()) == {1}


def test_cifar_with_wrong_checksums_is_a_data_error_saying_corrupt(tmp_path):
    write_tiny_cifar(tmp_path, "cifar10")  # right format, but not the real files: md5 differs
    with pytest.raises(DataError, match="fail torchvision's checksum.*delete that folder"):
        load_dataset("cifar10", tmp_path, download=False)


def test_cifar_with_a_file_missing_is_a_data_error(tmp_path, skip_md5_only):
    write_tiny_cifar(tmp_path, "cifar100")
    (tmp_path / "cifar-100-python" / "test").unlink()
    with pytest.raises(DataError, match="CIFAR-100 .*corrupt or incomplete"):
        load_dataset("cifar100", tmp_path, download=False)


@pytest.mark.parametrize("name,title,folder", [("cifar10", "CIFAR-10", "cifar-10-batches-py"),
                                               ("cifar100", "CIFAR-100", "cifar-100-python")])
def test_missing_cifar_without_download_is_a_clear_data_error(tmp_path, monkeypatch, name, title, folder):
    import torchvision.datasets.cifar as tv_cifar

    attempts = []  # download=False must not touch the network at all
    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", lambda *a, **k: attempts.append(a))
    with pytest.raises(DataError) as info:
        load_dataset(name, tmp_path / "nothing-here", download=False)
    message = str(info.value)
    assert attempts == []
    assert message.startswith(f"{title} not found in {tmp_path / 'nothing-here'}")
    assert "--data-dir" in message and f"{folder}/" in message and "\n" not in message
    assert "could not be downloaded" not in message


# --- balanced_subset -------------------------------------------------------------------------------


def test_balanced_subset_is_balanced_sorted_and_fixed():
    labels = np.repeat(np.arange(10), [50, 40, 30, 60, 70, 45, 55, 35, 65, 50])
    idx = balanced_subset(labels, 100, 10)
    assert len(idx) == 100 and len(set(idx.tolist())) == 100
    assert list(idx) == sorted(idx)
    assert set(Counter(labels[idx].tolist()).values()) == {10}
    assert np.array_equal(idx, balanced_subset(labels, 100, 10))  # fixed: same call, same images
    assert not np.array_equal(idx, balanced_subset(labels, 100, 10, seed=1))  # chosen by the seed


def test_balanced_subset_larger_than_data_keeps_everything():
    labels = np.arange(30) % 3
    assert np.array_equal(balanced_subset(labels, 30, 3), np.arange(30))
    assert np.array_equal(balanced_subset(labels, 1000, 3), np.arange(30))


@settings(max_examples=60, deadline=None)
@given(counts=st.lists(st.integers(0, 12), min_size=2, max_size=6), size=st.integers(1, 80),
       seed=st.integers(0, 3))
def test_balanced_subset_counts_differ_by_at_most_one_unless_a_class_ran_out(counts, size, seed):
    labels = np.repeat(np.arange(len(counts)), counts)
    rng = np.random.default_rng(seed)
    labels = labels[rng.permutation(len(labels))]
    if len(labels) == 0:
        return
    idx = balanced_subset(labels, size, len(counts), seed=seed)
    assert len(idx) == min(size, len(labels)) and len(set(idx.tolist())) == len(idx)
    got = Counter(labels[idx].tolist())
    for a in range(len(counts)):
        for b in range(len(counts)):
            if got[a] < got[b] - 1:
                assert got[a] == counts[a]  # a may only fall behind when it has nothing left


# --- augmentation ----------------------------------------------------------------------------------


def _images(b=3, c=2, h=5, w=6, seed=0):
    return torch.randint(1, 256, (b, c, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_crop_with_shift_equal_to_padding_and_no_flip_is_identity():
    x = _images()
    b = x.shape[0]
    for padding in (0, 1, 4):
        shift = torch.full((b,), padding)
        out = crop_flip(x, shift, shift, torch.zeros(b, dtype=torch.bool), padding)
        assert out.shape == x.shape and out.dtype == torch.uint8
        assert torch.equal(out, x)


def test_flip_reverses_columns_only():
    x = _images()
    b = x.shape[0]
    shift = torch.full((b,), 2)
    out = crop_flip(x, shift, shift, torch.ones(b, dtype=torch.bool), 2)
    assert torch.equal(out, x.flip(-1))
    mixed = crop_flip(x, shift, shift, torch.tensor([True, False, True]), 2)
    assert torch.equal(mixed[0], x[0].flip(-1)) and torch.equal(mixed[1], x[1])


def test_crop_shift_translates_with_zero_padding():
    x = _images(b=2)
    padding = 2
    # shift 0: the window starts `padding` pixels above/left of the image -> image moves down/right.
    out = crop_flip(x, torch.tensor([0, 2]), torch.tensor([0, 3]), torch.zeros(2, dtype=torch.bool), padding)
    assert out.shape == x.shape
    assert torch.equal(out[0, :, 2:, 2:], x[0, :, :-2, :-2])
    assert int(out[0, :, :2, :].abs().sum()) == 0 and int(out[0, :, :, :2].abs().sum()) == 0
    assert torch.equal(out[1, :, :, :-1], x[1, :, :, 1:])  # one column to the left
    assert int(out[1, :, :, -1].abs().sum()) == 0


# --- the seeded batch order ------------------------------------------------------------------------


def test_epoch_plan_depends_on_seed_and_epoch_only():
    a = epoch_plan(100, seed=0, epoch=1, padding=2, flip=True, device="cpu")
    b = epoch_plan(100, seed=0, epoch=1, padding=2, flip=True, device="cpu")
    assert sorted(a.order.tolist()) == list(range(100))
    for field in ("order", "shift_y", "shift_x", "flip"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert int(a.shift_y.min()) >= 0 and int(a.shift_y.max()) <= 4
    assert not torch.equal(a.order, epoch_plan(100, 1, 1, 2, True, "cpu").order)  # other seed
    assert not torch.equal(a.order, epoch_plan(100, 0, 2, 2, True, "cpu").order)  # next epoch


def test_train_batches_cover_each_image_once_per_epoch(synthetic_data):
    batches = list(train_batches(synthetic_data, 16, seed=0, epoch=1, augment=False))
    n = synthetic_data.train_x.shape[0]
    assert len(batches) == steps_per_epoch(n, 16) == 13
    assert [y.shape[0] for _, y in batches] == [16] * 12 + [8]  # the last batch is smaller
    labels = torch.cat([y for _, y in batches])
    assert sorted(labels.tolist()) == sorted(synthetic_data.train_y.tolist())
    x0 = batches[0][0]
    assert x0.dtype == torch.float32 and x0.shape == (16, 3, 16, 16)
    first = epoch_plan(n, 0, 1, 0, False, "cpu").order[:16]
    assert torch.equal(x0, synthetic_data.normalize(synthetic_data.train_x[first]))


def test_augmented_batches_are_seeded_and_differ_from_plain_ones(synthetic_data):
    a = [x for x, _ in train_batches(synthetic_data, 50, seed=3, epoch=1, augment=True)]
    b = [x for x, _ in train_batches(synthetic_data, 50, seed=3, epoch=1, augment=True)]
    plain = [x for x, _ in train_batches(synthetic_data, 50, seed=3, epoch=1, augment=False)]
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not torch.equal(a[0], plain[0])


def test_digits_spec_has_no_augmentation_to_do():
    spec = SPECS["digits"]
    assert spec.crop_padding == 0 and spec.flip is False and spec.patch_size == 2


def test_batch_order_is_pinned():
    """Golden values: the batch order and augmentation draws for a seed must not change between versions
    of optbench (or results stop being comparable with earlier records)."""
    from optbench.data import epoch_plan

    assert epoch_plan(1437, 0, 1, 0, False, "cpu").order[:8].tolist() == [364, 396, 531, 839, 1181, 1358, 494, 1218]
    plan = epoch_plan(50000, 3, 7, 4, True, "cpu")
    assert plan.order[:5].tolist() == [20364, 6028, 34635, 34320, 2200]
    assert plan.shift_x[:5].tolist() == [4, 6, 8, 8, 6]


def test_normalize_leaves_a_float_input_untouched():
    import torch

    from optbench.data import load_dataset

    data = load_dataset("synthetic")
    images = data.train_x[:4].float()
    before = images.clone()
    data.normalize(images)
    assert torch.equal(images, before)
