"""Temporaries left by killed processes (records, checkpoints, cache entries) are removed at the next
start; those of a live process, or too young to judge, are left alone."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from optbench.experiment import run_experiment
from optbench.tempfiles import STALE_AFTER_S

from conftest import tiny_config

WRITE_AND_DIE = """
import os, sys
from pathlib import Path
from optbench.tempfiles import temp_name
folder = Path(sys.argv[1])
path = folder / temp_name(sys.argv[2])
path.write_bytes(b"half a checkpoint" * 1000)
print(path, flush=True)
os.kill(os.getpid(), 9)  # killed mid-write, as kill -9 does
"""

WRITE_AND_LIVE = WRITE_AND_DIE.replace("os.kill(os.getpid(), 9)", "import time; time.sleep(120)")


def test_a_killed_writers_temporaries_go_and_a_live_ones_stay(tmp_path: Path):
    results = tmp_path / "results"
    folders = {"record": results, "checkpoint": results / "checkpoints", "cache": results / "cache"}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    dead = []
    for what, folder in folders.items():
        suffix = ".pt" if what == "checkpoint" else ".json"
        killed = subprocess.run([sys.executable, "-c", WRITE_AND_DIE, str(folder), suffix], capture_output=True,
                                text=True)
        assert killed.returncode == -9
        dead.append(Path(killed.stdout.strip()))
    live = subprocess.Popen([sys.executable, "-c", WRITE_AND_LIVE, str(folders["checkpoint"]), ".pt"],
                            stdout=subprocess.PIPE, text=True)
    try:
        live_file = Path(live.stdout.readline().strip())
        old_unnamed = folders["checkpoint"] / ".tmp-k2j4l5x_.pt"  # an older optbench's name: judged by age
        old_unnamed.write_bytes(b"x")
        os.utime(old_unnamed, (time.time() - STALE_AFTER_S - 60,) * 2)
        young_unnamed = results / ".tmp-abcdefgh.json"
        young_unnamed.write_bytes(b"x")
        assert all(p.exists() for p in [*dead, live_file, old_unnamed, young_unnamed])

        record, _ = run_experiment(tiny_config("adamw", results, memory_probe=False, epochs=1))
        assert record["status"] == "ok"
        assert not any(p.exists() for p in [*dead, old_unnamed]), [p for p in dead if p.exists()]
        assert live_file.exists() and young_unnamed.exists()
    finally:
        live.kill()
        live.wait()


# The digits split as data.py writes it, with np.savez replaced by a writer that prints the temporary's
# name and then dies mid-write (kill -9) or stays alive (a writer still at work).
SPLIT_WRITER = """
import os, sys, time
import numpy as np
from optbench.data import load_dataset

def savez(handle, **arrays):
    handle.write(b"half a split")
    handle.flush()
    print(handle.name, flush=True)
    if sys.argv[2] == "die":
        os.kill(os.getpid(), 9)
    time.sleep(120)

np.savez = savez
load_dataset("digits", sys.argv[1])
"""


def test_the_data_folders_own_temporaries_go_and_nothing_else(tmp_path: Path):
    """A digits split whose writer was killed is removed at the next load; a live writer's, a young one of
    an older optbench, and files optbench cannot attribute (a user's `.tmp-` file, torchvision's download)
    stay, however old."""
    from optbench.data import load_dataset

    data = tmp_path / "data"
    data.mkdir()
    # The live writer first: a load made after the kill would already remove the killed one's file.
    live = subprocess.Popen([sys.executable, "-c", SPLIT_WRITER, str(data), "live"], stdout=subprocess.PIPE, text=True)
    try:
        live_file = Path(live.stdout.readline().strip())
        killed = subprocess.run([sys.executable, "-c", SPLIT_WRITER, str(data), "die"], capture_output=True, text=True)
        assert killed.returncode == -9, killed.stderr
        dead = Path(killed.stdout.strip())
        assert dead.parent == data and dead.name.startswith(".tmp-") and "digits-split-sklearn" in dead.name
        old = time.time() - STALE_AFTER_S - 60
        old_legacy = data / ".tmp-99999-digits-split-sklearn-0.1.npz"  # an older optbench's name: judged by age
        young_legacy = data / ".tmp-99998-digits-split-sklearn-0.1.npz"
        not_ours = [data / ".tmp-notes.txt", data / ".tmp-myhost-1-0123abcd.npz", data / "cifar-10-python.tar.gz"]
        for path in (old_legacy, young_legacy, *not_ours):
            path.write_bytes(b"x")
        for path in (old_legacy, *not_ours):
            os.utime(path, (old, old))
        assert all(p.exists() for p in (dead, live_file))

        loaded = load_dataset("digits", data)
        assert loaded.train_x.shape[0] == 1437
        assert not dead.exists() and not old_legacy.exists()
        assert live_file.exists() and young_legacy.exists() and all(p.exists() for p in not_ours)
    finally:
        live.kill()
        live.wait()


def test_a_results_folder_keeps_old_dot_files_optbench_cannot_attribute(tmp_path: Path):
    """--results-dir can be a folder the user keeps other files in (`--results-dir .`): a run's start removes
    optbench's own stale temporaries there, an older optbench's unnamed ones included, and nothing else,
    however old (a user's `.tmp-notes.txt`, another program's `.write-test-...`)."""
    results = tmp_path / "here"
    results.mkdir()
    old = time.time() - STALE_AFTER_S - 3600
    ours = [results / ".tmp-abcdefgh.json",  # an older optbench's record temporary (mkstemp)
            results / ".tmp-otherhost-4242-0123abcd.json"]  # a record's from another host, long dead
    not_ours = [results / ".tmp-notes.txt", results / ".tmp-draft-v2.md", results / ".write-test-mine.sh",
                results / ".tmp-0123abcd.npz"]
    for path in (*ours, *not_ours):
        path.write_bytes(b"x")
        os.utime(path, (old, old))

    record, _ = run_experiment(tiny_config("adamw", results, memory_probe=False, epochs=1))
    assert record["status"] == "ok"
    assert not any(p.exists() for p in ours), [p for p in ours if p.exists()]
    assert all(p.exists() for p in not_ours), [p for p in not_ours if not p.exists()]


# A writer in another container with this host name (host networking): its pid space differs, and its pid
# means nothing here. It writes a temporary and exits, so its pid is dead here as a live pid there would be.
WRITE_IN_ANOTHER_PID_SPACE = """
import sys
from pathlib import Path
import optbench.runlock
optbench.runlock.pid_space = lambda: "another container's pid space"
from optbench.tempfiles import temp_name
path = Path(sys.argv[1]) / temp_name(".pt")
path.write_bytes(b"half a checkpoint")
print(path)
"""


def test_a_temporary_of_another_pid_space_with_this_host_name_is_judged_by_age(tmp_path: Path):
    from optbench.tempfiles import _HOST, remove_stale, temp_name

    written = subprocess.run([sys.executable, "-c", WRITE_IN_ANOTHER_PID_SPACE, str(tmp_path)],
                             capture_output=True, text=True, check=True)
    theirs = Path(written.stdout.strip())
    assert theirs.name.startswith(f".tmp-{_HOST}.")  # the same host name as ours
    ours_dead = tmp_path / temp_name(".pt").replace(f"-{os.getpid()}-", "-999999999-")  # no such pid here
    older_young = tmp_path / f".tmp-{_HOST}-999999999-0123abcd.pt"  # an older optbench's name
    older_old = tmp_path / f".tmp-{_HOST}-999999998-0123abcd.pt"
    for path in (ours_dead, older_young, older_old):
        path.write_bytes(b"x")
    os.utime(older_old, (time.time() - STALE_AFTER_S - 60,) * 2)

    removed = remove_stale(tmp_path)
    assert sorted(removed) == sorted([ours_dead, older_old])
    assert theirs.exists() and older_young.exists()
    old_aged = theirs.stat().st_mtime - STALE_AFTER_S - 60
    os.utime(theirs, (old_aged,) * 2)
    assert remove_stale(tmp_path) == [theirs]  # untouched for STALE_AFTER_S: gone
