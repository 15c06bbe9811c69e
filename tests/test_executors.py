"""Executors with the real code paths: `--workers 2` processes, submitit's LocalExecutor (the same
submission, signal and requeue machinery as SLURM, as local processes), a SIGKILLed worker, a preempted
task, and the NFS-safe run lock. Tiny runs (synthetic 16x16 images, depth 1, 3 epochs, 1 thread)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from optbench.checkpoints import acquire_run_lock, lock_is_stale, read_lock

TINY_CLI = ["--preset", "smoke", "--dataset", "synthetic", "--subset", "200", "--test-subset", "60", "--depth", "1",
            "--batch-size", "16", "--device", "cpu", "--quiet"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}


def compare(results: Path, *extra: str, wait: bool = True):
    args = [sys.executable, "-m", "optbench", "compare", *TINY_CLI, "--results-dir", str(results), *extra]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    if not wait:
        return proc
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return out + err


def status(results: Path) -> str:
    done = subprocess.run([sys.executable, "-m", "optbench", "status", str(results)], capture_output=True, text=True,
                          env={**_env(), "COLUMNS": "250"}, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def records(results: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(results.glob("*.json"))]


def ok_once(results: Path) -> dict[tuple[str, int], dict]:
    """Every run has exactly one ok record; returns them by (optimizer, seed)."""
    found = [r for r in records(results) if r["status"] == "ok"]
    counts = Counter(r["config_hash"] for r in found)
    assert counts and set(counts.values()) == {1}, counts
    return {(r["optimizer"], r["config"]["seed"]): r for r in found}


def wait_for_checkpoint_holder(results: Path, proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    """Once some run has written a checkpoint: (pid holding it, its config hash), from the run lock."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        for ckpt in (results / "checkpoints").glob("*.pt"):
            owner = read_lock(ckpt.with_suffix(".lock"))
            if owner and isinstance(owner.get("pid"), int):
                return owner["pid"], ckpt.stem
        time.sleep(0.05)
    raise AssertionError("no run wrote a checkpoint in time")


def test_workers_train_every_run_once_with_the_serial_weights(tmp_path: Path):
    grid = ["--optimizers", "adamw,lion", "--seeds", "0,1", "--epochs", "1"]
    compare(tmp_path / "serial", *grid, "--threads", "1")
    compare(tmp_path / "workers", *grid, "--workers", "2")  # cores/2 = 1 thread each on this machine
    serial, parallel = ok_once(tmp_path / "serial"), ok_once(tmp_path / "workers")
    assert len(parallel) == 4 and serial.keys() == parallel.keys()
    for key in serial:
        assert parallel[key]["config"]["threads"] == 1 == parallel[key]["environment"]["cpu_threads"]
        assert parallel[key]["config_hash"] == serial[key]["config_hash"]
        assert parallel[key]["final_weights_sha256"] == serial[key]["final_weights_sha256"], key
    assert len(records(tmp_path / "workers")) == 4
    out = compare(tmp_path / "workers", *grid, "--workers", "2")  # nothing left to do: all reused
    assert out.count("reusing") == 4 and len(records(tmp_path / "workers")) == 4


def test_a_sigkilled_worker_costs_only_its_run_which_resumes(tmp_path: Path):
    results = tmp_path / "r"
    # Ten short epochs: the first checkpoint seen is an early epoch's, with most of the run still to go.
    proc = compare(results, "--optimizers", "adamw,lion", "--seeds", "0", "--epochs", "10", "--workers", "2",
                   wait=False)
    pid, killed_hash = wait_for_checkpoint_holder(results, proc)
    assert pid != proc.pid
    # Frozen while `status` looks (it takes seconds to start, longer than this tiny run has left): the worker
    # can neither finish its run nor let go of the lock before it is killed.
    os.kill(pid, signal.SIGSTOP)
    assert killed_hash not in {r["config_hash"] for r in records(results)}, "the run finished before it was stopped"
    shown = status(results)
    assert any(killed_hash in line and "running" in line and f"pid {pid}" in line
               and "last checkpoint: epoch" in line for line in shown.splitlines()), shown
    os.kill(pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    done = ok_once(results)
    assert len(done) == 2 and len(records(results)) == 2  # no second record of any run
    resumed = {r["config_hash"]: r["resumed"] for r in done.values()}
    assert resumed[killed_hash] is True  # taken over from its checkpoint, not started again
    assert not list((results / "checkpoints").glob("*.lock"))
    assert status(results).strip().splitlines()[-1] == "2 finished"


def test_compare_through_submitits_local_executor_survives_preemption(tmp_path: Path):
    """The grid goes to submitit as a job array; one task gets submitit's preemption signal (USR2) mid-run:
    the run stops after its step, saves its checkpoint, submitit requeues the task, and the run resumes to
    the same weights as an uninterrupted run."""
    results = tmp_path / "r"
    grid = ["--optimizers", "adamw,lion", "--seeds", "0", "--epochs", "10"]  # the signal arrives early in the run
    proc = compare(results, *grid, "--executor", "submitit-local", "--workers", "2", wait=False)
    pid, preempted = wait_for_checkpoint_holder(results, proc)
    os.kill(pid, signal.SIGSTOP)  # frozen while `status` looks, so the tiny run cannot finish before the signal
    assert preempted not in {r["config_hash"] for r in records(results)}, "the run finished before it was stopped"
    shown = status(results)
    jobs = json.loads((results / "slurm" / "jobs.json").read_text())[0]["jobs"]
    assert len(jobs) == 2 and f"SLURM jobs submitted: {', '.join(jobs)}" in shown
    assert any(preempted in line and "running" in line and "job " in line for line in shown.splitlines()), shown
    os.kill(pid, signal.SIGUSR2)  # pending while the task is stopped, delivered when it continues
    os.kill(pid, signal.SIGCONT)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    done = ok_once(results)
    by_hash = {r["config_hash"]: r for r in done.values()}
    assert by_hash[preempted]["resumed"] is True
    statuses = Counter(r["status"] for r in records(results) if r["config_hash"] == preempted)
    assert statuses == {"interrupted": 1, "ok": 1}
    logs = "".join(p.read_text() for p in (results / "slurm").glob("*_log.*"))
    assert "Requeued job" in logs  # submitit's own requeue, not a retry of ours
    compare(tmp_path / "serial", *grid, "--threads", "1", "--optimizers", by_hash[preempted]["optimizer"])
    serial = ok_once(tmp_path / "serial")
    assert next(iter(serial.values()))["final_weights_sha256"] == by_hash[preempted]["final_weights_sha256"]


def test_run_lock_is_exclusive_names_its_owner_and_is_broken_only_when_stale(tmp_path: Path):
    lock = acquire_run_lock(tmp_path, "abc")
    assert lock is not None and acquire_run_lock(tmp_path, "abc") is None  # O_EXCL: one holder
    owner = read_lock(lock.path)
    assert owner["pid"] == os.getpid() and owner["host"] and not lock_is_stale(owner)
    lock.release()
    assert not lock.path.exists()
    # A holder killed outright leaves its file: on this host a dead pid makes it stale at once.
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time; from optbench.checkpoints import acquire_run_lock; "
        f"l = acquire_run_lock({str(tmp_path)!r}, 'abc'); print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True, env=_env())
    assert holder.stdout.readline().strip() == "held"
    assert acquire_run_lock(tmp_path, "abc") is None  # alive: not stale
    holder.kill()
    holder.wait()
    assert lock_is_stale(read_lock(tmp_path / "checkpoints" / "abc.lock"))
    taken = acquire_run_lock(tmp_path, "abc")
    assert taken is not None
    taken.release()
    # Another host's lock is stale only when its heartbeat stops (by the file's clock).
    path = tmp_path / "checkpoints" / "abc.lock"
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "t"}))
    assert acquire_run_lock(tmp_path, "abc") is None
    old = time.time() - 1000
    os.utime(path, (old, old))
    taken = acquire_run_lock(tmp_path, "abc")
    assert taken is not None and read_lock(path)["token"] == taken.token
    taken.release()


def test_a_lock_from_another_pid_namespace_with_this_host_name_is_judged_by_its_heartbeat(tmp_path: Path):
    """Containers run with host networking share the host's name but not its pids: a holder's pid missing here
    may be alive there. Before, such a live lock was broken at once and the run trained twice."""
    import socket

    from optbench.runlock import pid_space

    gone = subprocess.Popen(["true"])
    gone.wait()  # no such process here
    path = tmp_path / "checkpoints" / "abc.lock"
    path.parent.mkdir(parents=True)
    for space, stale in ((pid_space() + "-another-container", False), (pid_space(), True), (None, True)):
        owner = {"host": socket.gethostname(), "pid": gone.pid, "token": "t",
                 **({"pid_space": space} if space is not None else {})}  # None: a lock from before pid_space
        path.write_text(json.dumps(owner))
        assert lock_is_stale(read_lock(path)) is stale, owner
        taken = acquire_run_lock(tmp_path, "abc")
        assert (taken is None) is not stale, owner
        if taken is not None:
            taken.release()
        path.unlink(missing_ok=True)
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": gone.pid, "token": "t",
                                "pid_space": pid_space() + "-another-container"}))
    old = time.time() - 1000
    os.utime(path, (old, old))
    assert lock_is_stale(read_lock(path))  # its heartbeat stopped: stale wherever it was held
    taken = acquire_run_lock(tmp_path, "abc")
    assert read_lock(taken.path)["pid_space"] == pid_space()
    taken.release()


def test_slurm_settings_from_cluster_yaml_and_options_reach_the_sbatch_script(tmp_path: Path, monkeypatch):
    """The lab's cluster.yaml (OPTBENCH_CONFIG_DIR), overridden by options, becomes submitit's sbatch script:
    one array of worker tasks, the preemption signal before the time limit, extra sbatch settings."""
    from submitit.slurm.slurm import _make_sbatch_string

    from optbench.errors import ConfigError
    from optbench.executors import cluster_section, slurm_options, slurm_parameters

    (tmp_path / "cluster.yaml").write_text("slurm:\n  partition: gpu\n  time_min: 240\n  sbatch: {account: mylab}\n"
                                           "  setup: ['module load cuda']\n")
    monkeypatch.setenv("OPTBENCH_CONFIG_DIR", str(tmp_path))
    options = slurm_options(cluster_section(), {"array_parallelism": 2, "cpus_per_task": 8})
    script = _make_sbatch_string(command="python -m submitit.core._submit X", folder=str(tmp_path / "slurm"),
                                 map_count=4, **slurm_parameters(options, tasks=4))
    for line in ("#SBATCH --partition=gpu", "#SBATCH --time=240", "#SBATCH --gpus-per-task=1",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --array=0-3%2", "#SBATCH --signal=USR2@120",
                 "#SBATCH --account=mylab", "module load cuda"):
        assert line in script, line
    with pytest.raises(ConfigError, match="unknown setting"):
        slurm_options({"partitoin": "gpu"}, {})
    with pytest.raises(ConfigError, match="time_min must be a whole number >= 1"):
        slurm_options({}, {"time_min": 0})


def test_executor_options_are_checked_before_anything_runs(tmp_path: Path):
    for extra, message in ((["--executor", "cloud"], "unknown --executor 'cloud'"),
                           (["--workers", "0"], "--workers must be at least 1"),
                           (["--slurm-partition", "gpu"], "--slurm-partition applies to --executor slurm"),
                           (["--threads", "0"], "threads must be between 1"),
                           (["--executor", "slurm"], "no SLURM here")):
        done = subprocess.run([sys.executable, "-m", "optbench", "compare", *TINY_CLI, "--results-dir",
                               str(tmp_path / "r"), *extra], capture_output=True, text=True, env=_env(), timeout=120)
        assert done.returncode == 1 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not list((tmp_path / "r").glob("*.json")) if (tmp_path / "r").exists() else True


def test_an_error_ends_the_serial_the_workers_and_the_submitit_compare_alike(tmp_path: Path):
    """attempts.py's rule: an error (here a checkpoint that cannot be loaded) ends the command with its one-line
    message whatever the executor: the run is attempted once (before, with --workers: a worker's traceback,
    then another worker's, then the parent's attempt), its checkpoint file is left as it was, and it gets no
    record."""
    from optbench.compare import plan_runs

    seen = []
    for mode in (["--threads", "1"], ["--threads", "1", "--workers", "2"],
                 ["--threads", "1", "--workers", "2", "--executor", "submitit-local"]):
        results = tmp_path / ("submitit" if "--executor" in mode else "workers" if "--workers" in mode else "serial")
        broken_run = plan_runs("smoke", ["adamw", "lion"], [0], {
            "dataset": "synthetic", "subset": 200, "test_subset": 60, "depth": 1, "batch_size": 16, "device": "cpu",
            "epochs": 1, "threads": 1, "results_dir": str(results)})[0]
        broken = results / "checkpoints" / f"{broken_run.config_hash}.pt"
        broken.parent.mkdir(parents=True)
        broken.write_bytes(b"not a checkpoint at all")
        done = subprocess.run([sys.executable, "-m", "optbench", "compare", *TINY_CLI, "--results-dir", str(results),
                               "--optimizers", "adamw,lion", "--seeds", "0", "--epochs", "1", *mode],
                              capture_output=True, text=True, env={**_env(), "COLUMNS": "250"}, timeout=600)
        out = done.stdout + done.stderr
        assert "Traceback" not in out, out[-3000:]
        assert broken.read_bytes() == b"not a checkpoint at all"
        assert broken_run.config_hash not in {r["config_hash"] for r in records(results)}
        seen.append((done.returncode, [line.replace(str(results), "RESULTS") for line in out.splitlines()
                                       if "cannot be loaded" in line]))
    assert seen[0] == seen[1] == seen[2], seen
    assert seen[0][0] == 1 and len(seen[0][1]) == 1 and seen[0][1][0].startswith("error:"), seen


def test_a_loop_that_asks_again_reads_only_the_runs_not_settled_yet(tmp_path: Path, monkeypatch):
    """A worker asks after each run, the SLURM parent every 2 s: a settled run's records are not read again."""
    from conftest import tiny_config

    from optbench.executors import Grid, Unsettled
    from optbench.experiment import resolve_runtime
    from optbench.records import write_record

    adamw, lion = (resolve_runtime(tiny_config(name, tmp_path)) for name in ("adamw", "lion"))
    unsettled = Unsettled(Grid((adamw, lion)))
    assert unsettled() == [adamw, lion]
    history = [{"epoch": i, "test_acc": 0.5, "train_time_s": float(i)} for i in range(1, adamw.epochs + 1)]
    finished = write_record(tmp_path, {
        "schema_version": 1, "optimizer": adamw.optimizer, "status": "ok", "config": adamw.to_dict(),
        "config_hash": adamw.config_hash, "final_test_acc": 0.5, "train_wall_time_s": 2.0, "history": history,
        "started_at": "2026-01-01T00:00:00Z", "finished_at": "2026-01-01T00:01:00Z"})
    read = []
    real_read_text = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: read.append(self.name) or real_read_text(self, *a, **k))
    assert unsettled() == [lion] and read == [finished.name]  # settled now: read once ...
    read.clear()
    assert unsettled() == [lion] and read == []  # ... and never again


def _waits_for_the_held_run(pid: int, sig: signal.Signals) -> bool:
    """Whether the spawned worker `pid` has begun its task (it catches SIGTERM, its task's first act, and `sig`:
    SigCgt in /proc/PID/status) and sleeps between its looks at the held run (the kernel's nanosleep,
    /proc/PID/wchan). Before that the worker is still unpickling its target or importing: another case."""
    try:
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
        wchan = Path(f"/proc/{pid}/wchan").read_text()
    except OSError:  # not started yet, or gone
        return False
    caught = next((int(line.split()[1], 16) for line in status if line.startswith("SigCgt:")), 0)
    return all(caught >> (s - 1) & 1 for s in (signal.SIGTERM, sig)) and "nanosleep" in wchan


def _process_state(pid: int) -> str:
    """What a worker that did not stop was doing (for the failure message): state, signals, kernel wait."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        wanted = [line for line in lines if line.startswith(("State", "SigPnd", "ShdPnd", "SigBlk", "SigIgn", "SigCgt"))]
        return "; ".join(wanted) + "; wchan " + Path(f"/proc/{pid}/wchan").read_text()
    except OSError:
        return f"process {pid} is gone"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_worker_signalled_while_it_waits_for_a_held_run_stops_as_stopped(tmp_path: Path, capfd, sig):
    """The signal a worker gets when a sibling met an error (SIGTERM) or from Ctrl-C (SIGINT) may find it outside
    a run: here waiting for a run another live process holds. It stops like a stopped run (exit 130, no
    traceback), as the serial compare does. Before: SIGTERM killed it by the default action (taken for a lost
    worker) and Ctrl-C printed a KeyboardInterrupt traceback and ended `compare --workers` with exit 1."""
    import multiprocessing
    import threading

    from conftest import tiny_config

    from optbench.executors import Grid, run_local_workers, run_worker
    from optbench.experiment import resolve_runtime

    config = resolve_runtime(tiny_config("adamw", tmp_path))
    held = acquire_run_lock(tmp_path, config.config_hash)  # a live holder: the worker waits for it
    outcome: dict = {}
    waiting = threading.Thread(target=lambda: outcome.update(
        codes=run_local_workers(run_worker, Grid((config,)), 1, "test", quiet=True)))
    # A shell that starts pytest in the background (or nohup) has it ignore SIGINT, and a child inherits an
    # ignored signal: the worker would then never see this Ctrl-C (three full-suite runs started so failed).
    # Give the worker what a Ctrl-C at a terminal meets: Python's own handler.
    previous_sigint = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        waiting.start()
        deadline = time.time() + 180
        while time.time() < deadline:
            children = multiprocessing.active_children()
            if children and _waits_for_the_held_run(children[0].pid, sig):
                break
            time.sleep(0.2)
        else:
            raise AssertionError("the worker did not start waiting for the held run")
        os.kill(children[0].pid, sig)
        waiting.join(timeout=120)
    finally:
        signal.signal(signal.SIGINT, previous_sigint)
        held.release()
    assert outcome.get("codes") == [130], (outcome, _process_state(children[0].pid), capfd.readouterr().err[-3000:])
    assert "Traceback" not in capfd.readouterr().err
    assert not list(tmp_path.glob("*.json"))  # nothing ran


def _work_signalled_at_exit(payload, name, visible_devices=None, quiet=False):
    """A worker's work that is done, and that gets SIGTERM while the interpreter exits (as the parent's stop
    of a failed worker's siblings may arrive): from an exit handler, so the timing is not left to chance."""
    import atexit

    atexit.register(lambda: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(0.5)))
    return {"worker": name, "interrupted": False, "error": None}


def test_a_worker_signalled_while_it_exits_prints_no_traceback(capfd):
    """Found as a flaky tune test: a --workers sibling stopped (SIGTERM) just as it exited raised
    KeyboardInterrupt in an exit handler, which Python prints as 'Exception ignored ... Traceback'."""
    from optbench.executors import run_local_workers

    codes = run_local_workers(_work_signalled_at_exit, None, 1, "test", quiet=True)
    err = capfd.readouterr().err
    assert codes == [0], err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
