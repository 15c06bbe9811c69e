"""Run records: complete, written atomically under a new name every time, loaded defensively."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest

from optbench.config import RunConfig, identity_hash, identity_of
from optbench.errors import RecordError
from optbench.records import (ensure_writable, find_finished, finished_runs, load_records, record_filename,
                              write_record)

from conftest import OPTIMIZERS

RECORD_FIELDS = ("optimizer", "status", "final_test_acc", "train_wall_time_s", "peak_memory_bytes",
                 "peak_memory_source", "optimizer_state_bytes", "param_count", "epochs_completed", "history",
                 "hessian_updates", "config", "environment")
HISTORY_FIELDS = ("train_loss", "test_loss", "test_acc", "train_time_s")


def minimal_record(**changes):
    """The fewest fields a usable record has; an `ok` one's history is its one epoch, at its final accuracy."""
    record = {"schema_version": 1, "optimizer": "adamw", "status": "ok", "config_hash": "0123456789ab",
              "final_test_acc": 0.5, "train_wall_time_s": 1.0, "config": {"dataset": "digits", "seed": 0, "epochs": 1, "batch_size": 8},
              "started_at": "2026-01-01T00:00:00Z", "finished_at": "2026-01-01T00:01:00Z"}
    record.update(changes)
    if "config_hash" not in changes and isinstance(record["config"], dict):
        record["config_hash"] = identity_hash(identity_of(record["config"]))  # made from its config, as a run does
    acc = record["final_test_acc"]
    if "history" not in changes:
        record["history"] = [{"epoch": 1, "test_acc": acc, "train_time_s": 1.0}] if record["status"] == "ok" \
            and isinstance(acc, (int, float)) and 0 <= acc <= 1 else []
    return record


# --- what a real run writes ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_real_record_holds_every_field_of_the_run_contract(matched_runs, name):
    run = matched_runs[name]
    on_disk = json.loads(run.path.read_text())
    for key in RECORD_FIELDS:
        assert key in on_disk, key
    assert on_disk["optimizer"] == name and on_disk["status"] == "ok"
    assert on_disk["epochs_completed"] == len(on_disk["history"]) == 2
    for row in on_disk["history"]:
        for key in HISTORY_FIELDS:
            assert isinstance(row[key], float), key
    assert isinstance(on_disk["peak_memory_bytes"], int) and on_disk["peak_memory_bytes"] > 0
    assert isinstance(on_disk["peak_memory_source"], str) and on_disk["peak_memory_source"]
    assert on_disk["optimizer_state_bytes"] > 0 and on_disk["param_count"] > 0
    assert on_disk["train_wall_time_s"] > 0
    assert on_disk["final_test_acc"] == on_disk["history"][-1]["test_acc"]
    # The config is the full resolved RunConfig (device resolved from auto), and identifies the run.
    assert set(on_disk["config"]) == set(RunConfig.__dataclass_fields__)
    assert on_disk["config"]["optimizer"] == name and on_disk["config"]["device"] == "cpu"
    env = on_disk["environment"]
    assert env["device"] == "cpu" and env["python"] and env["optbench"]
    for package in ("torch", "timm", "schedulefree", "lion-pytorch", "pytorch-optimizer"):
        assert env["packages"][package], package
    assert on_disk["optimizer_implementation"]["class"]


def test_real_record_accuracies_are_fractions(matched_runs):
    for run in matched_runs.values():
        rec = run.record
        assert 0.0 <= rec["final_test_acc"] <= 1.0
        assert all(0.0 <= row["test_acc"] <= 1.0 for row in rec["history"])
        n_test = rec["dataset"]["test_images"]
        assert all(abs(row["test_acc"] * n_test - round(row["test_acc"] * n_test)) < 1e-6 for row in rec["history"])


def test_real_records_load_back_from_their_directory(matched_runs):
    directory = matched_runs["adamw"].path.parent
    loaded = load_records(directory)
    assert loaded.problems == []
    assert sorted(r["optimizer"] for r in loaded.records) == sorted(["adamw", "adamw", "lion", "sophia",
                                                                     "schedulefree"])
    by_path = {r["_path"]: r for r in loaded.records}
    sophia = matched_runs["sophia"]
    assert by_path[str(sophia.path)]["hessian_updates"] == sophia.record["hessian_updates"]
    assert find_finished(directory, sophia.record["config_hash"])["optimizer"] == "sophia"
    assert find_finished(directory, "ffffffffffff") is None


# --- writing ------------------------------------------------------------------------------------------


def test_writing_the_same_record_twice_gives_two_files(tmp_path):
    record = minimal_record()
    first = write_record(tmp_path, record)
    second = write_record(tmp_path, record)
    assert first != second and first.exists() and second.exists()
    assert first.name == record_filename(record)
    assert json.loads(first.read_text()) == json.loads(second.read_text()) == record
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.name, second.name])  # no temp files left


def test_an_existing_file_under_the_records_name_is_never_replaced(tmp_path):
    record = minimal_record()
    squatter = tmp_path / record_filename(record)
    squatter.write_text("somebody else's file")
    path = write_record(tmp_path, record)
    assert path != squatter
    assert squatter.read_text() == "somebody else's file"
    assert json.loads(path.read_text())["optimizer"] == "adamw"


def test_a_failed_write_leaves_no_partial_record(tmp_path, monkeypatch):
    """Atomic: the record appears complete under its name or not at all."""
    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(RecordError, match="could not write run record.*No space left"):
        write_record(tmp_path, minimal_record())
    assert list(tmp_path.iterdir()) == []


def test_non_finite_numbers_are_written_as_null(tmp_path):
    record = minimal_record(status="diverged", final_test_acc=None,
                            history=[{"epoch": 1, "train_loss": float("inf"), "test_loss": float("nan"),
                                      "test_acc": 0.1, "train_time_s": 0.5}])
    original = copy.deepcopy(record)
    path = write_record(tmp_path, record)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    row = json.loads(text)["history"][0]
    assert row["train_loss"] is None and row["test_loss"] is None and row["test_acc"] == 0.1
    assert record["history"][0]["test_acc"] == original["history"][0]["test_acc"]  # caller's dict untouched
    assert load_records(tmp_path).problems == []


def test_unwritable_results_directory_is_a_record_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(RecordError, match="cannot write to results directory"):
        ensure_writable(blocker / "results")


# --- loading ------------------------------------------------------------------------------------------


def test_a_truncated_record_is_skipped_with_a_message(tmp_path):
    good = write_record(tmp_path, minimal_record())
    text = good.read_text()
    truncated = tmp_path / "truncated.json"
    truncated.write_text(text[: len(text) // 2])
    loaded = load_records(tmp_path)
    assert [r["_path"] for r in loaded.records] == [str(good)]
    assert len(loaded.problems) == 1
    assert loaded.problems[0].startswith("truncated.json: unreadable") and "skipped" in loaded.problems[0]


@pytest.mark.parametrize("content,problem", [
    ([1, 2], "not a run record"),
    ({"optimizer": "adamw"}, "missing status, config, config_hash"),
    (minimal_record(status="exploded"), "unknown status 'exploded'"),
    (minimal_record(final_test_acc=57.5), "final_test_acc 57.5 is not a fraction in [0, 1]"),
    (minimal_record(final_test_acc=-0.1), "is not a fraction"),
    (minimal_record(config="digits"), "config is not an object"),
])
def test_records_that_break_the_contract_are_skipped_with_a_message(tmp_path, content, problem):
    (tmp_path / "bad.json").write_text(json.dumps(content))
    write_record(tmp_path, minimal_record())
    loaded = load_records(tmp_path)
    assert len(loaded.records) == 1
    assert len(loaded.problems) == 1 and loaded.problems[0].startswith("bad.json: ")
    assert problem in loaded.problems[0]


def test_loading_a_missing_directory_is_a_record_error(tmp_path):
    with pytest.raises(RecordError, match="does not exist"):
        load_records(tmp_path / "never-made")


def test_find_finished_takes_the_newest_completed_run(tmp_path):
    write_record(tmp_path, minimal_record(finished_at="2026-01-01T00:01:00Z", final_test_acc=0.1))
    write_record(tmp_path, minimal_record(finished_at="2026-01-02T00:01:00Z", final_test_acc=0.2))
    write_record(tmp_path, minimal_record(finished_at="2026-01-03T00:01:00Z", status="interrupted",
                                          final_test_acc=None))
    found = find_finished(tmp_path, minimal_record()["config_hash"])
    assert found["final_test_acc"] == 0.2
    assert Path(found["_path"]).exists()


def test_find_finished_reads_only_the_files_named_for_its_run(tmp_path, monkeypatch):
    """compare and tune look once per run: each look reads that run's records, not the whole folder's."""
    own = write_record(tmp_path, minimal_record())
    other = write_record(tmp_path, minimal_record(config={"dataset": "digits", "seed": 1, "epochs": 1,
                                                          "batch_size": 8}))
    broken = tmp_path / "digits-adamw-seed2-fedcba987654-20260101T000000Z.json"
    broken.write_text("{")  # unreadable, and another run's: not this look's business
    read, warned = [], []
    real_read_text = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: read.append(self.name) or real_read_text(self, *a, **k))
    found = find_finished(tmp_path, minimal_record()["config_hash"], warn=warned.append)
    monkeypatch.undo()
    assert found["_path"] == str(own) and read == [own.name] and warned == []
    assert find_finished(tmp_path, json.loads(other.read_text())["config_hash"])["_path"] == str(other)
    # The one pass over the folder (compare's first look, report) still names the unreadable file, once.
    skipped = []
    assert set(finished_runs(tmp_path, skipped=skipped.append)) == {minimal_record()["config_hash"],
                                                                    json.loads(other.read_text())["config_hash"]}
    assert len(skipped) == 1 and skipped[0].startswith(f"{broken.name}: unreadable"), skipped


def test_a_record_whose_config_was_edited_is_not_reused_and_is_named(tmp_path):
    """Its config_hash says one run, its config another: it stands for neither."""
    older = write_record(tmp_path, minimal_record(finished_at="2026-01-01T00:01:00Z", final_test_acc=0.1))
    edited = minimal_record(finished_at="2026-01-02T00:01:00Z", final_test_acc=0.2, started_at="2026-01-02T00:00:00Z")
    edited["config"]["batch_size"] = 64  # by hand, after the run: config_hash still says batch size 8
    edited_path = write_record(tmp_path, edited)
    warned, skipped = [], []
    found = find_finished(tmp_path, edited["config_hash"], warn=warned.append)
    assert found["_path"] == str(older)  # the newer record is the edited one: the older, untouched one stands
    assert len(warned) == 1 and "\n" not in warned[0], warned
    assert warned[0].startswith(f"{edited_path.name}: its config is not the one its config_hash")
    assert "put its config back, or move the file out of" in warned[0]
    assert finished_runs(tmp_path, skipped=skipped.append)[edited["config_hash"]]["_path"] == str(older)
    assert skipped == warned  # compare's first look names it in the same words
    older.unlink()
    assert find_finished(tmp_path, edited["config_hash"]) is None  # nothing left to reuse: the run is trained
    assert len(load_records(tmp_path).records) == 1  # reports still read it: only its reuse as that run is refused


def test_a_renamed_record_is_named_by_the_one_pass_and_found_by_no_look(tmp_path):
    """Runs find their records by name; compare's first look must not reuse what the look under the lock
    cannot see (it would then say "reusing" for a run that `run --resume` or a worker trains again)."""
    written = write_record(tmp_path, minimal_record())
    renamed = written.rename(tmp_path / "adamw-best.json")
    skipped = []
    assert finished_runs(tmp_path, skipped=skipped.append) == {}
    assert skipped == [f"adamw-best.json: its name does not hold its config_hash {minimal_record()['config_hash']}, "
                       f"by which a run's records are found, so it is not reused: name it {written.name}"]
    assert find_finished(tmp_path, minimal_record()["config_hash"]) is None
    renamed.rename(written)
    assert find_finished(tmp_path, minimal_record()["config_hash"])["_path"] == str(written)


def test_every_look_takes_the_same_newest_of_two_records_finished_in_one_second(tmp_path):
    """Two finished records of one run with the same `finished_at` (one-second stamps): compare's look by
    name, the whole folder's look, and the executors' and status's grouping take the same one, the one
    written second (write_record names it -1), whatever order the folder lists them in."""
    from optbench.attempts import newest, records_by_hash, settling_record
    from optbench.records import newest_finished, records_of_runs

    first = write_record(tmp_path, minimal_record(final_test_acc=0.5))
    second = write_record(tmp_path, minimal_record(final_test_acc=0.75))
    assert second.name == first.name.replace(".json", "-1.json")
    config_hash = minimal_record()["config_hash"]
    found = records_of_runs(tmp_path, {config_hash})[config_hash]
    picks = {"find_finished": find_finished(tmp_path, config_hash), "finished_runs": finished_runs(tmp_path)[config_hash],
             "newest": newest(records_by_hash(tmp_path)[config_hash]), "settling": settling_record(found),
             "newest, listed backwards": newest(found[::-1]), "newest_finished, backwards": newest_finished(found[::-1])}
    assert {name: Path(rec["_path"]).name for name, rec in picks.items()} == {name: second.name for name in picks}


def test_status_of_a_checkpoint_removed_while_status_looks_is_no_traceback(tmp_path, monkeypatch):
    """A stopped run's checkpoint that goes away while `status` reads it (its run finished meanwhile, and
    the record replaced it): status still answers (one look at the file, not a check then a second look)."""
    import optbench.status
    from optbench.status import grid_status, record_plan

    config_hash = "0123456789ab"
    record_plan(tmp_path, [{"config_hash": config_hash, "optimizer": "adamw", "seed": 0}])
    checkpoint = tmp_path / "checkpoints" / f"{config_hash}.pt"
    checkpoint.write_bytes(b"a checkpoint of a stopped run\n")
    assert [run.state for run in grid_status(tmp_path)[0]] == ["stopped"]
    real_read_header = optbench.status.read_header

    def removed_while_read(path):  # the run finishes and removes its checkpoint as status reads its header
        path.unlink(missing_ok=True)
        return real_read_header(path)

    monkeypatch.setattr(optbench.status, "read_header", removed_while_read)
    assert [run.state for run in grid_status(tmp_path)[0]] in (["stopped"], ["planned"])
    assert [run.state for run in grid_status(tmp_path)[0]] == ["planned"]  # gone: nothing to resume


def test_status_counts_a_renamed_or_edited_record_as_no_run_of_its_hash(tmp_path):
    """`optbench status` says what compare and the workers would do: a record they do not reuse (renamed
    away from its hash, or its config edited) does not make the planned run finished there either."""
    from optbench.status import grid_status, record_plan

    config_hash = minimal_record()["config_hash"]
    record_plan(tmp_path, [{"config_hash": config_hash, "optimizer": "adamw", "seed": 0}])
    written = write_record(tmp_path, minimal_record())
    assert [run.state for run in grid_status(tmp_path)[0]] == ["finished"]
    renamed = written.rename(tmp_path / "adamw-best.json")
    assert find_finished(tmp_path, config_hash) is None  # compare, run --resume and the workers train it again
    assert [run.state for run in grid_status(tmp_path)[0]] == ["planned"]
    edited = json.loads(renamed.read_text())
    edited["config"]["batch_size"] = 64
    renamed.unlink()
    write_record(tmp_path, edited)
    assert find_finished(tmp_path, config_hash) is None
    assert [run.state for run in grid_status(tmp_path)[0]] == ["planned"]
