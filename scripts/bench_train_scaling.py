"""Step time of a recipe on one process vs two (DDP, DeepSpeed ZeRO-2/3, FSDP2; gloo on the CPU), in one run.

    .venv/bin/python scripts/bench_train_scaling.py [--recipe configs/tiny/llama_lora.yaml] [--steps 40]
        [--setups single ddp zero2 zero3 fsdp2] [--threads 1] [--set key=value ...] [--device cpu|cuda]

``--device cpu`` (default) hides any GPU from the runs; ``--device cuda`` runs them on GPUs (one per
process: a 2-process setup needs 2 GPUs) and adds the CUDA allocator's peak of rank 0 from summary.json
(the loop's step time already waits for the device: it reads each step's loss). ``--set`` passes recipe
overrides to every run (bigger models for a GPU, say).

Every setup runs the same recipe with the same per-process batch through the real entry points
(`mmtune train`, scripts/launch_accelerate.sh, scripts/launch_deepspeed.sh) and reports the mean
optimizer-step time from its summary.json (first step excluded), and throughput ratios against the
single process. Process start-up, evaluation and checkpointing are not in the step time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))  # benchlib, when imported from elsewhere
sys.path.insert(1, str(ROOT))  # the mmtune packages (the recipe check) when run from a checkout

import benchlib  # noqa: E402

LAUNCH = {
    "single": lambda recipe: [sys.executable, "-m", "train.cli", "train", "--config", recipe],
    "ddp": lambda recipe: ["bash", "scripts/launch_accelerate.sh", recipe, "2", "ddp"],
    "zero2": lambda recipe: ["bash", "scripts/launch_accelerate.sh", recipe, "2", "zero2"],
    "zero3": lambda recipe: ["bash", "scripts/launch_deepspeed.sh", recipe, "2", "zero3"],
    "fsdp2": lambda recipe: ["bash", "scripts/launch_accelerate.sh", recipe, "2", "fsdp2"],
}
PROCESSES = {"single": 1, "ddp": 2, "zero2": 2, "zero3": 2, "fsdp2": 2}


def run_setup(setup: str, recipe: str, steps: int, threads: int, out_dir: Path, extra: list[str] | None = None,
              device: str = "cpu") -> dict:
    overrides = [f"train.max_steps={steps}", "train.eval_every=0", "train.save_every=0", "train.progress=false",
                 f"train.threads={threads}", f"train.out_dir={out_dir}", *(extra or [])]
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env["PYTHONPATH"] = str(ROOT)
    if not benchlib.is_cuda(device):
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU figures stay CPU figures on a GPU machine
    started = time.perf_counter()
    proc = subprocess.run([*LAUNCH[setup](recipe), *overrides], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{setup} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    summary = json.loads((out_dir / "summary.json").read_text())
    summary["wall_s"] = time.perf_counter() - started
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="configs/tiny/llama_lora.yaml")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--setups", nargs="+", default=["single", "ddp"], choices=sorted(LAUNCH))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="recipe overrides for every run")
    benchlib.add_device_option(parser)
    args = parser.parse_args(argv)
    try:  # the recipe and overrides, checked before any run starts
        from train.engine.config import load_recipe

        load_recipe(ROOT / args.recipe, list(args.set))
    except Exception as err:  # noqa: BLE001  (ConfigError, OSError, YAML errors alike)
        parser.error(f"--recipe {args.recipe} --set {' '.join(args.set)}: {err}")
    device = benchlib.check_device(parser, args.device)
    if benchlib.is_cuda(device):
        import torch

        short = [s for s in args.setups if PROCESSES[s] > torch.cuda.device_count()]
        if short:
            parser.error(f"--setups {' '.join(short)}: {PROCESSES[short[0]]} processes need as many GPUs, this "
                         f"machine has {torch.cuda.device_count()}")
    batch = _batch_size(args.recipe, args.set)
    print(f"recipe {args.recipe} {' '.join(args.set)}: {args.steps} steps, batch {batch} per process, "
          f"{args.threads} thread(s) per process, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, "
          f"device {device}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for setup in args.setups:
            summary = run_setup(setup, args.recipe, args.steps, args.threads, Path(tmp) / setup, args.set, device)
            samples = batch * summary["processes"] / summary["step_time_s"]
            rows.append((setup, summary, samples))
    print(report(rows))
    return 0


def _batch_size(recipe: str, overrides: list[str]) -> int:
    import yaml

    batch = yaml.safe_load((ROOT / recipe).read_text())["train"]["batch_size"]
    for item in overrides:
        if item.startswith("train.batch_size="):
            batch = int(item.split("=", 1)[1])
    return batch


def report(rows: list[tuple[str, dict, float]]) -> str:
    base_time, base_samples = rows[0][1]["step_time_s"], rows[0][2]
    lines = [f"{'setup':<8} {'procs':>5} {'step ms':>9} {'samples/s':>10} {'step time x':>12} {'throughput x':>13} "
             f"{'wall s':>7} {'final loss':>10} {'CUDA peak MiB':>14}"]
    for setup, summary, samples in rows:
        peak = summary.get("cuda_peak_mib")
        lines.append(f"{setup:<8} {summary['processes']:>5} {1000 * summary['step_time_s']:>9.1f} {samples:>10.0f} "
                     f"{summary['step_time_s'] / base_time:>12.2f} {samples / base_samples:>13.2f} "
                     f"{summary['wall_s']:>7.1f} {summary['final_loss']:>10.4f} "
                     f"{'-' if peak is None else f'{peak:.0f}':>14}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
