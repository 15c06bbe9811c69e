"""SIGTERM at any moment of a run ends it with exit 130, as documented: during imports, during set-up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from optbench.records import load_records

RUN = [sys.executable, "-m", "optbench.cli", "run", "-o", "adamw", "--preset", "smoke", "--dataset", "synthetic",
       "--depth", "1", "--epochs", "2", "--batch-size", "100", "--device", "cpu"]


def start(results: Path) -> subprocess.Popen:
    return subprocess.Popen([*RUN, "--results-dir", str(results)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_sigterm_while_torch_is_imported_exits_130(tmp_path: Path):
    proc = start(tmp_path)
    deadline = time.time() + 120
    while "torch" not in Path(f"/proc/{proc.pid}/maps").read_text():  # the command is importing torch
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (proc.returncode, err)
    assert "Traceback" not in err


def test_sigterm_during_set_up_exits_130_with_an_interrupted_record(tmp_path: Path):
    proc = start(tmp_path)
    seen = ""
    while "loading synthetic" not in seen:  # the run holds its lock and has started its set-up
        line = proc.stderr.readline()  # the progress console writes to stderr
        assert line, f"the run ended before its set-up: {proc.communicate()}"
        seen += line
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (proc.returncode, err)
    assert "Traceback" not in err
    (record,) = load_records(tmp_path).records
    assert record["status"] == "interrupted" and record["steps"] == 0, record["status_detail"]
    assert "set-up" in record["status_detail"]
