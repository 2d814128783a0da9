"""Block-LoRA: one shared down-projection block, computed by summing input chunks first."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import mm
from mm.adapters.block_lora import BlockLoRAConfig, block_lora_cost, lora_cost


def _adapter(in_features=16, out_features=12, r=3, blocks=4, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(in_features, out_features)
    adapter = BlockLoRAConfig(targets=["x"], r=r, alpha=6.0, blocks=blocks).build(in_features, out_features,
                                                                                   base.weight)
    with torch.no_grad():
        adapter.lora_B.normal_()
    return base, adapter


def test_cheap_forward_equals_explicit_block_matrix():
    """delta W as the n x n block matrix [B_i A_0]_ij equals the chunk-sum computation."""
    base, adapter = _adapter()
    n, r = 4, 3
    a0, b = adapter.lora_A.detach(), adapter.lora_B.detach()
    row_blocks = torch.tensor_split(b, n, dim=0)  # B_1..B_n, (out/n, r) each
    explicit = torch.cat([torch.cat([b_i @ a0 for _ in range(n)], dim=1) for b_i in row_blocks], dim=0)
    explicit = explicit * adapter.scaling
    assert explicit.shape == (12, 16)
    torch.testing.assert_close(adapter.delta_weight(base), explicit)
    x = torch.randn(5, 7, 16)
    torch.testing.assert_close(adapter.delta(x, base), x @ explicit.T, rtol=1e-5, atol=1e-6)
    out = base(x)
    torch.testing.assert_close(adapter(x, out.clone(), base), out + x @ explicit.T, rtol=1e-5, atol=1e-6)
    assert torch.linalg.matrix_rank(explicit) == r  # rank min(r, in/n) survives the sharing


def test_equals_lora_whose_down_projection_repeats_the_block():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(16, 8))
    mm.attach(model, BlockLoRAConfig(targets=["0"], r=2, alpha=4.0, blocks=4))
    block = model[0].adapters["default"]
    with torch.no_grad():
        block.lora_B.normal_()
    lora_model = nn.Sequential(nn.Linear(16, 8))
    lora_model.load_state_dict({"0.weight": model[0].base.weight, "0.bias": model[0].base.bias})
    mm.attach(lora_model, mm.LoRAConfig(targets=["0"], r=2, alpha=4.0))
    lora = lora_model[0].adapters["default"]
    with torch.no_grad():
        lora.lora_A.copy_(block.lora_A.repeat(1, 4))
        lora.lora_B.copy_(block.lora_B)
    x = torch.randn(3, 16)
    torch.testing.assert_close(model(x), lora_model(x), rtol=1e-5, atol=1e-6)


def test_trainable_params_match_formula_and_undercut_lora():
    shapes = [(16, 12), (32, 16), (64, 32)]
    model = nn.Sequential(*[nn.Linear(i, o) for i, o in shapes])
    r, n = 4, 4
    mm.attach(model, BlockLoRAConfig(targets=["0", "1", "2"], r=r, blocks=n))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == sum(r * (i // n + o) for i, o in shapes)
    assert trainable == sum(block_lora_cost(1, i, o, r, n)["params"] for i, o in shapes)
    assert trainable < sum(lora_cost(1, i, o, r)["params"] for i, o in shapes) == sum(r * (i + o) for i, o in shapes)


@pytest.mark.parametrize("blocks", [1, 2, 4, 8])
def test_counted_flops_match_the_analytic_count(blocks):
    tokens, in_features, out_features, r = 10, 64, 48, 4
    base, adapter = _adapter(in_features, out_features, r, blocks)
    x = torch.randn(2, 5, in_features)
    with FlopCounterMode(display=False) as counter:
        adapter.delta(x, base)
    cost = block_lora_cost(tokens, in_features, out_features, r, blocks)
    assert counter.get_total_flops() == cost["matmul_flops"]
    lora = lora_cost(tokens, in_features, out_features, r)
    if blocks > 1:
        assert cost["matmul_flops"] < lora["matmul_flops"]
        assert cost["params"] < lora["params"]
        # the saved matmul work is replaced by (n - 1) in/n additions per token
        assert cost["additions"] == tokens * (blocks - 1) * in_features // blocks
    else:
        assert cost == lora


def test_lora_flops_count_is_what_lora_runs():
    torch.manual_seed(0)
    base = nn.Linear(64, 48)
    lora = mm.LoRAConfig(targets=["x"], r=4).build(64, 48, base.weight)
    with FlopCounterMode(display=False) as counter:
        lora.delta(torch.randn(10, 64), base)
    assert counter.get_total_flops() == lora_cost(10, 64, 48, 4)["matmul_flops"]


def test_blocks_must_divide_in_features():
    with pytest.raises(mm.ConfigError, match="'blocks'=3 must divide in_features=16"):
        BlockLoRAConfig(targets=["x"], blocks=3).build(16, 8, torch.zeros(8, 16))
    with pytest.raises(mm.ConfigError, match="'blocks' must be >= 1"):
        BlockLoRAConfig(targets=["x"], blocks=0)
