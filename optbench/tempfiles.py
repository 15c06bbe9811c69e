"""Temporary files that become records, checkpoints and cache entries, and the removal of stale ones.

Every such file is written under a dot name that says who writes it, `.tmp-<host>.<space>-<pid>-<random><suffix>`
(<space>: a digest of the writer's pid space, runlock.pid_space: host name, kernel boot, pid namespace), and
then renamed or linked to its final name. A process killed in between leaves it behind (a checkpoint's is as
large as the checkpoint). `remove_stale` deletes the ones no live process is writing: in this pid space, those
whose process is gone; from another one (another host on a shared file system, or another container with
this host name: host networking shares the name, not the pids), from an older optbench that wrote the host
name alone, or with a name that says nothing, those untouched for STALE_AFTER_S (a live writer finishes in
seconds).
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import secrets
import socket
import time
from pathlib import Path

from optbench.runlock import pid_alive, pid_space

PREFIXES = (".tmp-", ".write-test-")
STALE_AFTER_S = 600.0
_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:40] or "host"
_OWNED = re.compile(r"^\.(?:tmp|write-test)-(?P<host>[A-Za-z0-9_.]+)-(?P<pid>\d+)-[0-9a-f]{8}")
# The temporaries optbench writes in a results folder and its checkpoints/ and cache/ (records, checkpoints,
# cache entries, the write test), named as `temp_name` names them, and as an older optbench named them
# (tempfile's 8 random characters after the prefix). A results folder is one the user names
# (`--results-dir .`): another program's `.tmp-` file there is not optbench's to delete, however old.
RESULTS_TEMPORARIES = re.compile(r"^\.(?:tmp-(?:[A-Za-z0-9_.]+-\d+-[0-9a-f]{8}|[a-z0-9_]{8})\.(?:json|pt)"
                                 r"|write-test-(?:[A-Za-z0-9_.]+-\d+-[0-9a-f]{8}x*|[a-z0-9_]{8}))$")


@functools.cache
def _writer_space() -> str:
    """The host part of this process's temporaries: the host name and a digest of the pid space. The `.`
    keeps it in the host characters older names used, so the patterns above match both."""
    return f"{_HOST}.{hashlib.sha256(pid_space().encode()).hexdigest()[:8]}"


def temp_name(suffix: str, prefix: str = ".tmp-") -> str:
    """A fresh temporary file name that says which process writes it."""
    return f"{prefix}{_writer_space()}-{os.getpid()}-{secrets.token_hex(4)}{suffix}"


def is_stale(path: Path, now: float | None = None) -> bool:
    owned = _OWNED.match(path.name)
    if owned and owned["host"] == _writer_space():  # its pid means a process here
        return not pid_alive(int(owned["pid"]))
    try:
        return (now or time.time()) - path.stat().st_mtime > STALE_AFTER_S
    except OSError:
        return False


def remove_stale(*directories: str | Path, names: re.Pattern[str] | None = None) -> list[Path]:
    """Delete stale temporaries in `directories` (not below them); returns what was removed. `names`: only
    those whose name it matches (a folder optbench shares with others, where a `.tmp-` file of another
    program is not optbench's to judge)."""
    removed = []
    for directory in directories:
        try:
            candidates = [p for p in Path(directory).iterdir() if p.name.startswith(PREFIXES)
                          and (names is None or names.match(p.name))]
        except OSError:
            continue
        for path in candidates:
            if path.is_file() and is_stale(path):
                try:
                    path.unlink()
                    removed.append(path)
                except OSError:
                    pass
    return removed
