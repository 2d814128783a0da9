"""Concrete subspace merging: its defining properties on small problems with a known answer.

- With a mask that keeps everything it is task arithmetic (merged update = lambda * sum of the updates).
- The learned shared mask drops the entries where the task vectors carry interference.
- The AdaMerging inner level recovers the task weights that fit the objective.
- Adapters in (saved/loaded as safetensors) -> a plain LoRA whose update is the masked merge; full task vectors
  in (safetensors state dicts) -> merged weights.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from contract_cases import perturb
from safetensors.torch import load_file, save_file
from torch import nn
from toys import TOYS

import mm
from mm.compose import ConcreteConfig, concrete_merge_adapters, concrete_merge_task_vectors, entropy_loss


@pytest.fixture(autouse=True)
def one_thread():
    """These loops run hundreds of tiny steps: on a shared machine torch's thread pool costs 20x their work."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_entropy_loss_is_shannon_entropy_of_the_softmax():
    assert float(entropy_loss(torch.zeros(3, 5))) == pytest.approx(math.log(5), rel=1e-6)
    assert float(entropy_loss(torch.tensor([[50.0, 0.0, 0.0]]))) < 1e-6
    probs = torch.tensor([0.7, 0.2, 0.1])
    assert float(entropy_loss(probs.log()[None])) == pytest.approx(float(-(probs * probs.log()).sum()), rel=1e-5)


def _linear_problem(bad_share: float = 0.0, seed: int = 0):
    """A base linear map, two task vectors, and validation batches whose targets are ``targets(tau)``."""
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 8, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(8, 16, generator=gen))
    good = [torch.randn(8, 16, generator=gen) * 0.5 for _ in range(2)]
    bad = (torch.rand(8, 16, generator=gen) < bad_share).float()
    # Interference: on the bad entries the two tasks pull hard in opposite directions.
    noise = torch.randn(8, 16, generator=gen).abs() * 4.0 * bad
    taus = [good[0] + noise, good[1] - 2 * noise]
    return model, good, taus, bad, gen


def _mse_batches(model, weight: torch.Tensor, gen, tasks: int = 2, count: int = 4):
    inputs = [[torch.randn(32, 16, generator=gen) for _ in range(count)] for _ in range(tasks)]
    return [[(x, x @ weight.T) for x in task] for task in inputs]


def _mse(model, batch, task):
    x, y = batch
    return F.mse_loss(model(x), y)


def _finetuned_states(model, taus, tmp_path):
    """Each task's fine-tuned weights written as a safetensors file and read back (the real format)."""
    states = []
    for t, tau in enumerate(taus):
        path = tmp_path / f"task{t}.safetensors"
        save_file({"0.weight": (model[0].weight.detach() + tau).contiguous()}, str(path))
        states.append(load_file(str(path)))
    return states


def test_full_mask_is_task_arithmetic_on_full_task_vectors(tmp_path):
    model, _good, taus, _bad, gen = _linear_problem()
    batches = _mse_batches(model, model[0].weight.detach(), gen)
    config = ConcreteConfig(initial_logits=30.0, steps=0, scaling=0.4)
    merged, result = concrete_merge_task_vectors(model, _finetuned_states(model, taus, tmp_path), batches, _mse,
                                                 config)
    expected = model[0].weight.detach() + 0.4 * (taus[0] + taus[1])
    torch.testing.assert_close(merged["0.weight"], expected, rtol=1e-5, atol=1e-5)
    assert result.kept == 1.0


def test_learned_mask_drops_the_interfering_entries(tmp_path):
    model, good, taus, bad, gen = _linear_problem(bad_share=0.25)
    scaling = 0.5
    target = model[0].weight.detach() + scaling * (good[0] + good[1])
    batches = _mse_batches(model, target, gen)
    states = _finetuned_states(model, taus, tmp_path)
    plain, _ = concrete_merge_task_vectors(model, states, batches, _mse,
                                           ConcreteConfig(initial_logits=30.0, steps=0, scaling=scaling))
    config = ConcreteConfig(scaling=scaling, steps=150, mask_lr=0.2, initial_logits=1.0)
    merged, result = concrete_merge_task_vectors(model, states, batches, _mse, config)
    mask = result.mask["0.weight"]
    on_bad, off_bad = float(mask[bad.bool()].mean()), float(mask[~bad.bool()].mean())
    assert on_bad < 0.4 * off_bad, (on_bad, off_bad)
    x = torch.randn(256, 16, generator=gen)
    error = {name: float(F.mse_loss(x @ w.T, x @ target.T)) for name, w in
             (("task arithmetic", plain["0.weight"]), ("concrete", merged["0.weight"]))}
    assert error["concrete"] < 0.1 * error["task arithmetic"], error
    assert result.losses[-1] < result.losses[0]


def test_adamerging_inner_level_recovers_the_task_weights(tmp_path):
    model, _good, taus, _bad, gen = _linear_problem()
    target = model[0].weight.detach() + 0.9 * taus[0] + 0.1 * taus[1]
    batches = _mse_batches(model, target, gen)
    config = ConcreteConfig(inner="adamerging", initial_logits=30.0, steps=3, adamerging_steps=300,
                            adamerging_lr=0.02, scaling=0.3)
    merged, result = concrete_merge_task_vectors(model, _finetuned_states(model, taus, tmp_path), batches, _mse,
                                                 config)
    assert result.weights.shape == (2, 1)  # layer-wise: one lambda per task and weight tensor (one here)
    torch.testing.assert_close(result.weights[:, 0], torch.tensor([0.9, 0.1]), atol=0.03, rtol=0)
    torch.testing.assert_close(merged["0.weight"], target, atol=0.1, rtol=0)


def _two_task_mlp(tmp_path):
    """TinyMLP with two LoRAs, saved to and loaded from an adapter safetensors file."""
    toy = TOYS["mlp"]
    model = toy.build()
    for seed, name in enumerate(["task_a", "task_b"]):
        mm.attach(model, mm.LoRAConfig(targets=["fc1", "fc2"], r=2, alpha=4.0), name)
        perturb(model, name, seed=seed, scale=0.4)
    mm.save_adapters(model, tmp_path / "tasks.safetensors")
    return mm.load_adapters(toy.build(), tmp_path / "tasks.safetensors"), toy


def test_full_mask_on_adapters_equals_task_arithmetic_of_their_updates(tmp_path):
    model, toy = _two_task_mlp(tmp_path)
    batches = [[toy.make_input()], [toy.make_input() * 2]]
    name, _ = concrete_merge_adapters(model, ["task_a", "task_b"], batches,
                                      lambda m, x, t: entropy_loss(m(x)),
                                      ConcreteConfig(initial_logits=30.0, steps=0, scaling=0.5), rank=4)
    ta = mm.merge_adapters(model, ["task_a", "task_b"], "cat", [0.5, 0.5], new_name="ta")
    for layer_name, layer in mm.adapted_layers(model):
        ours = layer.adapters[name].delta_weight(layer.base)
        torch.testing.assert_close(ours, layer.adapters[ta].delta_weight(layer.base), rtol=1e-4, atol=1e-5,
                                   msg=layer_name)


def test_concrete_adapter_is_the_masked_merge_and_saves_and_exports(tmp_path):
    model, toy = _two_task_mlp(tmp_path)
    gen = torch.Generator().manual_seed(3)
    unlabeled = [[torch.randn(16, 12, generator=gen) for _ in range(3)] for _ in range(2)]
    name, result = concrete_merge_adapters(model, ["task_a", "task_b"], unlabeled,
                                           lambda m, x, t: entropy_loss(m(x)),
                                           ConcreteConfig(steps=20, mask_lr=0.05, seed=1))
    assert len(result.losses) == 20 and all(math.isfinite(v) for v in result.losses)
    assert mm.active_adapters(model) == ["task_a", "task_b"], "the merged adapter is attached inactive"
    for layer_name, layer in mm.adapted_layers(model):  # full rank by default: the masked merge exactly
        key = f"{layer_name}.base.weight"
        torch.testing.assert_close(layer.adapters[name].delta_weight(layer.base), result.deltas[key],
                                   rtol=1e-4, atol=1e-5)
    mm.set_active(model, name)
    x = toy.make_input()
    expected = model(x)
    mm.save_adapters(model, tmp_path / "concrete.safetensors", [name])
    torch.testing.assert_close(mm.load_adapters(toy.build(), tmp_path / "concrete.safetensors")(x), expected)
    mm.export_peft(model, tmp_path / "peft", adapter=name)
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()
