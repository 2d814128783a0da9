"""Per-forward routing: heterogeneous batches (one adapter per row) and the context's scoping."""

from __future__ import annotations

import threading

import pytest
import torch
from contract_cases import perturb
from toys import TOYS

import mm
from mm.route import current_route, route


@pytest.mark.parametrize("toy_name", ["mlp", "vit", "llama"])
def test_each_row_gets_only_its_adapter(toy_name):
    toy = TOYS[toy_name]
    model, x = toy.build(), toy.make_input()
    mm.attach(model, mm.LoRAConfig(targets=toy.targets, r=4), "a")
    mm.attach(model, mm.LoRAConfig(targets=toy.targets[:1], r=2), "b")  # b adapts fewer layers
    perturb(model, "a", seed=1)
    perturb(model, "b", seed=2)
    expected = {}
    for name in ("a", "b"):
        mm.set_active(model, name)
        expected[name] = toy.run(model, x)
    with mm.disable_adapters(model):
        expected[None] = toy.run(model, x)
    mm.set_active(model, ["a", "b"])  # ignored inside a per-row route
    rows = (["a", "b", None, "a", "b"] * 2)[: x.shape[0]]
    with route(row_adapters=rows):
        mixed = toy.run(model, x)
    for i, name in enumerate(rows):
        torch.testing.assert_close(mixed[i], expected[name][i], rtol=1e-5, atol=1e-6)
    assert current_route() is None


def test_rows_must_match_the_batch():
    toy = TOYS["mlp"]
    model = toy.build()
    mm.attach(model, mm.LoRAConfig(targets=["fc1"]), "a")
    with pytest.raises(ValueError, match="adapters for 2 rows, the batch has 4"), route(row_adapters=["a", "a"]):
        model(toy.make_input())


def test_route_nests_and_is_per_thread():
    seen = []
    with route(scale="audio4_video2") as outer:
        with route(token_masks={"vision": torch.ones(1, 3, dtype=torch.bool)}):
            assert current_route().scale is None and "vision" in current_route().token_masks
        assert current_route() is outer
        thread = threading.Thread(target=lambda: seen.append(current_route()))
        thread.start()
        thread.join()
    assert seen == [None] and current_route() is None


def test_mm_route_is_the_documented_context_manager():
    from mm.route import current_route

    with mm.route(token_masks={"attention": torch.ones(1, 2)}):
        assert "attention" in current_route().token_masks
    assert current_route() is None
