"""``mmtune generate --run RUN_DIR --image x.png --prompt "..."``: answer with a trained MLLM.

The run folder is the truth: ``RUN_DIR/config.yaml`` rebuilds the model (see train/engine/run_folder.py):
its earlier stages' tensors (``model.init_from``), then this run's adapters and trainable tensors from the
run folder or from ``--checkpoint`` (a step folder). ``--config`` (the run's config.yaml, or the recipe
file it ran) names the run folder through its ``train.out_dir``. A ``key=value`` that changes the run's
value is applied and said on stderr.
"""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "generate", help="answer a question about an image with a trained MLLM recipe (task: mllm)",
        description="Greedy answer of a trained MLLM. Without --image the prompt is text-only.")
    parser.add_argument("--run", default=None, help="run folder (its config.yaml rebuilds the model)")
    parser.add_argument("--config", default=None, help="a recipe YAML whose train.out_dir is the run folder "
                                                       "(e.g. runs/mllm_arcana/config.yaml), when --run is not given")
    parser.add_argument("--image", help="image file (PNG, JPEG...); '<image>' is put before the prompt "
                                        "unless the prompt has it")
    parser.add_argument("--prompt", required=True, help="the question")
    parser.add_argument("--checkpoint", help="folder with adapters.safetensors / trainable.safetensors "
                                             "(default: the run folder)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: model.max_new_tokens")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted recipe keys to override")
    return parser


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mm.config import ConfigError
    from train.engine.run_folder import load_run_recipe, run_dir_of

    run_dir = run_dir_of(args.config, args.run, args.overrides)  # bad input: one line from train.cli, exit 2
    recipe = load_run_recipe(run_dir, args.overrides, "generate", recipe_file=args.config)
    if recipe.task != "mllm":
        raise ConfigError(f"{run_dir / 'config.yaml'}: task is {recipe.task!r}; mmtune generate needs task: mllm")
    folder = Path(args.checkpoint) if args.checkpoint else run_dir
    if not ((folder / "adapters.safetensors").is_file() or (folder / "trainable.safetensors").is_file()):
        raise ConfigError(f"{folder}: no adapters.safetensors or trainable.safetensors (train the recipe "
                          "first, or pass --checkpoint)")
    if args.image and not Path(args.image).is_file():
        raise FileNotFoundError(f"{args.image}: no such image file")
    print(answer(recipe, folder, args.prompt, args.image, args.max_new_tokens))
    return 0


def answer(recipe, folder, prompt: str, image_path: str | None, max_new_tokens: int | None = None) -> str:
    """The greedy answer of the recipe's model, with the trained tensors of ``folder``."""
    import torch

    from data.images import read_image
    from data.instruct import IMAGE_TOKEN, encode_prompt
    from mm.config import ConfigError
    from train.engine.checkpoint import load_trainable
    from train.engine.loop import seed_everything
    from train.engine.task import get_task

    picture = read_image(image_path) if image_path is not None else None  # a bad file fails before the build
    seed_everything(recipe.seed)  # random-init parts (if any) come out as in training
    task = get_task(recipe.task)(recipe)
    load_trainable(task, folder)
    task.eval()
    if max_new_tokens is not None:
        recipe.model.max_new_tokens = max_new_tokens
    images = None
    if image_path is not None:
        if task.image_transform is None:
            raise ConfigError(f"{recipe.source}: stage {recipe.model.stage!r} has no vision tower; drop --image")
        if IMAGE_TOKEN not in prompt:
            prompt = f"{IMAGE_TOKEN}\n{prompt}"
        images = task.image_transform(picture)[None]
    ids = torch.tensor([encode_prompt(task.tokenizer, recipe.data.template, prompt)])
    batch = {"prompt_ids": ids, "prompt_mask": torch.ones_like(ids), "images": images,
             "has_image": torch.tensor([images is not None])}
    with torch.no_grad():
        return task.answer(batch)[0]
