"""Helpers of the bad-input corpus: run ``mmtune`` in-process, then check the one-line error contract.

Each case asserts three things: the exit code, that stderr is ONE line ``mmtune <cmd>: ...`` naming the
culprit (no traceback), and that nothing written before the error was lost or changed
(``snapshot(folder)`` before, compare after).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pytest

from train.cli import main


@dataclass
class CLIResult:
    code: int
    out: str
    err: str


def run_mmtune(argv: list[str], capsys: pytest.CaptureFixture[str]) -> CLIResult:
    """``mmtune *argv`` in this process; SystemExit (argparse) becomes an exit code."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    captured = capsys.readouterr()
    return CLIResult(code, captured.out, captured.err)


def assert_clear_error(result: CLIResult, command: str, *culprits: str, code: int = 2) -> str:
    """Exit ``code``, one line ``mmtune <command>: ...`` on stderr that names every culprit; returns it."""
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert result.code == code, (result.code, result.err)
    assert "Traceback" not in result.err, result.err
    assert len(lines) == 1, result.err
    line = lines[0]
    assert line.startswith(f"mmtune {command}: "), line
    for culprit in culprits:
        assert culprit in line, (culprit, line)
    return line


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``folder`` (to show nothing written before was lost)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_kept(before: dict[str, str], folder: Path) -> None:
    """Every file of ``before`` is still there, unchanged (new files may have appeared)."""
    after = snapshot(folder)
    missing_or_changed = [name for name, digest in before.items() if after.get(name) != digest]
    assert not missing_or_changed, missing_or_changed
