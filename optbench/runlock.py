"""Run locks: an exclusive claim on one run (one config hash) in a results directory, safe on network
filesystems, so two processes -- on one machine or on several sharing the directory -- never run the same run.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# --- run locks ---------------------------------------------------------------------------------------
#
# Why not flock: the lock must hold between machines sharing the results directory over a network
# filesystem. Linux's NFS client emulates flock() with byte-range locks through the server (NLM on
# NFSv3, leases on NFSv4) -- but only when lock traffic works: with `nolock` or `local_lock=flock|all`
# mounts, on BeeGFS without global file locks (its default) and on Lustre mounted `localflock`, flock
# succeeds and is local to the node, so two nodes would train the same run without any error. An
# exclusive create (O_CREAT|O_EXCL) is atomic on every one of them (NFSv3 and later implement it in the
# server) and fails loudly where it is not supported. Its cost: a lock file outlives a killed holder, so
# it carries its owner (host, pid) and a heartbeat (the holder touches it every LOCK_HEARTBEAT_S), and
# another process breaks it when it is stale: its holder's pid is gone on this host, or its heartbeat is
# older than LOCK_STALE_S (another host's crash, a lost node). Ages are measured against the file
# server's clock (the mtime of a directory just touched), so clock skew between nodes does not count.
# "This host" is where a pid names one process (`pid_space`): the host name alone is not enough, since
# containers run with host networking share the host's name but not its pids, and a pid absent here may
# be a live holder there.

LOCK_HEARTBEAT_S = 10.0
LOCK_STALE_S = 120.0  # 12 missed heartbeats; longer than NFS attribute caching (acregmax 60 s)


def lock_path(results_dir: str | Path, config_hash: str) -> Path:
    return Path(results_dir) / "checkpoints" / f"{config_hash}.lock"


def read_lock(path: Path) -> dict[str, Any] | None:
    """The lock's owner ({host, pid, token, started_at, job_id, worker}) and `age_s` since its last
    heartbeat by the file server's clock; None if there is no lock or it is unreadable (being written)."""
    try:
        text = path.read_bytes()  # json reads bytes; garbage (not UTF-8) is "unreadable", not a traceback
        mtime = path.stat().st_mtime
    except OSError:
        return None
    try:
        owner = json.loads(text)
    except ValueError:
        owner = None
    if not isinstance(owner, dict):
        return {"unreadable": True, "age_s": _server_now(path.parent) - mtime}
    owner["age_s"] = _server_now(path.parent) - mtime
    return owner


def _server_now(directory: Path) -> float:
    """Now by the clock that stamps the directory's files (the file server's on a network mount)."""
    try:
        os.utime(directory)
        return directory.stat().st_mtime
    except OSError:
        return time.time()


@functools.lru_cache(maxsize=1)
def pid_space() -> str:
    """Where this process's pid means this process: the host name, this boot of the kernel and the pid
    namespace. Two containers with one host name (host networking) or two machines given one name differ."""
    parts = [socket.gethostname()]
    for read in (lambda: Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
                 lambda: os.readlink("/proc/self/ns/pid")):
        try:
            parts.append(read())
        except OSError:
            parts.append("")
    return "|".join(parts)


def pid_is_ours(owner: dict[str, Any]) -> bool:
    """Whether `owner`'s pid (a lock's holder, a tune trial's process) can be looked up from here. An owner
    written before `pid_space` was recorded is judged by its host name."""
    if "pid_space" in owner:
        return owner["pid_space"] == pid_space()
    return owner.get("host") == socket.gethostname()


def pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    try:  # a killed process its parent has not reaped yet (a zombie) still answers kill(pid, 0)
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def lock_is_stale(owner: dict[str, Any] | None) -> bool:
    """A lock nobody holds any more: its process is gone (same host) or its heartbeat stopped."""
    if owner is None:
        return False
    if owner.get("age_s", 0.0) > LOCK_STALE_S:
        return True
    if owner.get("unreadable"):
        return False  # being written right now, or a crash right after creating it (then it ages out)
    return pid_is_ours(owner) and not pid_alive(owner.get("pid"))


def this_process() -> dict[str, Any]:
    """Who holds a lock or runs a trial: {host, pid, pid_space}."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_space": pid_space()}


def run_lost(results_dir: str | Path, config_hash: str | None, process: dict[str, Any] | None,
             started_at: float | None) -> bool:
    """Whether the process that took up a run (`process`: this_process() of it, None when it has not said
    yet; since `started_at`) is gone, for work that holds the run's lock for nearly all its life (a tune
    trial: `tune.trial_lost`):
    - a live lock: not gone (held by that process, or by another one it waits for);
    - a stale lock held by that process: gone (dead on this host, or no heartbeat for LOCK_STALE_S);
    - otherwise (no lock, or a stale one of an earlier attempt, which that process breaks when it takes the
      lock), the process on this host (`pid_is_ours`): gone when it is dead;
    - another host, or not known yet: gone when neither `started_at` nor the run's checkpoint or record is
      younger than LOCK_STALE_S (between taking the work and the lock, or the lock and the end, takes a
      moment, not minutes; `started_at` is the other host's clock, so clock skew must stay well below
      LOCK_STALE_S).
    """
    if config_hash:
        owner = read_lock(lock_path(results_dir, config_hash))
        if owner is not None and not lock_is_stale(owner):
            return False
        if owner is not None and process is not None and all(owner.get(k) == process.get(k) for k in process):
            return True
    if process is not None and pid_is_ours(process):
        return not pid_alive(process.get("pid"))
    if started_at is not None and time.time() - started_at < LOCK_STALE_S:
        return False
    files = [*Path(results_dir).glob(f"*-{config_hash}-*.json"), lock_path(results_dir, config_hash).with_suffix(".pt")] \
        if config_hash else []
    mtimes = [f.stat().st_mtime for f in files if f.exists()]
    return not mtimes or _server_now(Path(results_dir)) - max(mtimes) > LOCK_STALE_S


@dataclass
class RunLock:
    """An exclusive claim on one run (one config hash) in a results directory: a lock file created with
    O_CREAT|O_EXCL holding its owner, touched every LOCK_HEARTBEAT_S by a daemon thread, removed on
    release."""

    path: Path
    token: str
    _stop: threading.Event = field(default_factory=threading.Event)

    def _heartbeat(self) -> None:
        while not self._stop.wait(LOCK_HEARTBEAT_S):
            try:
                if json.loads(self.path.read_text()).get("token") != self.token:
                    print(f"warning: run lock {self.path} was taken over by another process (judged stale): "
                          "two processes may now run this run", file=sys.stderr)
                    return
                os.utime(self.path)
            except (OSError, ValueError):
                pass  # a slow or briefly unreachable filesystem: try again at the next beat

    def start(self) -> "RunLock":
        threading.Thread(target=self._heartbeat, name=f"optbench-lock-{self.path.stem}", daemon=True).start()
        return self

    def release(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        try:
            if json.loads(self.path.read_text()).get("token") == self.token:
                self.path.unlink()
        except (OSError, ValueError):
            pass

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _break_stale(path: Path, stale: dict[str, Any]) -> None:
    """Remove a stale lock, unless it changed meanwhile. One breaker at a time (its own exclusive file),
    so two processes that both saw the same stale lock cannot remove a fresh one the other made."""
    breaker = path.with_suffix(".break")
    try:
        fd = os.open(breaker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        try:  # a breaker that died while breaking
            if _server_now(path.parent) - breaker.stat().st_mtime > LOCK_STALE_S:
                breaker.unlink()
        except OSError:
            pass
        return
    os.close(fd)
    try:
        now = read_lock(path)
        if now is not None and now.get("token") == stale.get("token") and lock_is_stale(now):
            path.unlink()
    except OSError:
        pass
    finally:
        try:
            breaker.unlink()
        except OSError:
            pass


def acquire_run_lock(results_dir: str | Path, config_hash: str) -> RunLock | None:
    """Claim the run, or return None if another live process holds it (a stale lock is broken first)."""
    path = lock_path(results_dir, config_hash)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = read_lock(path)
            if not lock_is_stale(owner):
                return None
            _break_stale(path, owner)
            continue
        token = uuid.uuid4().hex
        owner = {**this_process(), "token": token, "started_at": time.time(),
                 "job_id": os.environ.get("OPTBENCH_JOB_ID") or os.environ.get("SLURM_JOB_ID"),
                 "worker": os.environ.get("OPTBENCH_WORKER")}
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(owner))
            handle.flush()
            os.fsync(handle.fileno())
        return RunLock(path, token).start()
    return None
