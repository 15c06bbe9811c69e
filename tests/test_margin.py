"""`--margin` is checked by one validator, the same for compare, tune and report."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from optbench.cli import app


@pytest.mark.parametrize("command", [["compare", "--preset", "smoke"], ["tune", "--preset", "smoke"], ["report"]])
@pytest.mark.parametrize("margin", ["nan", "-1", "inf", "-inf", "100", "1e400"])
def test_nonsense_margins_are_refused_in_one_line(tmp_path, command, margin):
    argv = [*command, *([str(tmp_path)] if command == ["report"] else ["--results-dir", str(tmp_path)]),
            "--margin", margin]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 1, result.output
    assert "--margin must be a number in [0, 100)" in result.output and "Traceback" not in result.output
    assert not list(tmp_path.iterdir())  # refused before anything ran or was written
