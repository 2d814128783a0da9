"""Shared helpers for mmtune's benchmark scripts: a seeded Llama, a batch, fair timing, peak memory.

The benchmark machines are small (2 cores) and shared by several jobs whose load drifts, so

- ``time_interleaved`` runs the variants in rounds (A, B, C, A, B, C, ...) and reports medians: a load
  spike then hits every variant alike instead of whichever happened to run during it;
- ``peak_rss_mib`` measures one variant in a fresh Python process, because CPU torch has no allocator
  statistics and a process's peak RSS only ever grows: measuring two variants in one process would
  charge the second for the first's high-water mark.

On a GPU (``--device cuda``) the same functions wait for the device: ``time_interleaved`` synchronises
before and after every timed call (CUDA kernels run asynchronously: without it a step "ends" when its
last kernel is queued), and ``peak_memory_mib`` reads the CUDA allocator's peak
(``torch.cuda.max_memory_allocated``) in the fresh process instead of RSS.

Scripts import this as ``import benchlib`` (``scripts/`` is on ``sys.path`` when a script there runs).
The API is stable: ``bench_llama``, ``bench_batch``, ``time_interleaved``, ``Timing``, ``CLOCKS``,
``peak_rss_mib``, ``peak_memory_mib``, ``markdown_table``, ``bench_parser``, ``set_threads``,
``check_device``, ``synchronize``, ``to_device``, ``describe_device``, ``memory_label``, ``cuda_peak_mib``,
``resolve_sizes``.
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


def is_cuda(device: str) -> bool:
    return str(device).startswith("cuda")


def synchronize(device: str) -> None:
    """Wait until ``device`` has finished its queued work (no-op on the CPU)."""
    if is_cuda(device):
        import torch

        torch.cuda.synchronize(device)


def to_device(value: Any, device: str) -> Any:
    """``value`` (a module, a tensor, or a dict/list/tuple of them) on ``device``."""
    if isinstance(value, dict):
        return {key: to_device(item, device) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(to_device(item, device) for item in value)
    return value.to(device) if hasattr(value, "to") else value


def time_interleaved(variants: Mapping[str, Callable[[], Any]], rounds: int = 5, steps: int = 3,
                     warmup: int = 1, clock: str = "wall", device: str = "cpu") -> dict[str, Timing]:
    """Median per-call time of each variant, timed in interleaved rounds.

    Each variant first runs ``warmup`` untimed calls (caches, lazy allocations, optimizer state). Then
    every round runs each variant ``steps`` times in turn, so drifting load is shared fairly.
    ``clock="cpu"`` times this process's CPU seconds instead of wall seconds: with one torch thread on an
    oversubscribed machine it ignores the time spent waiting for a core, so it is far steadier.
    On a CUDA ``device`` each timed call starts and ends with a synchronisation, and only the wall clock
    is allowed (the host's CPU seconds do not measure the GPU's work).
    """
    if rounds < 1 or steps < 1:
        raise ValueError(f"rounds and steps must be >= 1, got rounds={rounds}, steps={steps}")
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {sorted(CLOCKS)}, got {clock!r}")
    if clock != "wall" and is_cuda(device):
        raise ValueError(f"clock {clock!r} does not measure GPU work; use the wall clock with {device}")
    now = CLOCKS[clock]
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    timings = {name: Timing(name) for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            for _ in range(steps):
                synchronize(device)
                start = now()
                fn()
                synchronize(device)
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
    if is_cuda(kwargs.get("device", "cpu")):
        return cuda_peak_mib(step, kwargs["device"], steps)
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


def cuda_peak_mib(step: Callable[[], Any], device: str, steps: int = 2) -> dict[str, float]:
    """CUDA allocator peak while ``steps`` calls of ``step`` run: {"before_mib", "peak_mib", "growth_mib"}.
    Exact in the calling process too (the allocator's peak can be reset, unlike a process's peak RSS)."""
    import torch

    _release_free_memory()
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    for _ in range(steps):
        step()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {"before_mib": before / 2**20, "peak_mib": peak / 2**20, "growth_mib": (peak - before) / 2**20}


def peak_memory_mib(script: str | Path, setup: str, kwargs: Mapping[str, Any] | None = None, steps: int = 2,
                    device: str = "cpu", timeout: float = 900) -> dict[str, float]:
    """``peak_rss_mib`` on the CPU; on a CUDA ``device`` the CUDA allocator's peak growth over the steps
    (``torch.cuda.max_memory_allocated`` minus what was allocated before them), also in a fresh process.
    ``setup`` is called with ``device=device`` added to ``kwargs`` and must build everything on it.
    On CUDA the measurement runs in this process (the allocator's peak resets exactly; no second CUDA
    start-up per variant), with the step and what it built freed afterwards."""
    kwargs = {**dict(kwargs or {}), "device": device}
    if not is_cuda(device):
        return peak_rss_mib(script, setup, kwargs, steps=steps, timeout=timeout)
    import torch

    result = _measure_here(str(Path(script).resolve()), setup, kwargs, steps)
    _release_free_memory()
    torch.cuda.empty_cache()
    return result


def memory_label(device: str) -> str:
    """What ``peak_memory_mib`` measured on ``device``, for table headers."""
    return "CUDA peak growth MiB" if is_cuda(device) else "peak RSS growth MiB"


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
    parser.add_argument("--size", nargs="*", default=[], metavar="KEY=N",
                        help="override the model/batch sizes (e.g. hidden=2048 seq=1024: GPU sizes)")
    add_device_option(parser)
    return parser


def resolve_sizes(parser: argparse.ArgumentParser, sizes: dict[str, int], overrides: Sequence[str],
                  known: Sequence[str] | None = None) -> dict[str, int]:
    """``sizes`` with ``--size KEY=N`` overrides applied (keys of ``sizes``, or of ``known`` when several
    size tables share the option); a bad one is a usage error naming it."""
    allowed = set(known if known is not None else sizes)
    result = dict(sizes)
    for item in overrides:
        key, _, value = item.partition("=")
        if key not in allowed:
            parser.error(f"--size {item}: unknown size {key!r}; known: {', '.join(sorted(allowed))}")
        if not value.isdigit() or int(value) < 1:
            parser.error(f"--size {item}: expected a positive integer")
        if key in result:
            result[key] = int(value)
    return result


def add_device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu",
                        help="cpu (default) or cuda[:N]: on a GPU, timing synchronises the device and memory is "
                             "the CUDA allocator's peak")


def check_device(parser: argparse.ArgumentParser, device: str) -> str:
    """``device`` if usable here; else a usage error (exit 2) naming the option and what is wrong."""
    import re

    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        parser.error(f"--device {device}: expected cpu, cuda or cuda:N")
    if is_cuda(device):
        import torch

        if not torch.cuda.is_available():
            parser.error(f"--device {device}: torch sees no CUDA device on this machine (torch "
                         f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'})")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            parser.error(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def describe_device(device: str) -> str:
    """"fp32 CPU, N threads" or the GPU's name, for report headers."""
    import torch

    if is_cuda(device):
        return f"fp32 {torch.cuda.get_device_name(device)} ({device})"
    return f"fp32 CPU, {torch.get_num_threads()} threads"


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
