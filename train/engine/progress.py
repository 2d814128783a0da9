"""Progress bars that suit where the output goes: tqdm redrawing one line in place on a terminal, and a few
plain lines (at each quarter of the work, and at the end) when stderr is a file or a pipe, where tqdm's
carriage returns would pile up into one unreadable line of a log."""

from __future__ import annotations

import sys
from typing import Any, TextIO

#: Fractions of the total at which a plain (non-terminal) progress line is printed.
PLAIN_MARKS = (0.25, 0.5, 0.75)


class PlainProgress:
    """The subset of tqdm's interface the commands use, printing ``desc: 50% (10/20) key=value`` lines."""

    def __init__(self, total: int, desc: str, initial: int, stream: TextIO) -> None:
        self.total, self.desc, self.n, self.stream = total, desc, initial, stream
        self.postfix, self.printed = "", -1
        self.marks = [m for m in PLAIN_MARKS if m * total > initial]
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        passed = [m for m in self.marks if self.n >= m * self.total]
        if passed:
            self.marks = self.marks[len(passed):]
            self._print()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = " ".join(f"{key}={value}" for key, value in values.items())

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.printed != self.n and self.total:
                self._print()

    def _print(self) -> None:
        percent = 100 * self.n / self.total if self.total else 100.0
        line = f"{self.desc}: {percent:3.0f}% ({self.n}/{self.total})" + (f" {self.postfix}" if self.postfix else "")
        print(line, file=self.stream, flush=True)
        self.printed = self.n


class NoProgress:
    """A bar that shows nothing (progress switched off, or not the main process)."""

    def update(self, n: int = 1) -> None: ...

    def set_postfix(self, **values: Any) -> None: ...

    def set_postfix_str(self, text: str) -> None: ...

    def close(self) -> None: ...


def progress_bar(total: int, desc: str, enabled: bool = True, initial: int = 0, unit: str = "it",
                 stream: TextIO | None = None) -> Any:
    """tqdm on a terminal; ``PlainProgress`` lines when ``stream`` (default stderr) is not one."""
    stream = stream if stream is not None else sys.stderr
    if not enabled:
        return NoProgress()
    if not (hasattr(stream, "isatty") and stream.isatty()):
        return PlainProgress(total, desc, initial, stream)
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=stream, dynamic_ncols=True)
