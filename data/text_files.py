"""Local text-data files read through the ``datasets`` library: jsonl, json, csv, parquet, txt.

Only local files: ``HF_DATASETS_OFFLINE`` is set before ``datasets`` is imported, and the Arrow cache
goes to a temporary folder that is removed once the table is in memory, so nothing is written beside
the data or into the user's cache. Errors name the file (and, where it can be told, the line).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from mm.errors import MMTuneError

#: file suffix -> the ``datasets`` builder that reads it
BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


class TextDataError(MMTuneError, ValueError):
    """A text/instruction/chat data file or record is unusable; the message names the file, line and key."""


def check_utf8(path: Path) -> None:
    """Raise naming the line of the first byte sequence that is not UTF-8 (datasets' own message
    names neither the file nor the line)."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise TextDataError(f"{path}: line {number}: not UTF-8 text (byte {raw[err.start]:#04x} at column "
                                    f"{err.start + 1}); re-encode the file as UTF-8") from None


def first_bad_json_line(path: Path) -> str:
    """' line N: <problem>' of the first JSON-lines line that is not a JSON object, or ''."""
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                return f" line {number}: not valid JSON ({err.msg})"
            if not isinstance(value, dict):
                return f" line {number}: expected a JSON object, got {type(value).__name__}"
    return ""


def record_lines(path: Path) -> list[int] | None:
    """For a JSON-lines file: the file line of each record (blank lines hold none); else None."""
    if path.suffix != ".jsonl":
        return None
    with path.open(encoding="utf-8") as handle:
        return [number for number, line in enumerate(handle, start=1) if line.strip()]


def where(path: Path, index: int, lines: list[int] | None) -> str:
    """How a user finds record ``index`` of ``path``: its line, its csv line, or its row number."""
    if lines is not None and index < len(lines):
        return f"{path}: line {lines[index]}"
    if path.suffix == ".csv":
        return f"{path}: line {index + 2}"  # after the header line
    if path.suffix == ".txt":
        return f"{path}: paragraph {index + 1}"
    return f"{path}: record {index}"


def load_table(path: str | Path) -> Any:
    """The rows of a local data file as an in-memory ``datasets.Dataset``; its format from the suffix."""
    path = Path(path)
    if path.suffix not in BUILDERS:
        raise TextDataError(f"{path}: unknown text data format {path.suffix!r}; expected one of "
                            f"{', '.join(BUILDERS)}")
    if not path.is_file():
        raise TextDataError(f"{path}: no such data file")
    if path.stat().st_size == 0:
        raise TextDataError(f"{path}: the file is empty")
    if path.suffix != ".parquet":
        check_utf8(path)
    os.environ["HF_DATASETS_OFFLINE"] = "1"  # local files only, whatever the user's environment says
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    builder = BUILDERS[path.suffix]
    # a .txt corpus: one document per paragraph (blank-line separated), as plain-text corpora are written
    options = {"sample_by": "paragraph"} if builder == "text" else {}
    try:
        with tempfile.TemporaryDirectory(prefix="mmtune-datasets-") as cache:
            table = datasets.load_dataset(builder, data_files=str(path.resolve()), split="train", cache_dir=cache,
                                          keep_in_memory=True, **options)
    except Exception as err:  # datasets wraps the reader's error in its own generic one
        detail = first_bad_json_line(path) if path.suffix == ".jsonl" else ""
        cause = err.__cause__ or err
        raise TextDataError(f"{path}:{detail or ' not readable as ' + builder} "
                            f"({type(cause).__name__}: {' '.join(str(cause).split())[:300]})") from None
    if len(table) == 0:
        raise TextDataError(f"{path}: holds no records")
    return table
