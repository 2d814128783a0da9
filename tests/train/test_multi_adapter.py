"""multi_adapter_lm: several adapters trained at once on one frozen base, each on its own jsonl; equal (1e-5)
to training each alone on the same rows in the same order, per-adapter losses logged, bad recipes refused."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import mm
from data.fake_text import write_records

WORDS = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta", "zeta", "rho"]
ADAPTERS = {
    "a": {"method": "lora", "targets": ["q_proj", "v_proj", "down_proj"], "r": 4, "alpha": 8.0},
    "b": {"method": "lora", "targets": ["q_proj", "up_proj"], "r": 2, "alpha": 2.0, "rslora": True},
    "c": {"method": "lora", "targets": ["k_proj", "o_proj", "gate_proj"], "r": 3, "alpha": 6.0},
}


def _corpus(path: Path, shift: int) -> Path:
    """16 records of 7 words each (same token count for every adapter's file, different words and order)."""
    records = [{"text": " ".join(WORDS[(i * (shift + 1) + k * (shift + 2)) % len(WORDS)] for k in range(7))}
               for i in range(16)]
    return write_records(path, records)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from encoders.llm import word_tokenizer

    folder = tmp_path_factory.mktemp("multi")
    sources = {name: str(_corpus(folder / f"{name}.jsonl", shift)) for shift, name in enumerate(ADAPTERS)}
    tokenizer = word_tokenizer(WORDS)
    tokenizer.backend_tokenizer.save(str(folder / "tokenizer.json"))
    return folder, sources


def _recipe(folder: Path, sources: dict[str, str], names: list[str], run: str, **train) -> Path:
    recipe = {
        "task": "multi_adapter_lm", "seed": 3,
        "model": {"tokenizer": str(folder / "tokenizer.json"), "hidden_size": 16, "intermediate_size": 32,
                  "layers": 1, "heads": 2},
        "data": {"sources": {n: sources[n] for n in names}, "seq_len": 8},
        "adapters": {n: ADAPTERS[n] for n in names},
        "optim": {"lr": 2e-2},
        "train": {"max_steps": 4, "batch_size": 2, "clip_norm": None, "eval_every": 0, "save_every": 0,
                  "progress": False, "out_dir": str(folder / run), **train},
    }
    path = folder / f"{run}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _train(path: Path) -> Path:
    from train.engine.config import load_recipe
    from train.engine.loop import train

    return train(load_recipe(path), say=lambda *_: None).out_dir


def _losses(run: Path, metric: str) -> list[float]:
    with open(run / "metrics.csv") as handle:
        return [float(r["value"]) for r in csv.DictReader(handle) if r["split"] == "train" and r["metric"] == metric]


@pytest.mark.slow  # four short training runs: ~5-15 s
def test_adapters_trained_together_equal_each_trained_alone(setup):
    folder, sources = setup
    together = _train(_recipe(folder, sources, list(ADAPTERS), "together"))
    joint = load_file(together / "adapters.safetensors")
    for name in ADAPTERS:
        alone = _train(_recipe(folder, sources, [name], f"alone_{name}"))
        single = load_file(alone / "adapters.safetensors")
        assert single and set(single) == {k for k in joint if k.startswith(f"{name}/")}
        for key, tensor in single.items():
            torch.testing.assert_close(joint[key], tensor, rtol=0, atol=1e-5, msg=key)
        lora_b = [t for k, t in single.items() if k.endswith("lora_B")]
        assert all(float(t.abs().max()) > 1e-3 for t in lora_b)  # it trained: B left its zero init
        steps = _losses(together, f"loss_{name}")
        assert len(steps) == 4
        torch.testing.assert_close(torch.tensor(steps), torch.tensor(_losses(alone, f"loss_{name}")),
                                   rtol=0, atol=1e-5)
    total = [sum(v) for v in zip(*(_losses(together, f"loss_{n}") for n in ADAPTERS), strict=True)]
    torch.testing.assert_close(torch.tensor(_losses(together, "loss")), torch.tensor(total), rtol=1e-6, atol=1e-5)


def test_one_mixed_step_gives_each_adapter_the_gradient_of_its_own_rows(setup):
    from train.engine.config import load_recipe
    from train.tasks.multi_adapter import MultiAdapterLM

    folder, sources = setup
    task = MultiAdapterLM(load_recipe(_recipe(folder, sources, list(ADAPTERS), "grads")))
    with torch.no_grad():
        for name, param in task.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)  # off the zero init, so A gets gradients too
    groups = [task.train_dataset()[i] for i in range(2)]
    task.training_step(task.collate(groups))[0].backward()
    joint = {n: p.grad.clone() for n, p in task.named_parameters() if p.requires_grad}
    for name in ADAPTERS:
        task.zero_grad(set_to_none=True)
        task.training_step(task.collate([{name: g[name]} for g in groups]))[0].backward()
        own = {n: p.grad for n, p in task.named_parameters() if p.grad is not None}
        assert own and all(f".{name}." in n for n in own)
        for key, grad in own.items():
            torch.testing.assert_close(joint[key], grad, rtol=1e-4, atol=1e-6, msg=key)


def test_the_shipped_recipe_loads_and_each_adapter_gets_its_own_rows(setup):
    from train.engine.config import load_recipe
    from train.tasks.multi_adapter import MultiAdapterLM

    folder, _ = setup
    root = Path(__file__).resolve().parents[2]
    recipe = load_recipe(root / "configs/tiny/multi_adapter.yaml",
                         ["model.hidden_size=16", "model.intermediate_size=32", "model.layers=1",
                          f"train.out_dir={folder / 'shipped'}"])
    task = MultiAdapterLM(recipe)
    batch = task.collate([task.train_dataset()[i] for i in range(3)])
    assert batch["row_adapters"] == ["guide"] * 3 + ["notes"] * 3
    assert batch["input_ids"].shape == (6, 32)
    assert set(mm.adapter_names(task)) == {"guide", "notes"}
    loss, logs = task.training_step(batch)
    assert set(logs) == {"loss_guide", "loss_notes"} and torch.isfinite(loss)


@pytest.mark.parametrize(("change", "message"), [
    ({"data": {"sources": {"a": "A"}, "seq_len": 8}}, r"'data.sources' names \['a'\]; expected one file per adapter"),
    ({"train": {"clip_norm": 1.0}}, r"'train.clip_norm' must be null"),
    ({"data": {"sources": {"a": "missing.jsonl", "b": "B"}, "seq_len": 8}}, r"'data.sources.a': no such file"),
])
def test_bad_recipes_name_the_key(setup, change, message):
    from train.engine.config import load_recipe
    from train.tasks.multi_adapter import MultiAdapterLM

    folder, sources = setup
    path = _recipe(folder, sources, ["a", "b"], "bad")
    recipe = yaml.safe_load(path.read_text())
    for section, values in change.items():
        values = {k: ({n: sources.get(n, v) if v in "AB" else str(folder / v) for n, v in v.items()}
                      if k == "sources" else v) for k, v in values.items()}
        recipe[section] = {**recipe[section], **values}
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(mm.ConfigError, match=message):
        MultiAdapterLM.validate(load_recipe(path))
