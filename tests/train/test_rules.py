"""Training rules through the loop: recipes switch them on (train.rules, optim.loraplus_ratio), the loop
calls their hooks, and each rule's defining property holds in a real run on the tiny digits recipes."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import FAST, ROOT, csv_losses

from mm.config import ConfigError
from train.engine.config import load_recipe
from train.engine.loop import train
from train.engine.run_log import read_metrics
from train.rules.allora import ALLoRA, allora_coefficient
from train.rules.base import RULES, RuleConfig, RuleHooks, inner_optimizer
from train.rules.lisa import lisa_draw

TINY = ROOT / "configs" / "tiny"


def recipe(name: str, out_dir: Path, *overrides: str):
    return load_recipe(TINY / f"{name}.yaml", [*FAST, f"train.out_dir={out_dir}", *overrides])


def metric(out_dir: Path, name: str) -> dict[int, float]:
    return {r["step"]: r["value"] for r in read_metrics(Path(out_dir) / "metrics.csv")
            if r["split"] == "train" and r["metric"] == name}


@dataclass
class RecorderConfig(RuleConfig):
    pass


@RULES.register("test_recorder")
class Recorder(RuleHooks):
    """Test rule: records the hook calls, and each step's gradients and weights around the optimizer step.
    ``Recorder.last`` is the instance of the latest run."""

    config_class = RecorderConfig
    last: Recorder | None = None

    def on_train_start(self, task, optimizer, accelerator, step):
        Recorder.last = self
        self.task, self.optimizer, self.calls, self.steps = task, inner_optimizer(optimizer), [("start", step)], []

    def _trainable(self):
        return {n: p for n, p in self.task.named_parameters() if p.requires_grad}

    def on_step_start(self, step):
        self.calls.append(("step_start", step))

    def before_backward(self, loss):
        self.calls.append(("before_backward",))

    def after_backward(self):
        self.calls.append(("after_backward",))

    def before_optimizer_step(self, step):
        self.calls.append(("before_optimizer_step", step))
        self.steps.append({n: (p.detach().clone(), p.grad.detach().clone()) for n, p in self._trainable().items()
                           if p.grad is not None})

    def on_step_end(self, step, logs):
        self.calls.append(("step_end", step))
        params = self._trainable()
        self.steps[-1] = {n: (*before, params[n].detach().clone()) for n, before in self.steps[-1].items()}


# ---------------------------------------------------------------------------- recipes


def test_rules_are_validated_when_the_recipe_loads(tmp_path):
    resolved = recipe("digits_dylora", tmp_path).train.rules
    assert resolved == [{"name": "dylora_rank", "seed": None}]
    lisa = recipe("digits_lisa", tmp_path, "train.rules=[{name: lisa, period: 3}]").train.rules
    assert lisa == [{"name": "lisa", "n_layers": 2, "period": 3, "layers": None, "seed": None}]
    cases = {
        "train.rules=[lisaa]": r"train.rules\[0\]'.*unknown training rule 'lisaa'.*Did you mean 'lisa'.*Known "
                               r"training rules: .*allora, dylora_rank, lisa",
        "train.rules=[{name: lisa, perod: 3}]": r"unknown key\(s\) 'train.rules\[0\].lisa.perod'.*period",
        "train.rules=[{name: lisa, period: soon}]": r"'train.rules\[0\].lisa.period' expects <class 'int'>, got 'soon'",
        "train.rules=[{n_layers: 2}]": r"'train.rules\[0\]' must be a rule name or a mapping with a 'name'",
        "train.rules=[lisa, lisa]": r"'train.rules\[1\]': rule 'lisa' is listed twice",
        "train.rules=[{name: lisa, period: 0}]": r"lisa needs n_layers >= 0 and period >= 1",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            recipe("digits_lisa", tmp_path, override)
    with pytest.raises(ConfigError, match=r"dylora_rank needs an adapter with method: dylora.*default \(lora\)"):
        recipe("digits_loraplus", tmp_path, "train.rules=[dylora_rank]")
    with pytest.raises(ConfigError, match=r"ALLoRA trains without dropout; set adapters.default.dropout=0"):
        recipe("digits_allora", tmp_path, "adapters.default.dropout=0.1")
    with pytest.raises(ConfigError, match=r"set adapters.default.alpha equal to its r=4"):
        recipe("digits_allora", tmp_path, "adapters.default.alpha=8")
    with pytest.raises(ConfigError, match=r"allora is AdamW or plain SGD"):
        recipe("digits_allora", tmp_path, "optim.name=sgd", "optim.momentum=0.9")
    zero2 = f"train.deepspeed={ROOT / 'configs' / 'deepspeed' / 'zero2.json'}"
    with pytest.raises(ConfigError, match=r"lisa freezes layers between steps, which DeepSpeed"):
        recipe("digits_lisa", tmp_path, zero2)
    with pytest.raises(ConfigError, match=r"allora needs each parameter's rows, which DeepSpeed flattens"):
        recipe("digits_allora", tmp_path, zero2)
    with pytest.raises(ConfigError, match=r"'optim.loraplus_ratio' must be > 0, got -2"):
        recipe("digits_loraplus", tmp_path, "optim.loraplus_ratio=-2")


def test_the_loop_calls_every_hook_in_order(tmp_path):
    train(recipe("digits_loraplus", tmp_path, "train.rules=[test_recorder]", "optim.loraplus_ratio=null",
                 "train.max_steps=2", "train.grad_accum=2"))
    micro = [("before_backward",), ("after_backward",)]
    assert Recorder.last.calls == [
        ("start", 0),
        ("step_start", 0), *micro, *micro, ("before_optimizer_step", 0), ("step_end", 1),
        ("step_start", 1), *micro, *micro, ("before_optimizer_step", 1), ("step_end", 2),
    ]


def test_cli_trains_with_a_rule_and_reports_a_bad_one_in_one_line(tmp_path, capsys):
    from train.cli import main

    config = str(TINY / "digits_dylora.yaml")
    assert main(["train", "--config", config, *FAST, f"train.out_dir={tmp_path}", "train.max_steps=3"]) == 0
    assert set(metric(tmp_path, "dylora_rank")) == {1, 2, 3}
    capsys.readouterr()
    assert main(["train", "--config", config, "train.rules=[dylorarank]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.match(r"mmtune train: .*digits_dylora.yaml.*'train.rules\[0\]'.*unknown training "
                                      r"rule 'dylorarank'.*Did you mean 'dylora_rank'", err[0]), err


# ---------------------------------------------------------------------------- dylora_rank


def _spy_on_ranks(monkeypatch) -> list[tuple[int, int]]:
    """(layer id, rank) of every DyLoRA forward in training mode."""
    from mm.adapters.dylora import DyLoRA

    used: list[tuple[int, int]] = []
    factors = DyLoRA.factors

    def spy(self):
        a, b, scaling = factors(self)
        if self.training:
            used.append((id(self), a.shape[0]))
        return a, b, scaling

    monkeypatch.setattr(DyLoRA, "factors", spy)
    return used


def test_dylora_rank_is_one_draw_per_step_for_every_layer(tmp_path, monkeypatch):
    used = _spy_on_ranks(monkeypatch)
    out = tmp_path / "rule"
    train(recipe("digits_dylora", out, "train.max_steps=12", "train.grad_accum=2"))
    # digits MLP: fc1 then fc2 per forward, two micro-batches per step -> four forwards of each step
    per_step = [used[i:i + 4] for i in range(0, len(used), 4)]
    assert len(per_step) == 12 and all(len({layer for layer, _ in step}) == 2 for step in per_step)
    ranks = [{rank for _, rank in step} for step in per_step]
    assert all(len(r) == 1 for r in ranks), f"layers of one step disagree: {ranks}"
    drawn = [r.pop() for r in ranks]
    assert len(set(drawn)) > 2 and all(1 <= r <= 8 for r in drawn), drawn
    assert metric(out, "dylora_rank") == {step + 1: float(rank) for step, rank in enumerate(drawn)}
    used.clear()  # without the rule every layer draws its own rank on each forward
    train(recipe("digits_dylora", tmp_path / "off", "train.max_steps=12", "train.rules=[]"))
    pairs = [used[i:i + 2] for i in range(0, len(used), 2)]
    assert any(a[1] != b[1] for a, b in pairs)


def test_dylora_ranks_continue_after_a_resume(tmp_path):
    straight = tmp_path / "straight"
    train(recipe("digits_dylora", straight, "train.max_steps=6"))
    split = tmp_path / "split"
    train(recipe("digits_dylora", split, "train.max_steps=3"))
    train(recipe("digits_dylora", split, "train.max_steps=6", "train.resume=auto"))
    assert metric(split, "dylora_rank") == metric(straight, "dylora_rank")


# ---------------------------------------------------------------------------- LISA


def _layer_of(key: str) -> int | None:
    found = re.search(r"encoder\.blocks\.(\d+)\.", key)
    return int(found.group(1)) if found else None


def test_lisa_trains_only_the_drawn_layers_and_resumes_on_the_same_draws(tmp_path):
    out = tmp_path / "run"
    constant = "optim.schedule=constant"  # the 3-step run's schedule then matches the 6-step run's
    train(recipe("digits_lisa", out, constant, "train.max_steps=6", "train.save_every=1", "train.keep_last=10"))
    # the recipe: seed 0, n_layers 1 of the ViT's 4 blocks, a new draw every 2 steps
    draws = [lisa_draw(0, step // 2, n_layers=1, total=4) for step in range(6)]
    assert len({tuple(d) for d in draws}) > 1 and all(len(d) == 1 for d in draws)
    folders = sorted((out / "checkpoints").glob("step-*"))
    assert len(folders) == 6
    previous = load_file(str(folders[0] / "adapters.safetensors"))
    for step, folder in enumerate(folders[1:], start=1):
        current = load_file(str(folder / "adapters.safetensors"))
        changed = {_layer_of(k) for k in current if not torch.equal(current[k], previous[k])}
        # B starts at zero, so a layer's first step moves only B; every drawn layer moves, nothing else does
        assert changed == set(draws[step]), f"step {step + 1}: changed {changed}, drawn {draws[step]}"
        previous = current
    resumed = tmp_path / "resumed"
    train(recipe("digits_lisa", resumed, constant, "train.max_steps=3"))
    train(recipe("digits_lisa", resumed, constant, "train.max_steps=6", "train.resume=auto"))
    straight = load_file(str(out / "adapters.safetensors"))
    again = load_file(str(resumed / "adapters.safetensors"))
    assert all(torch.allclose(straight[k], again[k], atol=1e-6) for k in straight)
    assert csv_losses(resumed) == pytest.approx(csv_losses(out), abs=1e-5)


# ---------------------------------------------------------------------------- ALLoRA and LoRA+


def test_allora_scales_each_rows_step_by_its_norm(tmp_path):
    run = recipe("digits_allora", tmp_path, "train.rules=[{name: allora, eta: 4}, test_recorder]",
                 "train.max_steps=3", "optim.name=sgd", "optim.warmup_steps=0", "train.clip_norm=null")
    train(run)
    rec = Recorder.last
    assert isinstance(rec.optimizer, ALLoRA)
    assert not [m for m in rec.task.modules() if isinstance(m, torch.nn.Dropout)]
    lr = run.optim.lr  # constant schedule, no warm-up
    steps = rec.steps
    assert len(steps) == 3
    for step in steps:
        for name, (before, grad, after) in step.items():
            expected = before - lr * allora_coefficient(before, eta=4.0) * grad  # SGD: the ALLoRA update
            assert torch.allclose(after, expected, atol=1e-6), name
    first = steps[0]["encoder.fc1.adapters.default.lora_B"]
    assert torch.count_nonzero(first[0]) == 0  # B starts at zero: its rows move at eta * lr
    assert torch.allclose(first[2], -lr * 4.0 * first[1], atol=1e-7)


def test_loraplus_puts_b_at_ratio_times_the_learning_rate(tmp_path):
    run = recipe("digits_loraplus", tmp_path, "train.rules=[test_recorder]", "train.max_steps=3", "optim.name=sgd",
                 "optim.schedule=constant", "optim.warmup_steps=0", "train.clip_norm=null")
    train(run)
    rec = Recorder.last
    ratio, lr = run.optim.loraplus_ratio, run.optim.lr
    groups = rec.optimizer.param_groups
    names = {id(p): n for n, p in rec.task.named_parameters()}
    assert [g["lr"] for g in groups] == [lr, lr * ratio]
    assert {names[id(p)].rsplit(".", 1)[-1] for p in groups[1]["params"]} == {"lora_B"}
    assert not any(names[id(p)].endswith("lora_B") for p in groups[0]["params"])
    assert any(names[id(p)].startswith("head.") for p in groups[0]["params"])
    assert len(rec.steps) == 3
    for step in rec.steps:
        for name, (before, grad, after) in step.items():
            rate = lr * ratio if name.endswith("lora_B") else lr
            assert torch.allclose(after, before - rate * grad, atol=1e-6), name
    assert metric(tmp_path, "lr") == pytest.approx({1: lr, 2: lr, 3: lr})
    with pytest.raises(ConfigError, match=r"'optim.loraplus_ratio': no trainable lora_B in the model"):
        train(recipe("digits_loraplus", tmp_path / "loldu", "adapters.default={method: loldu, targets: [fc1, fc2], r: 4}"))
