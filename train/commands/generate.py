"""``mmtune generate --config <run>/config.yaml --image x.png --prompt "..."``: answer with a trained MLLM.

The recipe (the run folder's resolved config.yaml, or the recipe file it ran) rebuilds the model: its
earlier stages' tensors (``model.init_from``), then this run's adapters and trainable tensors from the run
folder (``train.out_dir``) or from ``--checkpoint`` (a step folder).
"""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "generate", help="answer a question about an image with a trained MLLM recipe (task: mllm)",
        description="Greedy answer of a trained MLLM. Without --image the prompt is text-only.")
    parser.add_argument("--config", required=True, help="recipe YAML (e.g. runs/mllm_arcana/config.yaml)")
    parser.add_argument("--image", help="image file (PNG, JPEG...); '<image>' is put before the prompt "
                                        "unless the prompt has it")
    parser.add_argument("--prompt", required=True, help="the question")
    parser.add_argument("--checkpoint", help="folder with adapters.safetensors / trainable.safetensors "
                                             "(default: the recipe's train.out_dir)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: model.max_new_tokens")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted recipe keys to override")
    return parser


def run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from mm.config import ConfigError
    from train.engine.config import load_recipe

    try:
        recipe = load_recipe(args.config, args.overrides)
        if recipe.task != "mllm":
            raise ConfigError(f"{args.config}: task is {recipe.task!r}; mmtune generate needs task: mllm")
        folder = Path(args.checkpoint) if args.checkpoint else recipe.out_dir
        if not ((folder / "adapters.safetensors").is_file() or (folder / "trainable.safetensors").is_file()):
            raise ConfigError(f"{folder}: no adapters.safetensors or trainable.safetensors (train the recipe "
                              "first, or pass --checkpoint)")
        if args.image and not Path(args.image).is_file():
            raise FileNotFoundError(f"{args.image}: no such image file")
        print(answer(recipe, folder, args.prompt, args.image, args.max_new_tokens))
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"mmtune generate: {err}", file=sys.stderr)
        return 2
    return 0


def answer(recipe, folder, prompt: str, image_path: str | None, max_new_tokens: int | None = None) -> str:
    """The greedy answer of the recipe's model, with the trained tensors of ``folder``."""
    import torch
    from PIL import Image

    from data.instruct import IMAGE_TOKEN, encode_prompt
    from train.engine.checkpoint import load_trainable
    from train.engine.loop import seed_everything
    from train.engine.task import get_task

    seed_everything(recipe.seed)  # random-init parts (if any) come out as in training
    task = get_task(recipe.task)(recipe)
    load_trainable(task, folder)
    task.eval()
    if max_new_tokens is not None:
        recipe.model.max_new_tokens = max_new_tokens
    images = None
    if image_path is not None:
        if task.image_transform is None:
            raise ValueError(f"{recipe.source}: stage {recipe.model.stage!r} has no vision tower; drop --image")
        if IMAGE_TOKEN not in prompt:
            prompt = f"{IMAGE_TOKEN}\n{prompt}"
        with Image.open(image_path) as image:
            images = task.image_transform(image.convert("RGB"))[None]
    ids = torch.tensor([encode_prompt(task.tokenizer, recipe.data.template, prompt)])
    batch = {"prompt_ids": ids, "prompt_mask": torch.ones_like(ids), "images": images,
             "has_image": torch.tensor([images is not None])}
    with torch.no_grad():
        return task.answer(batch)[0]
