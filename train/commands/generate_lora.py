"""``mmtune generate-lora``: ICM-LoRA. Learn a generator (a CVAE) from a family of LoRAs of one base model and
their task descriptions, then write the LoRA it generates for a new description, with no fine-tuning.

    mmtune generate-lora --family family.jsonl --save-generator gen.safetensors
    mmtune generate-lora --generator gen.safetensors --description "digits rotated by 45 degrees" --out a.safetensors

``family.jsonl``: one task per line, ``{"adapter": PATH, "description": TEXT}`` (+ ``"name"`` to pick one adapter of
a file holding several); PATH is an mmtune adapter file or a run folder of ``mmtune train`` (its
adapters.safetensors), relative to the jsonl's folder. The condition is ``mm.compose.describe_task`` of the text
(a small deterministic sentence encoder: hashed words and the numbers in it). The written adapter loads onto
the family's base like any adapter (``mm.load_adapters``).
"""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "generate-lora", help="ICM-LoRA: learn a LoRA generator from a family of LoRAs, generate one from a "
                              "task description",
        description="Fit a conditional VAE on a family of LoRAs (--family) and/or generate a LoRA for a task "
                    "description (--description, --out) from a generator (fitted now or --generator).")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--family", help="jsonl of {'adapter': PATH, 'description': TEXT} lines")
    source.add_argument("--generator", help="a generator file written by --save-generator")
    parser.add_argument("--save-generator", help="write the fitted generator here (safetensors)")
    parser.add_argument("--description", help="the task to generate a LoRA for")
    parser.add_argument("--out", help="adapter file to write the generated LoRA to (safetensors)")
    parser.add_argument("--name", default="generated", help="name of the generated adapter (default: generated)")
    cvae = parser.add_argument_group("generator (CVAE) training")
    cvae.add_argument("--steps", type=int, default=1000)
    cvae.add_argument("--latent", type=int, default=16)
    cvae.add_argument("--hidden", type=int, default=128)
    cvae.add_argument("--kl-weight", type=float, default=0.1)
    cvae.add_argument("--lr", type=float, default=3e-3)
    cvae.add_argument("--seed", type=int, default=0)
    return parser


def read_family(path: str) -> tuple[dict, dict, object]:
    """(label -> adapter state, label -> description, the members' shared adapter config) from a family jsonl."""
    import json
    from pathlib import Path

    from mm.compose.icm_lora import GeneratorError
    from mm.state import read_adapter_file

    family, states, descriptions, config = Path(path), {}, {}, None
    lines = [(n, line) for n, line in enumerate(family.read_text().splitlines(), 1) if line.strip()]
    if len(lines) < 2:
        raise GeneratorError(f"{family}: {len(lines)} task(s); a family needs at least two LoRAs")
    for number, line in lines:
        where = f"{family} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise GeneratorError(f"{where}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("adapter"), str) \
                or not isinstance(record.get("description"), str) or not record["description"].strip():
            raise GeneratorError(f"{where}: expected an object with 'adapter' (a path) and 'description' "
                                 f"(non-empty text), got {line.strip()[:80]!r}")
        file = family.parent / record["adapter"]
        file = file / "adapters.safetensors" if file.is_dir() else file
        configs, tensors = read_adapter_file(file)
        name = record.get("name") or (next(iter(configs)) if len(configs) == 1 else None)
        if name not in configs:
            raise GeneratorError(f"{where}: {file} holds adapters {sorted(configs)}; pick one with 'name'")
        if configs[name].method != "lora":
            raise GeneratorError(f"{where}: adapter {name!r} of {file} is {configs[name].method!r}; ICM-LoRA "
                                 "generates LoRA adapters")
        if config is not None and configs[name].to_dict() != config.to_dict():
            raise GeneratorError(f"{where}: adapter {name!r} of {file} has another config (targets, rank, alpha) "
                                 "than the first line's; the family must share one")
        config = config or configs[name]
        label = f"line{number}:{file}"
        states[label] = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(f"{name}/")}
        descriptions[label] = record["description"]
    return states, descriptions, config


def run(args: argparse.Namespace) -> int:
    import torch

    from mm.compose.icm_lora import CVAEConfig, GeneratorError, LoraGenerator, describe_task, save_generated

    if (args.description is None) != (args.out is None):
        raise GeneratorError("--description and --out go together (the task, and where its LoRA goes)")
    if args.family is None and args.out is None:
        raise GeneratorError("--generator: give --description and --out (the task and the adapter file to write)")
    if args.family is not None and args.save_generator is None and args.out is None:
        raise GeneratorError("--family: give --save-generator, or --description and --out, or both")
    condition = describe_task(args.description) if args.description is not None else None  # bad text: fail early
    torch.set_num_threads(1)  # hundreds of steps of a tiny CVAE: a thread pool costs more than it saves
    if args.family is not None:
        states, descriptions, adapter = read_family(args.family)
        config = CVAEConfig(latent=args.latent, hidden=args.hidden, kl_weight=args.kl_weight, steps=args.steps,
                            lr=args.lr, seed=args.seed)
        conditions = {label: describe_task(text) for label, text in descriptions.items()}
        generator = LoraGenerator.fit(states, conditions, adapter, config)
        print(f"fitted a generator of {generator.parameter_count()} parameters on {len(states)} LoRAs of "
              f"{sum(v.numel() for v in next(iter(states.values())).values())} parameters each")
        # Relative to the family's mean LoRA norm: a member may be (near) zero, e.g. the identity task.
        scale = max(sum(_norm(state) for state in states.values()) / len(states), 1e-12)
        print("| task | reconstruction error / mean LoRA norm |\n|---|---|")
        for label, state in states.items():
            made = generator.generate(conditions[label])
            print(f"| {descriptions[label]} | {_norm({k: made[k] - v for k, v in state.items()}) / scale:.3f} |")
        if args.save_generator:
            generator.save(args.save_generator)
            print(f"wrote generator {args.save_generator}")
    else:
        generator = LoraGenerator.load(args.generator)
    if condition is not None:
        save_generated(generator, args.out, condition, args.name)
        print(f"wrote adapter {args.name!r} for {args.description!r} to {args.out}")
    return 0


def _norm(state: dict) -> float:
    return float(sum(float(v.pow(2).sum()) for v in state.values()) ** 0.5)
