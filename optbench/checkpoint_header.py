"""A checkpoint's first line: what it is, the SHA-256 of the payload after it, and how far the run got.

    optbench-checkpoint 3 <sha256 of the payload> epoch=<epochs done>/<epochs> step=<steps>/<total steps>

Version 2 (before the progress fields) wrote the first three fields only, as version 3 does for a
payload without progress (tests build such); both versions are read. No torch here: `optbench status`
reads how far a stopped run got from this line, without loading a payload of tens of megabytes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"optbench-checkpoint"
VERSION = 3
READABLE_VERSIONS = (2, 3)
_PROGRESS = re.compile(rb"epoch=(\d+)/(\d+) step=(\d+)/(\d+)")
LONGEST = 512  # bytes: a header is about 120; more than this is not a header


@dataclass(frozen=True)
class Header:
    """A header of a version this optbench reads. Its version number is not kept: parsing already tells
    versions apart (a version 2 line has no progress), and nothing after it depends on the number."""

    sha256: bytes  # hex digits, as written
    # Version 3 (None for 2, or for a payload without progress): epochs fully done of the planned epochs,
    # steps taken of the planned steps.
    epochs_done: int | None = None
    epochs: int | None = None
    steps: int | None = None
    total_steps: int | None = None


def header_line(sha256_hex: str, reached: tuple[int, int, int, int] | None) -> bytes:
    """`reached`: (epochs done, epochs, steps, total steps), or None for a payload that says none."""
    line = MAGIC + b" %d %s" % (VERSION, sha256_hex.encode())
    return line + (b" epoch=%d/%d step=%d/%d" % reached if reached is not None else b"") + b"\n"


def parse_header(line: bytes) -> Header | None:
    """The header in `line` (without its newline), or None if it is not one this optbench reads."""
    parts = line.split(b" ", 3)
    if len(parts) < 3 or parts[0] != MAGIC or not parts[1].isdigit() or int(parts[1]) not in READABLE_VERSIONS:
        return None
    version, digest = int(parts[1]), parts[2]
    if len(digest) != 64:
        return None
    if len(parts) == 3:
        return Header(digest)
    progress = _PROGRESS.fullmatch(parts[3]) if version >= 3 else None
    return Header(digest, *(int(g) for g in progress.groups())) if progress else None


def read_header(path: Path) -> Header | None:
    """The header of the checkpoint at `path` (its first line only is read), or None."""
    try:
        with open(path, "rb") as handle:
            line = handle.readline(LONGEST)
    except OSError:
        return None
    return parse_header(line.rstrip(b"\n")) if line.endswith(b"\n") else None
