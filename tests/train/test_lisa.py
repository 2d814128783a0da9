"""LISA: a seeded schedule of gamma middle layers every K steps; frozen layers get no update and no state."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn
from toys import tiny_gpt2, tiny_llama

from train.rules.lisa import LISA, find_layer_list


class Stack(nn.Module):
    def __init__(self, depth: int = 6, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, dim)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(dim, dim), nn.Tanh()) for _ in range(depth))
        self.head = nn.Linear(dim, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h.mean(dim=1))


def _setup(seed=0, n_layers=2, period=5, depth=6):
    torch.manual_seed(0)
    model = Stack(depth)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, optimizer, LISA(model, optimizer, n_layers=n_layers, period=period, seed=seed)


def _train(model, lisa, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        tokens, labels = torch.randint(0, 10, (4, 5), generator=gen), torch.randint(0, 3, (4,), generator=gen)
        nn.functional.cross_entropy(model(tokens), labels).backward()
        lisa.step()


def test_schedule_is_seeded_and_switches_every_period():
    model, _, lisa = _setup(seed=3, period=5)
    _train(model, lisa, 23)
    expected = [(step, lisa.draw(step // 5)) for step in (0, 5, 10, 15, 20)]
    assert lisa.history == expected
    assert lisa.active == expected[-1][1]
    assert len({tuple(layers) for _, layers in expected}) > 1, "the draws never changed"
    _, _, same = _setup(seed=3)
    _, _, other = _setup(seed=4)
    assert same.history[0] == lisa.history[0]
    draws = [tuple(other.switch()) for _ in range(4)]
    assert draws != [tuple(layers) for _, layers in expected[1:]], "different seeds gave the same schedule"


def test_layers_are_drawn_uniformly_without_replacement():
    _, _, lisa = _setup(seed=0, n_layers=2)
    counts = Counter()
    for _ in range(3000):
        active = lisa.switch()
        assert len(set(active)) == 2
        counts.update(active)
    assert set(counts) == set(range(6))
    assert all(abs(c / 3000 - 2 / 6) < 0.03 for c in counts.values()), counts


def test_frozen_layers_get_no_update_and_no_optimizer_state():
    model, optimizer, lisa = _setup(seed=1, period=4)
    _train(model, lisa, 4)  # one full period: moments exist for the first draw
    active = lisa.active  # drawn at step 4, trains for steps 4..7
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    _train(model, lisa, 3, seed=2)
    assert lisa.active == active
    for name, p in model.named_parameters():
        layer = int(name.split(".")[1]) if name.startswith("blocks.") else None
        changed = not torch.equal(p, before[name])
        if layer is None or layer in active:
            assert changed and p.requires_grad, f"{name} should train"
        else:
            assert not changed and not p.requires_grad and p.grad is None, f"{name} is frozen but changed"
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in optimizer.state} == trainable
    # The groups keep every parameter (a frozen one has no gradient, so the optimizer skips it).
    assert {id(p) for group in optimizer.param_groups for p in group["params"]} == {id(p) for p in model.parameters()}


def test_scheduler_and_resume_keep_working():
    model, optimizer, lisa = _setup(seed=5, period=3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    _train(model, lisa, 4)
    for _ in range(2):
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2.5e-3)
    saved = lisa.state_dict()
    _train(model, lisa, 9)
    continued = lisa.history[-3:]
    model2, optimizer2, _ = _setup(seed=5, period=3)
    resumed = LISA(model2, optimizer2, n_layers=2, period=3, seed=5, start_step=saved["steps"])
    assert resumed.active == lisa.history[1][1]  # the draw in force at step 4 (drawn at step 3)
    _train(model2, resumed, 9)
    assert resumed.history[-3:] == continued
    model3, _, from_state = _setup(seed=5, period=3)
    from_state.load_state_dict(saved)
    _train(model3, from_state, 9)
    assert from_state.history[-3:] == continued


def test_finds_the_layer_lists_of_common_backbones():
    assert find_layer_list(tiny_llama())[0] == "model.layers"
    assert find_layer_list(tiny_gpt2())[0] == "transformer.h"
    assert find_layer_list(Stack())[0] == "blocks"
    wrapper = nn.Module()
    wrapper.encoder = Stack()  # a task keeps its backbone below the top
    assert find_layer_list(wrapper)[0] == "encoder.blocks"
    with pytest.raises(ValueError, match="found none of"):
        find_layer_list(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="not a non-empty nn.ModuleList"):
        find_layer_list(Stack(), "head")


def test_bad_settings_are_refused():
    model = Stack()
    with pytest.raises(ValueError, match="n_layers must be in \\[0, 6\\]"):
        LISA(model, torch.optim.SGD(model.parameters(), lr=0.1), n_layers=7)
    with pytest.raises(ValueError, match="does not hold"):
        LISA(model, torch.optim.SGD(model.head.parameters(), lr=0.1))
