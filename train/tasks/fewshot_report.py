"""Reports of a few-shot run: a Markdown table (mean and std over seeds, trainable parameters, train time),
the JSON of every run (valid JSON: null, not NaN; rewritten after every finished run), and a PNG plot of
accuracy against shots."""

from __future__ import annotations

import io
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mm.state import atomic_write

TABLE_FILE, JSON_FILE, PLOT_FILE = "fewshot_table.md", "fewshot_results.json", "fewshot_accuracy.png"


def summarize(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (method, shots): accuracy mean and sample std over seeds, params, mean train seconds."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault((record["method"], record["shots"]), []).append(record)
    rows = []
    for (method, shots), runs in groups.items():
        accuracies = [r["accuracy"] for r in runs]
        rows.append({
            "method": method, "shots": shots, "runs": len(runs), "mean": statistics.fmean(accuracies),
            "std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            "trainable_params": max(r["trainable_params"] for r in runs),
            "train_seconds": statistics.fmean(r["train_seconds"] for r in runs),
            "selected_lrs": sorted({r["lr"] for r in runs if r.get("validation")}),
        })
    return rows


def _methods(rows: Sequence[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(r["method"] for r in rows))


def _cell(row: dict[str, Any] | None) -> str:
    """``mean ± std`` in percent, and the lr(s) chosen on validation when there was a selection."""
    if not row:
        return ""
    lrs = row.get("selected_lrs") or []
    chosen = f" (lr {'/'.join(f'{lr:g}' for lr in lrs)})" if lrs else ""
    return f"{100 * row['mean']:.1f} ± {100 * row['std']:.1f}{chosen}"


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """Methods down, shots across; cells are ``mean ± std`` accuracy in percent (with ``--select lr``, the
    learning rates chosen on validation over the seeds in brackets). Zero-shot alone: one accuracy column."""
    shots = sorted({r["shots"] for r in rows if r["shots"] > 0}) or [0]
    cell = {(r["method"], r["shots"]): r for r in rows}
    header = ["method", "trainable params", *[f"{k}-shot" if k else "accuracy" for k in shots], "train s/run"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for method in _methods(rows):
        runs = [cell[(method, k)] for k in shots if (method, k) in cell] or [cell[(method, 0)]]
        zero = cell.get((method, 0))
        values = [zero if zero else cell.get((method, k)) for k in shots]
        texts = [_cell(v) for v in values]
        seconds = statistics.fmean(r["train_seconds"] for r in runs)
        lines.append(f"| {method} | {runs[0]['trainable_params']:,} | " + " | ".join(texts) + f" | {seconds:.2f} |")
    return "\n".join(lines)


def plot_png(rows: Sequence[dict[str, Any]], title: str) -> bytes:
    """Accuracy (%) against shots (log2 axis), one line with std error bars per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shots = sorted({r["shots"] for r in rows if r["shots"] > 0})
    figure, axes = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for method in _methods(rows):
        points = sorted((r for r in rows if r["method"] == method), key=lambda r: r["shots"])
        if len(points) == 1 and points[0]["shots"] == 0:
            axes.axhline(100 * points[0]["mean"], linestyle="--", color="grey", label=f"{method}")
            continue
        axes.errorbar([p["shots"] for p in points], [100 * p["mean"] for p in points],
                      yerr=[100 * p["std"] for p in points], marker="o", capsize=3, label=method)
    if shots:
        axes.set_xscale("log", base=2)
        axes.set_xticks(shots, [str(k) for k in shots])
    axes.set_xlabel("shots per class")
    axes.set_ylabel("test accuracy (%)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def json_safe(value: Any) -> Any:
    """``value`` with NaN/inf floats as None, so the file is valid JSON (which has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return value


def _write_json(path: Path, payload: dict[str, Any]) -> Path:
    text = json.dumps(json_safe(payload), indent=1, allow_nan=False)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _write_table(path: Path, table: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(table + "\n", encoding="utf-8"))


def write_progress(results: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """The JSON (``"complete": false``) and table of the runs finished so far, each written atomically, so
    a later failure or interruption keeps them; ``write_reports`` replaces both at the end."""
    out_dir = Path(out_dir)
    rows = summarize(results["records"])
    return {"table": _write_table(out_dir / TABLE_FILE, markdown_table(rows)),
            "json": _write_json(out_dir / JSON_FILE, {**results, "summary": rows, "complete": False})}


def write_reports(results: dict[str, Any], out_dir: str | Path, title: str = "few-shot accuracy") -> dict[str, Path]:
    """The table, JSON and plot under ``out_dir`` (each written atomically); returns their paths."""
    out_dir = Path(out_dir)
    rows = summarize(results["records"])
    return {
        "table": _write_table(out_dir / TABLE_FILE, markdown_table(rows)),
        "json": _write_json(out_dir / JSON_FILE, {**results, "summary": rows, "complete": True}),
        "plot": atomic_write(out_dir / PLOT_FILE, lambda tmp: Path(tmp).write_bytes(plot_png(rows, title))),
    }
