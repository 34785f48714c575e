"""Run the `memsurgery` CLI in-process, as a user would, and capture what it prints."""

from __future__ import annotations

import pytest

from memsurgery.cli import main


def run_cli(argv, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `memsurgery ARGV`; main() exits on errors only."""
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
        raise SystemExit(0)
    out, err = capsys.readouterr()
    return (exc.value.code or 0), out, err
