"""The run's records: ``metrics.csv`` (long format: step, split, metric, value), ``events.jsonl`` (one JSON
object a line: resumes and what they changed, unreadable checkpoints skipped, non-finite stops),
TensorBoard when it is installed, and ``curves.png`` (one panel per metric) drawn from the CSV at the end.
JSON is written valid: NaN and infinity become null."""

from __future__ import annotations

import csv
import json
import math
import time
from collections import defaultdict
from pathlib import Path

from mm.state import atomic_write

FIELDS = ["step", "split", "metric", "value"]


def json_safe(data):
    """``data`` with every non-finite float replaced by None (JSON has no NaN; ``json.dumps`` would write a
    bare ``NaN`` that other readers reject)."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {str(k): json_safe(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [json_safe(v) for v in data]
    if hasattr(data, "item") and callable(data.item):  # numpy / torch scalars
        return json_safe(data.item())
    return data


def dumps(data, **kwargs) -> str:
    """Strict JSON of ``data`` (non-finite numbers as null)."""
    return json.dumps(json_safe(data), allow_nan=False, **kwargs)


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of a metrics CSV; a torn last line (the run was killed mid-write) is dropped."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            try:
                rows.append({"step": int(row["step"]), "split": row["split"], "metric": row["metric"],
                             "value": float(row["value"])})
            except (TypeError, ValueError, KeyError):
                continue
    return rows


class RunLog:
    """Appends metrics on the main process; a resumed run first drops the rows after its checkpoint, so
    the file reads as one uninterrupted run."""

    def __init__(self, out_dir: str | Path, enabled: bool, resume_step: int, say=print) -> None:
        self.enabled = enabled
        self.csv_path = Path(out_dir) / "metrics.csv"
        self.events_path = Path(out_dir) / "events.jsonl"
        self.png_path = Path(out_dir) / "curves.png"
        self.tensorboard = None
        if not enabled:
            return
        kept = [r for r in read_metrics(self.csv_path) if r["step"] <= resume_step]
        atomic_write(self.csv_path, lambda tmp: _write_rows(tmp, kept))
        self.handle = open(self.csv_path, "a", newline="")  # noqa: SIM115  (closed in close())
        self.writer = csv.DictWriter(self.handle, fieldnames=FIELDS)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(Path(out_dir) / "tensorboard"), purge_step=resume_step + 1)
        except ImportError:  # optional: metrics.csv is the log; the closing line lists the run folder's files
            pass

    def log(self, step: int, split: str, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        for name, value in metrics.items():
            self.writer.writerow({"step": step, "split": split, "metric": name, "value": repr(float(value))})
            if self.tensorboard is not None:
                self.tensorboard.add_scalar(f"{split}/{name}", value, step)
        self.handle.flush()

    def event(self, step: int, kind: str, **details) -> None:
        """Append one event (``{"step", "event", "time", **details}``) to events.jsonl; main process only."""
        if not self.enabled:
            return
        line = dumps({"step": step, "event": kind, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **details})
        with open(self.events_path, "a") as handle:
            handle.write(line + "\n")

    def close(self) -> Path | None:
        """Close the files and draw the curves; returns the PNG path (None off the main process)."""
        if not self.enabled:
            return None
        self.handle.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        return plot_curves(self.csv_path, self.png_path)


def _write_rows(path: str, rows: list[dict]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows({**r, "value": repr(r["value"])} for r in rows)


def plot_curves(csv_path: str | Path, png_path: str | Path) -> Path:
    """One panel per metric name, train and eval curves of that metric together."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    series: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    for row in read_metrics(csv_path):
        if row["metric"] in ("lr", "samples_per_s", "grad_norm", "step_time_s") or not math.isfinite(row["value"]):
            continue
        series[row["metric"]][row["split"]].append((row["step"], row["value"]))
    names = sorted(series, key=lambda n: (n != "loss", n))
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(4.5 * max(1, len(names)), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=False):
        for split, points in sorted(series[name].items()):
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, marker="o" if split == "eval" else None, markersize=3, label=split)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(png_path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return Path(png_path)
