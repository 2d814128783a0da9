"""DiffoRA: the relaxed adaptation matrix finds the modules that matter; the gate scales a LoRA update."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mm
from mm.adapters.diffora import DiffoRAConfig, discretise, select_modules


class Branches(nn.Module):
    """Six linear branches on separate slices of the input, summed: each module's effect is separable."""

    def __init__(self) -> None:
        super().__init__()
        self.branches = nn.ModuleList(nn.Linear(6, 4) for _ in range(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(branch(chunk) for branch, chunk in zip(self.branches, x.chunk(6, dim=-1), strict=True))


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors gain nothing from intra-op threads, and on a loaded machine they cost a lot of waiting.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CANDIDATES = [f"branches.{i}" for i in range(6)]


def _model() -> Branches:
    torch.manual_seed(0)
    return Branches()


def _task(changed: tuple[int, ...], n_batches: int = 8):
    """Targets from a teacher that differs from the model only in the branches ``changed``."""
    teacher = _model()
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for i in changed:
            teacher.branches[i].weight.add_(torch.randn(4, 6, generator=gen))
    batches = []
    for _ in range(n_batches):
        x = torch.randn(32, 36, generator=gen)
        with torch.no_grad():
            batches.append((x, teacher(x)))
    return batches


def _mse(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return (model(x) - y).square().mean()


@pytest.mark.parametrize("changed", [(1, 4), (0, 2, 5)])
def test_search_chooses_exactly_the_modules_that_matter(changed):
    batches = _task(changed)
    model = _model()
    chosen, gates = select_modules(model, CANDIDATES, batches[:6], _mse, val_batches=batches[6:],
                                   ratio=len(changed) / 6, steps=40, r=2,
                                   lr=2e-2, gate_lr=1e-1, return_gates=True)
    assert chosen == [f"branches.{i}" for i in changed], gates
    assert min(gates[c] for c in chosen) > max(g for n, g in gates.items() if n not in chosen)


def test_search_leaves_the_model_as_it_was():
    model = _model()
    model.branches[0].weight.requires_grad_(False)  # a prior freeze the search must not undo or extend
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    select_modules(model, CANDIDATES, _task((3,), n_batches=2), _mse, steps=3, r=2)
    assert mm.adapter_names(model) == []
    assert not list(mm.adapted_layers(model))
    for name, param in model.named_parameters():
        value, requires_grad = before[name]
        assert torch.equal(param, value) and param.requires_grad == requires_grad, name


def test_gate_scales_the_lora_update():
    model = nn.Sequential(nn.Linear(6, 4))
    mm.attach(model, DiffoRAConfig(targets=["0"], r=2, alpha=4.0, gate_init=1.5))
    adapter = model[0].adapters["default"]
    with torch.no_grad():
        adapter.lora_B.normal_()
    lora_delta = adapter.lora_B @ adapter.lora_A * adapter.scaling
    gate = torch.sigmoid(torch.tensor(1.5))
    torch.testing.assert_close(adapter.delta_weight(model[0].base), gate * lora_delta)
    x = torch.randn(3, 6)
    torch.testing.assert_close(model(x), model[0].base(x) + gate * x @ lora_delta.T)
    # r (in + out) LoRA numbers plus one DAM entry per module.
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * (6 + 4) + 1


def test_discretise_keeps_the_top_ratio_in_model_order():
    gates = {"a": 0.2, "b": 0.9, "c": 0.6, "d": 0.1}
    assert discretise(gates, 0.5) == ["b", "c"]
    assert discretise(gates, 0.01) == ["b"]
    with pytest.raises(ValueError, match="'ratio'"):
        select_modules(_model(), CANDIDATES, [], _mse, ratio=0.0)
