"""CLIP few-shot training cost: LoRA, Block-LoRA and QLadder steps against the frozen forward, in one run.

open_clip ViT-B-32 with random weights (no download) on the CPU, batch 32 of 224x224 images. Each method's
training step is: image features -> cosine logits against fixed text prototypes -> cross-entropy ->
backward -> AdamW step on the method's parameters. The frozen forward is the same image encoding under
``no_grad``; every step is printed as a multiple of it. Adapters sit on q/k/v of the vision tower, as in
CLIP-LoRA (the text side is precomputed here: its adapters would not run in an image-only step).

    .venv/bin/python scripts/bench_clip.py                      # ViT-B-32, batch 32
    .venv/bin/python scripts/bench_clip.py --threads 1 --clock cpu   # steadier on a shared machine
    .venv/bin/python scripts/bench_clip.py --model tiny-test --batch 4 --image 32   # smoke test
    .venv/bin/python scripts/bench_clip.py --device cuda        # on a GPU: synchronised timing, CUDA peak memory
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))  # benchlib
sys.path.insert(0, str(ROOT.parent))  # the mmtune packages when run from a checkout

import benchlib  # noqa: E402

VISION_QKV = r"visual\..*\.(q|k|v)_proj"
METHODS = {
    "lora": {"method": "lora", "target_regex": VISION_QKV, "r": 2, "alpha": 1.0},
    "block_lora": {"method": "block_lora", "target_regex": VISION_QKV, "r": 2, "alpha": 1.0, "blocks": 4},
}


def _step_fn(encode: Callable, params: list, images, prototypes, labels) -> Callable[[], None]:
    import torch
    import torch.nn.functional as F

    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        features = F.normalize(encode(images), dim=-1)
        loss = F.cross_entropy(100.0 * features @ prototypes.T, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def build_variants(model_name: str, batch: int, image: int, classes: int = 10,
                   device: str = "cpu") -> tuple[dict, dict]:
    """The timed callables (frozen forward and one step per method) on ``device`` and each method's
    trainable count. Adapters attach on the CPU copy; the adapted model then moves as a whole."""
    import torch

    import mm
    from encoders.clip import LadderCLIP, create_clip
    from mm.qladder import QLadderConfig

    clip = create_clip(model_name, seed=0).model.requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, image, image, generator=gen)
    labels = torch.randint(0, classes, (batch,), generator=gen)
    prototypes = torch.nn.functional.normalize(torch.randn(classes, clip.text_projection.shape[1], generator=gen), dim=-1)
    images, labels, prototypes = benchlib.to_device((images, labels, prototypes), device)

    def frozen() -> None:
        with torch.no_grad():
            clip.encode_image(images)

    variants, trainable = {"frozen forward": frozen}, {"frozen forward": 0}
    for name, options in METHODS.items():
        model = copy.deepcopy(clip)
        mm.attach(model, mm.AdapterConfig.from_dict(dict(options)))
        model.to(device)
        params = [p for p in model.parameters() if p.requires_grad]
        variants[name] = _step_fn(model.encode_image, params, images, prototypes, labels)
        trainable[name] = sum(p.numel() for p in params)
    ladder = LadderCLIP.build(copy.deepcopy(clip), QLadderConfig()).to(device)
    clip.to(device)  # the frozen forward's model, moved last so that the copies above start on the CPU
    params = [p for p in ladder.ladder.parameters() if p.requires_grad]
    variants["qladder"] = _step_fn(ladder.encode_image, params, images, prototypes, labels)
    trainable["qladder"] = sum(p.numel() for p in params)
    return variants, trainable


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32", help="open_clip model name or an mmtune tiny config")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image", type=int, default=224, help="image side (must suit the model)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--clock", choices=sorted(benchlib.CLOCKS), default="wall")
    benchlib.add_device_option(parser)
    args = parser.parse_args(argv)
    device = benchlib.check_device(parser, args.device)
    if args.clock != "wall" and benchlib.is_cuda(device):
        parser.error(f"--clock {args.clock}: only the wall clock measures GPU work (--device {device})")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    variants, trainable = build_variants(args.model, args.batch, args.image, device=device)
    timings = benchlib.time_interleaved(variants, rounds=args.rounds, steps=1, warmup=1, clock=args.clock,
                                        device=device)
    base = timings["frozen forward"].median_ms
    header = ["variant", "trainable params", f"ms ({args.clock})", "x frozen forward"]
    rows = [[name, f"{trainable[name]:,}", f"{t.median_ms:.1f}", f"{t.median_ms / base:.2f}x"]
            for name, t in timings.items()]
    if benchlib.is_cuda(device):  # the allocator's peak is exact in-process (RSS is not: CPU runs skip it)
        header.append(benchlib.memory_label(device))
        for row, step in zip(rows, variants.values(), strict=True):
            row.append(benchlib.cuda_peak_mib(step, device)["growth_mib"])
    table = benchlib.markdown_table(header, rows)
    print(f"{args.model}, batch {args.batch}, {args.image}px, {benchlib.describe_device(device)}, "
          f"median of {args.rounds} interleaved rounds\n")
    print(table)
    return table


if __name__ == "__main__":
    main()
