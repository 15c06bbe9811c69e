"""A record that cannot be written at the end does not lose the run: it goes to a fallback folder the
message names, with the file system's own reason; a checkpoint that cannot be written warns why."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from optbench.checkpoints import checkpoint_path
from optbench.errors import RecordError
from optbench.experiment import resolve_runtime, run_experiment
from optbench.records import ensure_writable, load_records

from conftest import tiny_config

NO_SPACE = os.strerror(errno.ENOSPC)  # "No space left on device"


@pytest.fixture
def small_disk(tmp_path):
    """A real 24 MiB file system (tmpfs): it fills up for real. Needs the right to mount."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({made.stderr.strip()})")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(folder: Path) -> Path:
    """Write until the file system refuses (ENOSPC)."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as handle:
        for chunk in (1 << 16, 4096, 1):  # down to the last byte
            try:
                while True:
                    handle.write(b"\0" * chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    return filler


class FillsTheDiskAtTheLastEpoch:
    """Fills the disk once the last epoch is evaluated: the final checkpoint and the record then find it full."""

    def __init__(self, folder: Path, epochs: int):
        self.folder, self.epochs, self.warnings = folder, epochs, []

    def epoch_end(self, row):
        if row["epoch"] == self.epochs:
            fill(self.folder)

    def warn(self, text):
        self.warnings.append(text)

    def __getattr__(self, name):
        return lambda *a, **k: None


def test_a_full_disk_at_the_end_keeps_the_result_in_the_fallback_folder(small_disk, tmp_path, monkeypatch):
    fallback = tmp_path / "fallback"
    monkeypatch.setenv("OPTBENCH_FALLBACK_DIR", str(fallback))
    results = small_disk / "results"
    reporter = FillsTheDiskAtTheLastEpoch(small_disk, epochs=2)
    with pytest.raises(RecordError) as raised:
        run_experiment(tiny_config("adamw", results, memory_probe=False), reporter)
    message = str(raised.value)
    assert NO_SPACE in message and str(fallback) in message and "\n" not in message
    assert "permissions" not in message
    (saved,) = load_records(fallback).records  # the run's result, whole and valid
    assert saved["status"] == "ok" and saved["epochs_completed"] == 2 and saved["final_weights_sha256"]
    assert any(NO_SPACE in w and "could not write checkpoint" in w for w in reporter.warnings), reporter.warnings
    assert not any("pos" in w for w in reporter.warnings)  # not the zip writer's "unexpected pos"
    # On a disk that is full (again: the failed writes' temporaries were removed, which freed their
    # pages) a run is refused before training, for the right reason.
    fill(small_disk / "results")
    with pytest.raises(RecordError, match=f"{NO_SPACE}.*free disk space"):
        run_experiment(tiny_config("adamw", results, memory_probe=False, seed=1))


def test_a_results_path_too_long_for_the_record_name_is_refused_before_training(tmp_path):
    folder, target = tmp_path, os.pathconf("/", "PC_PATH_MAX") - 60  # room for the folder, not for a record in it
    while len(str(folder)) < target - 2:
        folder = folder / ("d" * min(200, target - len(str(folder)) - 1))
    folder.mkdir(parents=True)
    ensure_writable(folder)  # a short name fits ...
    with pytest.raises(RecordError, match="File name too long.*shorter --results-dir"):
        run_experiment(tiny_config("adamw", folder, memory_probe=False))  # ... a record's does not: said at once
    assert not list(folder.iterdir())


def test_the_final_state_is_kept_until_the_record_is_written(tmp_path, monkeypatch):
    """A record that fails everywhere: the final checkpoint stays, and --resume writes the record later
    without training again (same weights)."""
    import optbench.records as records

    config = tiny_config("adamw", tmp_path / "results", memory_probe=False)
    real_write = records.write_record

    def disk_full(results_dir, record):
        raise RecordError(f"could not write run record in {results_dir} ({NO_SPACE})")

    monkeypatch.setattr(records, "write_record", disk_full)
    with pytest.raises(RecordError, match=f"{NO_SPACE}.*OPTBENCH_FALLBACK_DIR"):
        run_experiment(config)
    final = checkpoint_path(config.results_dir, resolve_runtime(config).config_hash)
    before = (final.stat().st_ino, final.stat().st_mtime_ns, final.read_bytes())
    # --resume while the record still cannot be written: the checkpoint holds the final state already,
    # so it is kept as it is, not written again
    with pytest.raises(RecordError, match=f"{NO_SPACE}.*OPTBENCH_FALLBACK_DIR"):
        run_experiment(config, resume=True)
    assert (final.stat().st_ino, final.stat().st_mtime_ns, final.read_bytes()) == before
    monkeypatch.setattr(records, "write_record", real_write)
    steps = []
    record, _ = run_experiment(config, type("R", (), {"__getattr__": lambda self, n: (
        lambda *a, **k: steps.append(a) if n == "progress" else None)})(), resume=True)
    assert record["status"] == "ok" and record["resumed"] is True and record["epochs_completed"] == 2
    assert steps == []  # nothing trained again
    whole, _ = run_experiment(tiny_config("adamw", tmp_path / "whole", memory_probe=False))
    assert record["final_weights_sha256"] == whole["final_weights_sha256"]
