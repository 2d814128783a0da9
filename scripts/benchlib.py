"""Shared helpers for mmtune's benchmark scripts: a seeded Llama, a batch, fair timing, peak memory.

The benchmark machines are small (2 cores) and shared by several jobs whose load drifts, so

- ``time_interleaved`` runs the variants in rounds (A, B, C, A, B, C, ...) and reports medians: a load
  spike then hits every variant alike instead of whichever happened to run during it;
- ``peak_rss_mib`` measures one variant in a fresh Python process, because CPU torch has no allocator
  statistics and a process's peak RSS only ever grows: measuring two variants in one process would
  charge the second for the first's high-water mark.

Scripts import this as ``import benchlib`` (``scripts/`` is on ``sys.path`` when a script there runs).
The API is stable: ``bench_llama``, ``bench_batch``, ``time_interleaved``, ``Timing``, ``CLOCKS``,
``peak_rss_mib``, ``markdown_table``, ``bench_parser``, ``set_threads``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import importlib.util
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_PEAK_MARKER = "BENCHLIB_PEAK_JSON "


def bench_llama(seed: int = 0, layers: int = 4, hidden: int = 512, intermediate: int = 1376, heads: int = 8,
                vocab: int = 4096, max_positions: int = 2048):
    """A random-init fp32 ``LlamaForCausalLM`` built from a config (no hub), dropout 0, identical per seed."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max_positions,
        attention_dropout=0.0, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.config.use_cache = False  # training-style forwards: no KV cache to build and keep alive
    return model


def bench_batch(batch: int = 8, seq: int = 256, vocab: int = 4096, seed: int = 0) -> dict[str, Any]:
    """``{"input_ids", "labels"}``: seeded random tokens, labels = inputs (the model shifts them)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch, seq), generator=generator)
    return {"input_ids": input_ids, "labels": input_ids.clone()}


@dataclass
class Timing:
    """Per-call wall times of one variant, in milliseconds."""

    name: str
    times_ms: list[float] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def spread_ms(self) -> tuple[float, float]:
        """(min, max) of the recorded calls: a wide spread means the machine's load changed."""
        return min(self.times_ms), max(self.times_ms)


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def time_interleaved(variants: Mapping[str, Callable[[], Any]], rounds: int = 5, steps: int = 3,
                     warmup: int = 1, clock: str = "wall") -> dict[str, Timing]:
    """Median per-call time of each variant, timed in interleaved rounds.

    Each variant first runs ``warmup`` untimed calls (caches, lazy allocations, optimizer state). Then
    every round runs each variant ``steps`` times in turn, so drifting load is shared fairly.
    ``clock="cpu"`` times this process's CPU seconds instead of wall seconds: with one torch thread on an
    oversubscribed machine it ignores the time spent waiting for a core, so it is far steadier.
    """
    if rounds < 1 or steps < 1:
        raise ValueError(f"rounds and steps must be >= 1, got rounds={rounds}, steps={steps}")
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {sorted(CLOCKS)}, got {clock!r}")
    now = CLOCKS[clock]
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    timings = {name: Timing(name) for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            for _ in range(steps):
                start = now()
                fn()
                timings[name].times_ms.append((now() - start) * 1e3)
    return timings


def _status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _release_free_memory() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # glibc keeps freed pages: hand them back first
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0), so set-up peaks don't count."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _measure_here(script: str, setup_name: str, kwargs: dict[str, Any], steps: int) -> dict[str, float]:
    spec = importlib.util.spec_from_file_location("_benchlib_target", script)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"cannot import benchmark script {script!r}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    step = getattr(module, setup_name)(**kwargs)
    _release_free_memory()
    was_reset = _reset_peak_rss()
    before_kib = _status_kib("VmRSS") or 0
    for _ in range(steps):
        step()
    peak_kib = _status_kib("VmHWM") if was_reset else None
    if peak_kib is None:  # no /proc: ru_maxrss is the lifetime peak (KiB on Linux), an upper bound
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"before_mib": before_kib / 1024, "peak_mib": peak_kib / 1024,
            "growth_mib": (peak_kib - before_kib) / 1024}


def peak_rss_mib(script: str | Path, setup: str, kwargs: Mapping[str, Any] | None = None, steps: int = 2,
                 timeout: float = 900) -> dict[str, float]:
    """Peak RSS growth (MiB) while ``steps`` calls of a step function run, in a fresh process.

    ``script`` is a Python file and ``setup`` the name of a function in it; ``setup(**kwargs)`` (kwargs
    JSON-serialisable) builds everything (model, batch, optimizer) and returns the step callable. The child
    frees what it can, resets the peak-RSS mark, reads RSS, runs the steps and reports
    ``{"before_mib", "peak_mib", "growth_mib"}``; growth = peak during the steps minus RSS before them.
    """
    cmd = [sys.executable, str(Path(__file__).resolve()), "--peak", str(Path(script).resolve()), setup,
           json.dumps(dict(kwargs or {})), str(steps)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    for line in done.stdout.splitlines():
        if line.startswith(_PEAK_MARKER):
            return json.loads(line[len(_PEAK_MARKER):])
    raise RuntimeError(f"peak-memory child for {script}:{setup} failed (exit {done.returncode}):\n"
                       f"{done.stderr[-3000:]}")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-Markdown table; floats printed with one decimal."""
    def cell(value: Any) -> str:
        return f"{value:.1f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def bench_parser(description: str, *, rounds: int) -> argparse.ArgumentParser:
    """The options every model benchmark shares: --quick, --rounds, --steps, --no-memory, --threads."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: smoke-test the script")
    parser.add_argument("--rounds", type=int, default=rounds, help="interleaved timing rounds")
    parser.add_argument("--steps", type=int, default=2, help="timed calls per variant per round")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return parser


def set_threads(threads: int | None) -> None:
    """Apply --threads (None keeps torch's default)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def _main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="benchlib child process: measure peak RSS of one setup")
    parser.add_argument("--peak", nargs=4, metavar=("SCRIPT", "SETUP", "KWARGS_JSON", "STEPS"), required=True)
    script, setup_name, kwargs_json, steps = parser.parse_args(argv).peak
    result = _measure_here(script, setup_name, json.loads(kwargs_json), int(steps))
    print(_PEAK_MARKER + json.dumps(result), flush=True)


if __name__ == "__main__":
    _main()
