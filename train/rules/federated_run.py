"""Federated rounds from a recipe: ``mmtune federate --config configs/federated/<recipe>.yaml``.

A federated recipe is an ordinary training recipe (task, model, data, adapters, optim, train) plus a
``federated:`` section. The task's training split is dealt at random into ``clients`` equal shards; each
round every client starts from the global trainable state, takes ``local_steps`` plain-SGD steps at
``optim.lr`` on batches of ``train.batch_size`` from its shard, optionally with DP-SGD, and the server
averages the clients' trainable tensors (FedAvg, weighted by shard size): ``federated_average`` in
``train/rules/federated.py``. With FFA-LoRA (``freeze_a: true`` on every LoRA adapter, required unless
``federated.ffa: false``) only B trains, so the average of the clients' updates is exact.

The run folder gets what ``mmtune train`` writes where it applies: ``adapters.safetensors`` (and
``trainable.safetensors`` for a trained head), ``config.yaml`` (the recipe without the ``federated``
section, so ``mmtune eval --run`` rebuilds the model), ``federated.yaml`` (the resolved section),
``metrics.csv`` (mean client loss per round, final eval) and ``summary.json``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mm.config import ConfigError


@dataclass
class FederatedConfig:
    clients: int = field(default=4, metadata={"help": "Simulated clients; each gets an equal random shard."})
    rounds: int = field(default=5, metadata={"help": "Communication rounds."})
    local_steps: int = field(default=5, metadata={"help": "SGD steps each client takes per round."})
    split_seed: int = field(default=0, metadata={"help": "Seed of the random deal of samples to clients."})
    ffa: bool = field(default=True, metadata={"help": "FFA-LoRA: require freeze_a on every LoRA adapter "
                                                      "(false: plain FedAvg of A and B, which is not exact)."})
    dp_clip_norm: float | None = field(
        default=None, metadata={"help": "DP-SGD: clip each sample's gradient to this L2 norm (null: no DP)."})
    noise_multiplier: float = field(
        default=0.0, metadata={"help": "DP-SGD: Gaussian noise std = noise_multiplier * dp_clip_norm."})
    per_sample: Literal["loop", "vmap"] = field(
        default="loop", metadata={"help": "DP per-sample gradients: a loop over samples (any task), or "
                                          "torch.func.vmap (faster; the task's step must not call .item())."})

    def validate(self, recipe: Any) -> None:
        source = recipe.source
        for key in ("clients", "rounds", "local_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{source}: key 'federated.{key}' must be >= 1, got {getattr(self, key)}")
        if self.dp_clip_norm is None and self.noise_multiplier:
            raise ConfigError(f"{source}: key 'federated.noise_multiplier' needs federated.dp_clip_norm (the "
                              "noise std is noise_multiplier * dp_clip_norm)")
        if self.dp_clip_norm is not None and (self.dp_clip_norm <= 0 or self.noise_multiplier < 0):
            raise ConfigError(f"{source}: keys 'federated.dp_clip_norm' (> 0) and 'federated.noise_multiplier' "
                              f"(>= 0) are out of range: {self.dp_clip_norm}, {self.noise_multiplier}")
        if recipe.optim.name != "sgd":
            raise ConfigError(f"{source}: key 'optim.name': clients train with plain SGD at optim.lr; set "
                              f"optim.name=sgd, got {recipe.optim.name}")
        if self.ffa:
            for name, adapter in recipe.adapters.items():
                if not getattr(adapter, "freeze_a", False):
                    raise ConfigError(f"{source}: key 'adapters.{name}.freeze_a': FFA-LoRA averages exactly only "
                                      f"with A frozen; use method lora with freeze_a: true (method "
                                      f"{adapter.method}), or set federated.ffa=false")
        if recipe.train.rules or recipe.optim.loraplus_ratio is not None:
            raise ConfigError(f"{source}: keys 'train.rules' / 'optim.loraplus_ratio' belong to mmtune train's "
                              "loop; federated rounds do not run them")


def load_federated_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()):
    """(recipe, FederatedConfig) from a federated recipe file; errors name the key and the file."""
    from train.engine.config import apply_overrides, build_section, read_yaml, recipe_from_dict

    source = str(path) + (f" (with overrides {' '.join(overrides)})" if overrides else "")
    raw = apply_overrides(read_yaml(path), list(overrides), source)
    federated = build_section(FederatedConfig, raw.pop("federated", None), "federated", source)
    recipe = recipe_from_dict(raw, name=Path(path).stem, source=source)
    federated.validate(recipe)
    return recipe, federated


def client_batches(dataset, collate, clients: int, batch_size: int, seed: int) -> list[list[Any]]:
    """The training split dealt at random into ``clients`` equal shards, each cut into batches."""
    import torch

    per_client = len(dataset) // clients
    if per_client < batch_size:
        raise ConfigError(f"{len(dataset)} training samples give each of {clients} clients {per_client}, fewer "
                          f"than train.batch_size={batch_size}; lower federated.clients or train.batch_size")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    shards = [order[i * per_client:(i + 1) * per_client] for i in range(clients)]
    return [[collate([dataset[i] for i in shard[start:start + batch_size]])
             for start in range(0, per_client - batch_size + 1, batch_size)] for shard in shards]


def run_federated(recipe: Any, config: FederatedConfig, say=print) -> dict[str, Any]:
    """Run the rounds, write the run folder, return the summary (what ``summary.json`` holds)."""
    import torch
    import yaml

    from mm.state import atomic_write
    from train.engine.config import save_resolved
    from train.engine.loop import eval_batches, seed_everything
    from train.engine.run_log import RunLog, dumps
    from train.engine.task import get_task
    from train.rules.federated import DPConfig, federated_average

    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    seed_everything(recipe.seed)
    task = get_task(recipe.task)(recipe)
    task.train()
    clients = client_batches(task.train_dataset(), task.collate, config.clients, recipe.train.batch_size,
                             config.split_seed)
    dp = None if config.dp_clip_norm is None else DPConfig(config.dp_clip_norm, config.noise_multiplier,
                                                           config.per_sample)
    result = federated_average(task, clients, lambda model, batch: model.training_step(batch)[0],
                               rounds=config.rounds, local_steps=config.local_steps, lr=recipe.optim.lr, dp=dp,
                               seed=recipe.seed)
    out = recipe.out_dir
    out.mkdir(parents=True, exist_ok=True)
    log = RunLog(out, True, resume_step=0, say=say)
    for index, losses in enumerate(result.losses, start=1):
        log.log(index, "train", {"loss": sum(losses) / len(losses)})
    task.eval()
    eval_data = task.eval_dataset()
    metrics = {} if eval_data is None else task.evaluate(eval_batches(eval_data, task.collate,
                                                                         recipe.train.batch_size, "cpu"))
    log.log(config.rounds, "eval", metrics)
    _save_state(task, out)
    save_resolved(recipe, out / "config.yaml")
    settings = dataclasses.asdict(config)
    atomic_write(out / "federated.yaml", lambda tmp: Path(tmp).write_text(yaml.safe_dump({"federated": settings})))
    summary = {"rounds": config.rounds, "clients": config.clients, "client_losses": result.losses,
               "eval": metrics, "dp": settings["dp_clip_norm"] is not None, "federated": settings}
    atomic_write(out / "summary.json", lambda tmp: Path(tmp).write_text(dumps(summary, indent=2)))
    log.close()
    say(rounds_table(result.losses, metrics))
    return summary


def _save_state(task: Any, out: Path) -> None:
    import mm
    from mm.state import atomic_write
    from train.engine.checkpoint import extra_trainable

    if mm.adapter_names(task):
        mm.save_adapters(task, out / "adapters.safetensors")
    extras = {n: p.detach().cpu().contiguous().clone() for n, p in extra_trainable(task).items()}
    if extras:
        from safetensors.torch import save_file

        atomic_write(out / "trainable.safetensors", lambda tmp: save_file(extras, tmp))


def rounds_table(losses: list[list[float]], metrics: dict[str, float]) -> str:
    """Markdown: each round's mean and per-client training loss, then the final evaluation."""
    lines = ["| round | mean loss | client losses |", "|---:|---:|---|"]
    for index, row in enumerate(losses, start=1):
        lines.append(f"| {index} | {sum(row) / len(row):.4f} | {', '.join(f'{v:.3f}' for v in row)} |")
    if metrics:
        lines.append("")
        lines.append("eval " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    return "\n".join(lines)
