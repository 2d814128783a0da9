"""Step time of a recipe on one process vs two (DDP, DeepSpeed ZeRO-2/3 over gloo on the CPU), in one run.

    .venv/bin/python scripts/bench_train_scaling.py [--recipe configs/tiny/llama_lora.yaml] [--steps 40]
        [--setups single ddp zero2 zero3] [--threads 1]

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
LAUNCH = {
    "single": lambda recipe: [sys.executable, "-m", "train.cli", "train", "--config", recipe],
    "ddp": lambda recipe: ["bash", "scripts/launch_accelerate.sh", recipe, "2", "ddp"],
    "zero2": lambda recipe: ["bash", "scripts/launch_accelerate.sh", recipe, "2", "zero2"],
    "zero3": lambda recipe: ["bash", "scripts/launch_deepspeed.sh", recipe, "2", "zero3"],
}


def run_setup(setup: str, recipe: str, steps: int, threads: int, out_dir: Path) -> dict:
    overrides = [f"train.max_steps={steps}", "train.eval_every=0", "train.save_every=0", "train.progress=false",
                 f"train.threads={threads}", f"train.out_dir={out_dir}"]
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env["PYTHONPATH"] = str(ROOT)
    started = time.perf_counter()
    proc = subprocess.run([*LAUNCH[setup](recipe), *overrides], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{setup} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    summary = json.loads((out_dir / "summary.json").read_text())
    summary["wall_s"] = time.perf_counter() - started
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="configs/tiny/llama_lora.yaml")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--setups", nargs="+", default=["single", "ddp"], choices=sorted(LAUNCH))
    args = parser.parse_args()
    import yaml

    batch = yaml.safe_load((ROOT / args.recipe).read_text())["train"]["batch_size"]
    print(f"recipe {args.recipe}: {args.steps} steps, batch {batch} per process, {args.threads} thread(s) "
          f"per process, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for setup in args.setups:
            summary = run_setup(setup, args.recipe, args.steps, args.threads, Path(tmp) / setup)
            samples = batch * summary["processes"] / summary["step_time_s"]
            rows.append((setup, summary, samples))
    base_time, base_samples = rows[0][1]["step_time_s"], rows[0][2]
    print(f"{'setup':<8} {'procs':>5} {'step ms':>9} {'samples/s':>10} {'step time x':>12} {'throughput x':>13} "
          f"{'wall s':>7} {'final loss':>10}")
    for setup, summary, samples in rows:
        print(f"{setup:<8} {summary['processes']:>5} {1000 * summary['step_time_s']:>9.1f} {samples:>10.0f} "
              f"{summary['step_time_s'] / base_time:>12.2f} {samples / base_samples:>13.2f} "
              f"{summary['wall_s']:>7.1f} {summary['final_loss']:>10.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
