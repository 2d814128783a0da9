"""DyLoRA: nested truncation in training (the paper's update rule), any rank <= r at inference."""

from __future__ import annotations

import argparse
from collections import Counter

import pytest
import torch
from toys import TOYS, TinyMLP

import mm
from mm.adapters import dylora

R, ALPHA = 5, 10.0


def _seeded_mlp(seed: int = 0) -> TinyMLP:
    torch.manual_seed(seed)
    return TinyMLP()


def _dylora(model, **options):
    config = {"method": "dylora", "targets": ["fc1", "fc2"], "r": R, "alpha": ALPHA, **options}
    return mm.attach(model, mm.AdapterConfig.from_dict(config))


def _randomise(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in mm.adapted_layers(model):
            for param in layer.adapters["default"].parameters():
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)


@pytest.mark.parametrize("toy_name", ["mlp", "vit"])
def test_every_rank_equals_a_lora_built_from_the_truncated_factors(toy_name):
    toy = TOYS[toy_name]
    model, x = toy.build(), toy.make_input()
    mm.attach(model, mm.AdapterConfig.from_dict({"method": "dylora", "targets": toy.targets, "r": R,
                                                  "alpha": ALPHA}))
    _randomise(model)
    model.eval()
    outputs = []
    for b in range(1, R + 1):
        dylora.set_rank(model, b)
        lora = toy.build()
        mm.attach(lora, mm.LoRAConfig(targets=toy.targets, r=b, alpha=ALPHA))
        with torch.no_grad():
            for (_, layer), (_, lora_layer) in zip(mm.adapted_layers(model), mm.adapted_layers(lora), strict=True):
                adapter = layer.adapters["default"]
                lora_layer.adapters["default"].lora_A.copy_(adapter.lora_A[:b])
                lora_layer.adapters["default"].lora_B.copy_(adapter.lora_B[:, :b])
                torch.testing.assert_close(adapter.delta_weight(layer.base),
                                           lora_layer.adapters["default"].delta_weight(lora_layer.base))
        out = toy.run(model, x)
        torch.testing.assert_close(out, toy.run(lora, x), rtol=1e-5, atol=1e-6, msg=f"rank {b}")
        outputs.append(out)
    gaps = [float((a - b).abs().max().detach()) for a, b in zip(outputs, outputs[1:], strict=False)]
    assert min(gaps) > 1e-4, f"neighbouring ranks give the same output: {gaps}"


def _one_training_step(model, rank_seed: int) -> int:
    """One SGD step in training mode at a pinned, seeded rank; returns the rank."""
    model.train()
    drawn = dylora.sample_rank(model, torch.Generator().manual_seed(rank_seed))
    x = torch.randn(8, 12, generator=torch.Generator().manual_seed(3))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(x).pow(2).mean().backward()
    optimizer.step()
    return drawn["default"]


@pytest.mark.parametrize("mode", ["frozen", "all"])
def test_a_step_at_rank_b_updates_the_papers_components(mode):
    for rank_seed in range(6):
        model = _dylora(_seeded_mlp(), update=mode)
        _randomise(model)
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        b = _one_training_step(model, rank_seed)
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            # rows of A / columns of B: component i of the adapter
            changed = (param != before[name]).any(dim=1 if name.endswith("lora_A") else 0)
            trained = torch.zeros(R, dtype=torch.bool)
            if mode == "frozen":
                trained[b - 1] = True  # the paper: only the b-th component moves
            else:
                trained[:b] = True
            assert torch.equal(changed, trained), f"{mode}, b={b}, {name}: changed components {changed.tolist()}"


def test_training_scaling_is_alpha_over_the_sampled_rank():
    model = _dylora(_seeded_mlp())
    _randomise(model)
    x = torch.randn(4, 12)
    for b in range(1, R + 1):
        model.train()
        for _, layer in mm.adapted_layers(model):
            layer.adapters["default"].train_rank = b
        train_out = model(x)
        model.eval()
        dylora.set_rank(model, b)
        torch.testing.assert_close(train_out, model(x), rtol=1e-6, atol=1e-6)


def test_sample_rank_is_seeded_uniform_and_shared_by_all_layers():
    model = _dylora(_seeded_mlp(), r_min=2)
    gen, gen_again = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    draws = [dylora.sample_rank(model, gen)["default"] for _ in range(3000)]
    again = [dylora.sample_rank(model, gen_again)["default"] for _ in range(3000)]
    assert draws == again
    counts = Counter(draws)
    assert set(counts) == {2, 3, 4, 5}
    assert all(abs(c / 3000 - 0.25) < 0.04 for c in counts.values()), counts
    ranks = {layer.adapters["default"].train_rank for _, layer in mm.adapted_layers(model)}
    assert ranks == {draws[-1]}
    dylora.unpin_rank(model)
    assert {layer.adapters["default"].train_rank for _, layer in mm.adapted_layers(model)} == {None}


@pytest.mark.slow
def test_dylora_training_makes_low_ranks_useful():
    """Fit a rank-4 target update with singular values 4, 2, 1, 0.5 using one DyLoRA adapter (paper rule).

    Component 1 is trained alone at rank 1, so the rank-1 truncation is the best rank-1 fit; the error falls
    with the rank; and low ranks are far better than truncating a plain LoRA. Higher ranks are not the best
    rank-b fits: with the paper's alpha/b scaling a component's share shrinks as b grows, so the nested fits
    compete (the paper trades some full-rank accuracy for the whole range).
    """
    gen = torch.Generator().manual_seed(0)
    d, singular = 16, torch.tensor([4.0, 2.0, 1.0, 0.5])
    u, _ = torch.linalg.qr(torch.randn(d, 4, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(d, 4, generator=gen))
    target_update = u @ torch.diag(singular) @ v.T
    x = torch.randn(256, d, generator=gen)
    y = x @ target_update.T

    def train(method: str) -> torch.nn.Module:
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(d, d, bias=False))
        torch.nn.init.zeros_(model[0].weight)
        mm.attach(model, mm.AdapterConfig.from_dict({"method": method, "targets": ["0"], "r": 4, "alpha": 4.0}))
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-2)
        rank_gen = torch.Generator().manual_seed(2)
        model.train()
        for _ in range(800):
            if method == "dylora":
                dylora.sample_rank(model, rank_gen)
            loss = (model(x) - y).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return model.eval()

    @torch.no_grad()
    def error_at(model, b: int) -> float:
        adapter = model[0].adapters["default"]
        if isinstance(adapter, dylora.DyLoRA):
            dylora.set_rank(model, b)
            delta = adapter.delta_weight(model[0].base)
        else:  # a plain rank-4 LoRA cut to its first b components, at the same alpha/b scaling
            delta = adapter.lora_B[:, :b] @ adapter.lora_A[:b] * (4.0 / b)
        return float((delta - target_update).norm() / target_update.norm())

    best = [float(singular[b:].norm() / singular.norm()) for b in range(1, 5)]
    dy, plain = train("dylora"), train("lora")
    dy_errors, plain_errors = [error_at(dy, b) for b in range(1, 5)], [error_at(plain, b) for b in range(1, 5)]
    assert dy_errors[0] < best[0] + 0.02, (dy_errors, best)
    assert all(b <= a + 1e-3 for a, b in zip(dy_errors, dy_errors[1:], strict=False)), dy_errors
    assert dy_errors[0] < plain_errors[0] - 0.3 and dy_errors[1] < plain_errors[1] - 0.3, (dy_errors, plain_errors)


def test_set_rank_checks_range_and_merged_state():
    model = _dylora(_seeded_mlp())
    with pytest.raises(ValueError, match="has rank 5; cannot run it at rank 6"):
        dylora.set_rank(model, 6)
    mm.merge(model)
    with pytest.raises(RuntimeError, match="merged at rank 5; unmerge"):
        dylora.set_rank(model, 2)
    mm.unmerge(model)
    dylora.set_rank(model, 2)
    with pytest.raises(ValueError, match="no DyLoRA adapter named 'x'"):
        dylora.set_rank(model, 2, name="x")


def test_cli_flag_sets_the_rank():
    parser = argparse.ArgumentParser()
    dylora.add_rank_flag(parser)
    model = _dylora(_seeded_mlp())
    dylora.apply_rank_flag(model, parser.parse_args([]))
    assert {layer.adapters["default"].eval_rank for _, layer in mm.adapted_layers(model)} == {R}
    dylora.apply_rank_flag(model, parser.parse_args(["--dylora-rank", "3"]))
    assert {layer.adapters["default"].eval_rank for _, layer in mm.adapted_layers(model)} == {3}


def test_config_validation_names_the_key():
    with pytest.raises(mm.ConfigError, match="'r_min' must be in \\[1, r=4\\]"):
        mm.AdapterConfig.from_dict({"method": "dylora", "targets": ["fc1"], "r": 4, "r_min": 5})
    with pytest.raises(mm.ConfigError, match="'eval_rank'"):
        mm.AdapterConfig.from_dict({"method": "dylora", "targets": ["fc1"], "r": 4, "eval_rank": 0})
    with pytest.raises(mm.ConfigError, match="'update'"):
        mm.AdapterConfig.from_dict({"method": "dylora", "targets": ["fc1"], "update": "some"})
