"""AVSR manifests: a ``.csv`` (header row) or ``.jsonl`` (one object a line) listing utterances.

Columns / keys:
    audio   a .wav/.flac file, or a video file whose audio track is the speech (optional if video is given)
    video   a .mp4 (any container FFmpeg reads) or frames .npy (optional if audio is given)
    text    the transcript (required, non-empty)
    id      a name for the utterance (default: the row's line number)
    start   seconds into the files where the utterance starts (optional; default 0)
    end     seconds where it ends (optional; default: the end of the files)
    crop    the mouth box in the video's pixels, "x y width height" (csv) or [x, y, w, h] (jsonl) (optional;
            default: the recipe's data.mouth_box, else the whole picture)

Paths are relative to the manifest's folder unless absolute. A row whose fields are wrong is an
``AVSRDataError`` naming the file, the line and the key (errors in the files the row names are the
dataset's to report, so that ``on_error: skip`` can count them).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from mm.errors import MMTuneError

MANIFEST_SUFFIXES = (".csv", ".jsonl")
KEYS = ("id", "audio", "video", "text", "start", "end", "crop")


class ManifestError(MMTuneError, ValueError):
    """A manifest row is malformed; the message names the file, line and key."""


@dataclass
class ManifestRow:
    line: int
    id: str
    audio: Path | None
    video: Path | None
    text: str
    start: float | None
    end: float | None
    crop: tuple[int, int, int, int] | None


def is_manifest(name: str) -> bool:
    return Path(name).suffix.lower() in MANIFEST_SUFFIXES


def _records(path: Path) -> list[tuple[int, dict]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ManifestError(f"{path}: unreadable manifest ({err})") from None
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames or not {"audio", "video"} & set(reader.fieldnames) or "text" not in reader.fieldnames:
            raise ManifestError(f"{path}: line 1: the header must name 'text' and 'audio' and/or 'video', got "
                                f"{reader.fieldnames}")
        return [(number, row) for number, row in enumerate(reader, start=2)]
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ManifestError(f"{path}: line {number}: not JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise ManifestError(f"{path}: line {number}: expected a JSON object, got {type(record).__name__}")
        records.append((number, record))
    return records


def _seconds(path: Path, number: int, key: str, value) -> float | None:
    if value is None or value == "":
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ManifestError(f"{path}: line {number}: key '{key}' expects seconds, got {value!r}") from None
    if seconds < 0:
        raise ManifestError(f"{path}: line {number}: key '{key}' must be >= 0, got {seconds}")
    return seconds


def _crop(path: Path, number: int, value) -> tuple[int, int, int, int] | None:
    if value is None or value == "":
        return None
    parts = value.replace(",", " ").split() if isinstance(value, str) else value
    try:
        box = [float(v) for v in parts]
    except (TypeError, ValueError):
        box = []
    if len(box) != 4 or any(v != int(v) or v < 0 for v in box) or box[2] < 1 or box[3] < 1:
        raise ManifestError(f"{path}: line {number}: key 'crop' expects 4 integers 'x y width height' "
                            f"(width, height >= 1), got {value!r}")
    return tuple(int(v) for v in box)


def _file(path: Path, value) -> Path | None:
    if value is None or str(value).strip() == "":
        return None
    file = Path(str(value).strip())
    return file if file.is_absolute() else path.parent / file


def read_manifest(path: str | Path) -> list[ManifestRow]:
    """The rows of a manifest, checked for their own fields (see the module doc)."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: no such manifest file")
    rows, seen = [], set()
    for number, record in _records(path):
        unknown = sorted(set(record) - set(KEYS))
        if unknown:
            raise ManifestError(f"{path}: line {number}: unknown key(s) {unknown}; known: {list(KEYS)}")
        audio, video = _file(path, record.get("audio")), _file(path, record.get("video"))
        if audio is None and video is None:
            raise ManifestError(f"{path}: line {number}: give 'audio' or 'video' (or both)")
        text = record.get("text")
        if not isinstance(text, str) or not text.strip():
            raise ManifestError(f"{path}: line {number}: key 'text' expects a non-empty transcript, got {text!r}")
        start, end = _seconds(path, number, "start", record.get("start")), _seconds(path, number, "end",
                                                                                      record.get("end"))
        if end is not None and end <= (start or 0.0):
            raise ManifestError(f"{path}: line {number}: key 'end' ({end}) must be after 'start' ({start or 0.0})")
        name = str(record.get("id") or f"line{number}")
        if name in seen:
            raise ManifestError(f"{path}: line {number}: key 'id' {name!r} repeats an earlier row")
        seen.add(name)
        rows.append(ManifestRow(number, name, audio, video, " ".join(text.split()), start, end,
                                _crop(path, number, record.get("crop"))))
    if not rows:
        raise ManifestError(f"{path}: the manifest lists no utterance")
    return rows


def chunk_by_words(words: list[tuple[str, float, float]], max_seconds: float,
                   total_seconds: float) -> list[tuple[float, float, list[tuple[str, float, float]]]] | None:
    """Cuts an utterance of ``total_seconds`` into pieces of at most ``max_seconds`` at word boundaries.

    ``words``: (word, start, end) seconds from the utterance's start (LRS3's table). Returns (begin, end,
    the piece's words) per piece: a piece begins at its first word (the first piece at 0 when that fits) and
    runs to the next piece's first word (the last one to the end), capped at ``max_seconds``. None when there
    are no timings or one word alone is longer than ``max_seconds``."""
    if not words:
        return None
    pieces, first = [], 0
    while first < len(words):
        begin = 0.0 if first == 0 and words[0][2] <= max_seconds else words[first][1]
        last = first
        if words[last][2] - begin > max_seconds:
            return None
        while last + 1 < len(words) and words[last + 1][2] - begin <= max_seconds:
            last += 1
        following = words[last + 1][1] if last + 1 < len(words) else total_seconds
        pieces.append((begin, min(max(following, words[last][2]), begin + max_seconds), words[first : last + 1]))
        first = last + 1
    return pieces
