"""The Optuna storage of `tune`'s studies: opened for the workers (`open_storage`), or for reading only
(`open_study_storage`, for `optbench status`). No torch here: `optbench status` stays quick."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

from optbench.attempts import MAX_RETRY
from optbench.errors import OptbenchError, RecordError

DEFAULT_HEARTBEAT_S = 10
STUDY_FILE = "optuna.sqlite3"


class StorageError(OptbenchError):
    """A study storage that cannot be opened."""


def default_storage(results_dir: str | Path) -> str:
    return f"sqlite:///{Path(results_dir).resolve() / 'tune' / STUDY_FILE}"


def open_storage(url: str, heartbeat_s: int = DEFAULT_HEARTBEAT_S):
    """An Optuna storage for `url`.

    - `sqlite:///PATH`, `postgresql://USER@HOST:PORT/DB` (any SQLAlchemy URL): `RDBStorage` with
      heartbeats every `heartbeat_s` seconds, a grace period of 3x that, and stale trials re-queued by
      `RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)`.
    - `journal:PATH`: `JournalStorage(JournalFileBackend(PATH))`, one append-only file on a shared
      filesystem, no database server. Optuna has no heartbeat for it: a trial whose worker was killed is
      told apart by its run's lock instead (`fail_lost_trials`).
    """
    import optuna

    _quiet_optuna()
    try:
        if url.startswith("journal:"):
            from optuna.storages.journal import JournalFileBackend

            path = Path(url[len("journal:"):]).expanduser()
            path.parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
        engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
        url = _with_postgres_driver(url)
        if url.startswith("sqlite:///"):
            Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.RDBStorage(
            url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_s, grace_period=3 * heartbeat_s,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY))
    except Exception as exc:  # SQLAlchemy, driver and filesystem errors come in many classes
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
        raise StorageError(f"cannot open the Optuna storage {_redact(url)} ({exc.__class__.__name__}: {first}): "
                        "check --storage (sqlite:///PATH, postgresql://USER@HOST:PORT/DB or journal:PATH)") from None


def _with_postgres_driver(url: str) -> str:
    """SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3; the `postgres` extra installs psycopg2.
    Name the driver that is installed when the URL names none."""
    import importlib.util

    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None \
            and importlib.util.find_spec("psycopg2") is not None:
        return "postgresql+psycopg2://" + url[len("postgresql://"):]
    return url


def _redact(url: str) -> str:
    """The URL without a password, for messages."""
    if "://" in url and "@" in url.split("://", 1)[1]:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}" if ":" in creds else url
    return url


class _TrialFailureLines(logging.Filter):
    """Optuna logs a failed trial in two warnings, one with the exception's traceback. `tune` reports every
    failure itself (attempts.py): a stop re-queues the trial, an error is the command's one-line message,
    and any other exception is raised again with its traceback; so these two lines are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (record.name == "optuna.study._optimize" and message.startswith("Trial ") and " failed with " in message)


def _quiet_optuna() -> None:
    import optuna

    optuna.logging.set_verbosity(logging.WARNING)
    for handler in logging.getLogger("optuna").handlers:
        if not any(isinstance(f, _TrialFailureLines) for f in handler.filters):
            handler.addFilter(_TrialFailureLines())
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", category=FutureWarning, module="optuna")
    warnings.filterwarnings("ignore", message=".*balance properties of Sobol.*")


def heartbeat_enabled(storage) -> bool:
    from optuna.storages._heartbeat import is_heartbeat_enabled

    return is_heartbeat_enabled(storage)


def open_study_storage(url: str):
    """An Optuna storage opened for reading only: SQLite read-only, no table creation or schema upgrade,
    no heartbeat; a journal or database file that is not there is an error, never created."""
    import optuna

    _quiet_optuna()
    try:
        if url.startswith("journal:"):
            path = Path(url[len("journal:"):]).expanduser()
            if not path.is_file():
                raise RecordError(f"no Optuna journal at {path}: pass the --storage the tune used")
            return optuna.storages.JournalStorage(_journal_reader(path))
        if url.startswith("sqlite:///"):
            path = Path(url[len("sqlite:///"):])
            if not path.is_file():
                raise RecordError(f"no Optuna study file at {path}: pass the --storage the tune used")
            url = f"sqlite:///file:{path.resolve()}?mode=ro&uri=true"
        return optuna.storages.RDBStorage(_with_postgres_driver(url), skip_table_creation=True,
                                          skip_compatibility_check=True)
    except RecordError:
        raise
    except Exception as exc:  # SQLAlchemy, driver and filesystem errors come in many classes
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
        raise RecordError(f"cannot read the Optuna storage {_redact(url)} ({exc.__class__.__name__}: {first}): "
                          "pass the --storage the tune used") from None


def _journal_reader(path: Path):
    """A journal file opened for reading only (Optuna's journal backend interface, `BaseJournalBackend`).
    Optuna's own JournalFileBackend creates the file when it is not there and appends under a lock file
    beside it; status must do neither (a read-only mount, another user's file and folder), so this one
    reads the lines as that backend does (a last line without its newline is still being appended) and
    refuses to write."""
    import json

    from optuna.storages.journal import BaseJournalBackend

    class JournalReader(BaseJournalBackend):
        def __init__(self) -> None:
            self._next = (0, 0)  # (log number, byte offset) after the last complete line read

        def read_logs(self, log_number_from: int):
            number, offset = self._next if log_number_from >= self._next[0] else (0, 0)
            with open(path, "rb") as handle:
                handle.seek(offset)
                for line in handle:
                    if not line.endswith(b"\n"):
                        break
                    try:
                        log = json.loads(line)
                    except ValueError:
                        raise RecordError(f"the Optuna journal {path} is damaged (line {number + 1} is not JSON): "
                                          "restore it from a copy, or pass the --storage the tune used") from None
                    number, offset = number + 1, offset + len(line)
                    self._next = (number, offset)
                    if number > log_number_from:
                        yield log

        def append_logs(self, logs: list) -> None:
            raise RecordError(f"the Optuna journal {path} is opened to be read only: nothing here writes to it")

    return JournalReader()
