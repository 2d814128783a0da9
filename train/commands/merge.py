"""``mmtune merge RUN RUN ... --method ties --density 0.5 --out merged.safetensors``: merge the adapters of
trained runs into one adapter, and show each run's metrics with its own adapter and with the merged one.

Each RUN is a run folder ``mmtune train`` wrote (``RUN:ADAPTER`` picks one adapter of a run that holds
several). All runs must be of one task type on one base model (same ``model`` section, same base weights);
each keeps its own other trained tensors (a head) when scored. Methods: PEFT's ``add_weighted_adapter``
combinations (``mm.merge_adapters``) and ``concrete`` (Concrete subspace merging: a shared mask learned on
each run's unlabeled eval inputs by entropy, or on its labelled train split with ``--objective validation``).
The merged adapter is written as an mmtune adapter file (and in PEFT's format with ``--peft DIR``).
"""

from __future__ import annotations

import argparse

#: ``mm.compose.METHODS`` and 'concrete', spelled out so that ``--help`` does not import torch (a test checks).
METHOD_NAMES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune", "cat", "svd", "ties_svd",
                "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd", "concrete")


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "merge", help="merge the adapters of trained runs into one adapter (TIES, DARE, SVD, Concrete ...)",
        description="Merge the adapters of trained runs of one base model; prints each run's eval metrics "
                    "with its own adapter and with the merged adapter.")
    parser.add_argument("runs", nargs="+", metavar="RUN[:ADAPTER]", help="run folders (mmtune train's out_dir)")
    parser.add_argument("--method", choices=METHOD_NAMES, default="ties", help="how to merge (default: ties)")
    parser.add_argument("--weights", type=float, nargs="+", help="one weight per run (default: 1 each; "
                                                                 "concrete: see --scaling)")
    parser.add_argument("--density", type=float, help="share of entries kept by ties/dare/magnitude_prune")
    parser.add_argument("--majority-sign-method", choices=["total", "frequency"], default="total")
    parser.add_argument("--svd-rank", type=int, help="rank of the merged adapter for svd methods and concrete "
                                                     "(default: the largest rank; concrete: exact)")
    parser.add_argument("--out", required=True, help="adapter file to write (safetensors)")
    parser.add_argument("--name", default="merged", help="name of the merged adapter (default: merged)")
    parser.add_argument("--peft", help="also export the merged adapter in PEFT's format to this folder")
    parser.add_argument("--json", help="also write the metrics before/after as JSON here")
    parser.add_argument("--seed", type=int, default=0, help="seed of DARE's random masks and Concrete's sampling")
    parser.add_argument("--batch-size", type=int, default=64, help="evaluation batch size")
    concrete = parser.add_argument_group("concrete")
    concrete.add_argument("--objective", choices=["entropy", "validation"], default="entropy",
                          help="entropy of predictions on each run's unlabeled eval inputs (the paper; tasks with "
                               "logits(images)), or the task's loss on its labelled train split")
    concrete.add_argument("--inner", choices=["task_arithmetic", "adamerging"], default="task_arithmetic")
    concrete.add_argument("--scaling", type=float, default=0.3, help="task arithmetic's lambda (AdaMerging: start)")
    concrete.add_argument("--steps", type=int, default=100, help="mask learning steps")
    concrete.add_argument("--mask-lr", type=float, default=0.01)
    concrete.add_argument("--adamerging-steps", type=int, default=50)
    concrete.add_argument("--objective-batches", type=int, default=4, help="batches per run the objective cycles")
    return parser


def _parse_run(spec: str):
    from pathlib import Path

    path, _, adapter = spec.rpartition(":") if ":" in spec and not Path(spec).exists() else (spec, "", "")
    return Path(path), adapter or None


def _check_same_base(recipes: list, runs: list) -> None:
    import dataclasses

    from mm.compose import MergeError

    first = recipes[0]
    for recipe, (path, _) in zip(recipes[1:], runs[1:], strict=True):
        if recipe.task != first.task:
            raise MergeError(f"{path}: task is {recipe.task!r}, {runs[0][0]} is {first.task!r}; merge runs of one task")
        mine, theirs = dataclasses.asdict(recipe.model), dataclasses.asdict(first.model)
        differ = sorted(k for k in mine if mine.get(k) != theirs.get(k))
        if differ or recipe.seed != first.seed:
            what = f"model.{differ[0]} {mine[differ[0]]!r} vs {theirs[differ[0]]!r}" if differ else \
                f"seed {recipe.seed} vs {first.seed} (the seed draws random-init base weights)"
            raise MergeError(f"{path}: another base model than {runs[0][0]} ({what}); adapters merge only on one base")


def _build_task(recipe, run_dir=None):
    from train.engine.checkpoint import load_trainable
    from train.engine.loop import seed_everything
    from train.engine.task import get_task

    seed_everything(recipe.seed)  # tiny recipes draw their frozen base from the seed
    task = get_task(recipe.task)(recipe)
    if run_dir is not None:
        if not (run_dir / "adapters.safetensors").is_file():
            from mm.compose import MergeError

            raise MergeError(f"{run_dir}: no adapters.safetensors (not a finished run with adapters)")
        load_trainable(task, run_dir)
    return task.eval()


def _pick_adapter(task, path, wanted: str | None) -> str:
    import mm
    from mm.compose import MergeError

    names = mm.adapter_names(task)
    if wanted is not None and wanted not in names:
        raise MergeError(f"{path}: run has no adapter {wanted!r}; it has {names}")
    if wanted is None and len(names) != 1:
        raise MergeError(f"{path}: run holds adapters {names}; pick one as {path}:NAME")
    return wanted or names[0]


def _evaluate(task, adapter: str, batch_size: int) -> dict[str, float]:
    import torch

    import mm
    from train.engine.loop import eval_batches

    mm.set_active(task, adapter)
    dataset = task.eval_dataset()
    if dataset is None:
        from mm.compose import MergeError

        raise MergeError(f"{task.recipe.train.out_dir}: the run's task has no eval split to score the merge on")
    with torch.no_grad():
        return task.evaluate(eval_batches(dataset, task.collate, batch_size, "cpu"))


def _load_as(host, path, saved_name: str, new_name: str) -> None:
    """Attach adapter ``saved_name`` of the adapter file ``path`` to ``host`` as ``new_name`` (inactive)."""
    import torch

    import mm
    from mm.state import AdapterStateError, adapter_state, read_adapter_file

    configs, tensors = read_adapter_file(path)
    mm.attach(host, configs[saved_name], new_name, active=False)
    state = adapter_state(host, new_name)
    prefix = f"{saved_name}/"
    saved = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if saved.keys() != state.keys() or any(saved[k].shape != v.shape for k, v in state.items()):
        raise AdapterStateError(f"{path}: adapter {saved_name!r} does not fit the base of the first run")
    with torch.no_grad():
        for key, tensor in state.items():
            tensor.copy_(saved[key])


def _check_same_weights(host, task, path) -> None:
    import torch

    import mm
    from mm.compose import MergeError

    params = dict(task.named_parameters())
    for layer_name, layer in mm.adapted_layers(host):
        key = _weight_key(task, layer_name)
        if key not in params or not torch.equal(params[key], layer.base.weight):
            raise MergeError(f"{path}: base weight of layer {layer_name!r} differs from the first run's "
                             "(adapters of different base models)")


def _weight_key(module, layer_name: str) -> str:
    import mm

    layer = module.get_submodule(layer_name)
    return f"{layer_name}.base.weight" if isinstance(layer, mm.AdaptedLinear) else f"{layer_name}.weight"


def _concrete(args, host, names: list[str], tasks: list):
    """Concrete-merge into ``args.name`` on ``host``: the objective runs each run's task (its own head) with the
    one merged encoder, through weights linked across the tasks."""
    from torch import nn

    import mm
    from mm.compose import ConcreteConfig, MergeError, adapter_task_vectors, entropy_loss
    from mm.compose.concrete import ConcreteMerger
    from mm.compose.task_vectors import deltas_to_adapter
    from train.engine.loop import eval_batches

    config = ConcreteConfig(inner=args.inner, scaling=args.scaling, steps=args.steps, mask_lr=args.mask_lr,
                            adamerging_steps=args.adamerging_steps, seed=args.seed)
    vectors, layer_of = adapter_task_vectors(host, names)
    container = nn.ModuleDict({f"t{i}": task for i, task in enumerate(tasks)})
    container_key = {key: f"t0.{_weight_key(tasks[0], layer_of[key])}" for key in vectors}
    linked = {container_key[key]: [f"t{i}.{_weight_key(t, layer_of[key])}" for i, t in enumerate(tasks) if i]
              for key in vectors}
    batches = []
    for task in tasks:
        dataset = task.eval_dataset() if args.objective == "entropy" else task.train_dataset()
        found = list(eval_batches(dataset, task.collate, args.batch_size, "cpu"))[: args.objective_batches]
        batches.append(found)
    if args.objective == "entropy" and not hasattr(tasks[0], "logits"):
        raise MergeError(f"--objective entropy: task {type(tasks[0]).__name__} has no logits(images); "
                         "use --objective validation")

    def loss_fn(model, batch, t):
        task = model[f"t{t}"]
        with mm.disable_adapters(task):
            if args.objective == "entropy":
                return entropy_loss(task.logits(batch["image"]))
            return task.training_step(batch)[0]

    result = ConcreteMerger(container, {container_key[k]: v for k, v in vectors.items()}, loss_fn, batches,
                            config, linked).run()
    deltas = {key: result.deltas[container_key[key]] for key in vectors}
    deltas_to_adapter(host, names[0], args.name, deltas, layer_of, args.svd_rank)
    return result


def format_table(rows: list[dict]) -> str:
    lines = ["| run | metric | own adapter | merged | change |", "|---|---|---|---|---|"]
    for row in rows:
        for metric, before in row["own"].items():
            after = row["merged"].get(metric, float("nan"))
            lines.append(f"| {row['run']} | {metric} | {before:.4f} | {after:.4f} | {after - before:+.4f} |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import torch

    import mm
    from mm.compose import MergeError
    from mm.state import atomic_write
    from train.engine.run_folder import load_run_recipe

    runs = [_parse_run(spec) for spec in args.runs]
    recipes = [load_run_recipe(path, [], "merge") for path, _ in runs]
    _check_same_base(recipes, runs)
    tasks = [_build_task(recipe, path) for recipe, (path, _) in zip(recipes, runs, strict=True)]
    own = [_pick_adapter(task, path, wanted) for task, (path, wanted) in zip(tasks, runs, strict=True)]
    before = [_evaluate(task, name, args.batch_size) for task, name in zip(tasks, own, strict=True)]
    host = _build_task(recipes[0])
    for name in mm.adapter_names(host):
        mm.delete_adapter(host, name)
    names = [f"run{i}" for i in range(len(runs))]
    for (path, _), saved, name in zip(runs, own, names, strict=True):
        _load_as(host, path / "adapters.safetensors", saved, name)
    for task, (path, _) in zip(tasks, runs, strict=True):
        _check_same_weights(host, task, path)
    if args.name in own:
        raise MergeError(f"--name {args.name!r} is a run's own adapter name; pick another")
    if args.method == "concrete":
        result = _concrete(args, host, names, tasks)
        lambdas = ", ".join(f"{float(w):.3g}" for w in result.weights.mean(dim=1))
        print(f"concrete: the shared mask keeps {100 * result.kept:.1f}% of the task-vector entries; lambda per "
              f"run (mean over weights): {lambdas}; objective {result.losses[0]:.4f} -> {result.losses[-1]:.4f}"
              if result.losses else f"concrete: no mask steps; lambda per run: {lambdas}")
    else:
        mm.merge_adapters(host, names, args.method, args.weights, density=args.density,
                          majority_sign_method=args.majority_sign_method, svd_rank=args.svd_rank,
                          new_name=args.name, generator=torch.Generator().manual_seed(args.seed))
    mm.save_adapters(host, args.out, [args.name])
    if args.peft:
        mm.export_peft(host, args.peft, adapter=args.name)
    rows = []
    for task, (path, _), metrics in zip(tasks, runs, before, strict=True):
        mm.load_adapters(task, args.out)
        rows.append({"run": str(path), "own": metrics, "merged": _evaluate(task, args.name, args.batch_size)})
    print(f"merged {len(runs)} adapters with {args.method} into {args.out} (adapter {args.name!r})")
    print(format_table(rows))
    if args.json:
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(json.dumps(rows, indent=1)))
    return 0
