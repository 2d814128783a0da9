"""Every adapter whose update is B (A' x) adds it through LoRA's fused node (``add_low_rank_``), and that
node gives the same output and the same gradients (input and every trainable tensor) as autograd through
the adapter's own ``delta``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mm
from mm.adapters.dylora import DyLoRA
from mm.adapters.lora_sb import LoRASB

IN, OUT = 24, 20

#: method options; every one of these updates is B (A' x) for some A' assembled per call.
FUSED = {
    "block_lora": {"r": 4, "alpha": 8.0, "blocks": 4},
    "dylora-all": {"method": "dylora", "r": 6, "alpha": 8.0, "update": "all"},
    "dylora-frozen": {"method": "dylora", "r": 6, "alpha": 8.0, "update": "frozen"},
    "nola": {"r": 4, "alpha": 8.0, "num_basis_a": 8, "num_basis_b": 8},
    "mos": {"r": 4, "alpha": 8.0, "pool_shards": 12, "private_shards": 2},
    "lora_xs": {"r": 4, "alpha": 4.0},
    "lora_sb": {"r": 4, "alpha": 4.0},
    "mm_lora": {"r": 4, "alpha": 8.0, "vision_r": 2, "unrouted": "both"},
    "mtsk": {"r": 4, "alpha": 8.0, "strategy": "ms", "parametrisation": "lora"},
}


def _adapter(case: str) -> tuple[nn.Linear, nn.Module]:
    torch.manual_seed(0)
    options = dict(FUSED[case])
    method = options.pop("method", case)
    config = mm.AdapterConfig.from_dict({"method": method, "targets": ["x"], **options})
    base = nn.Linear(IN, OUT).requires_grad_(False)
    adapter = config.build_for("layer", IN, OUT, base.weight).train()
    with torch.no_grad():  # off the init (B = 0 would hide A's gradient)
        for tensor in adapter.parameters():
            tensor.add_(torch.randn_like(tensor) * 0.3)
    if isinstance(adapter, LoRASB):  # its factors come from data: fill them from a random update
        adapter.set_from_update(torch.randn(OUT, IN))
    if isinstance(adapter, DyLoRA):
        adapter.train_rank = 4  # one rank for both paths (a drawn one would differ between them)
    return base, adapter


def _outputs_and_grads(base, adapter, x, fused: bool):
    x = x.clone().requires_grad_(True)
    out = base(x)
    y = adapter(x, out, base) if fused else out + adapter.delta(x, base)
    params = [p for p in adapter.parameters() if p.requires_grad]
    loss = (y * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum()
    grads = torch.autograd.grad(loss, [x, *params])
    return y.detach(), grads, y.grad_fn


@pytest.mark.parametrize("case", sorted(FUSED))
def test_fused_path_matches_autograd_through_delta(case):
    base, adapter = _adapter(case)
    x = torch.randn(3, 5, IN)
    y_fused, grads_fused, node = _outputs_and_grads(base, adapter, x, fused=True)
    y_ref, grads_ref, _ = _outputs_and_grads(base, adapter, x, fused=False)
    assert type(node).__name__ == "_AddLowRankBackward", f"{case} did not take the fused node: {node}"
    torch.testing.assert_close(y_fused, y_ref, rtol=1e-5, atol=1e-5)
    assert len(grads_fused) == len(grads_ref) > 1
    for got, want in zip(grads_fused, grads_ref, strict=True):
        assert want.abs().sum() > 0 or got.abs().sum() == 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_dylora_frozen_components_get_no_gradient_on_the_fused_path():
    base, adapter = _adapter("dylora-frozen")
    x = torch.randn(2, 3, IN)
    adapter(x, base(x), base).sum().backward()
    # At rank 4 only component 4 (index 3) trains this step; 1..3 take part in the forward only.
    assert adapter.lora_A.grad[:3].abs().sum() == 0 and adapter.lora_A.grad[3].abs().sum() > 0
    assert adapter.lora_B.grad[:, :3].abs().sum() == 0 and adapter.lora_B.grad[:, 3].abs().sum() > 0
    assert adapter.lora_A.grad[4:].abs().sum() == 0  # above the drawn rank: not in the forward at all


def test_block_lora_fused_forward_under_no_grad_adds_in_place():
    base, adapter = _adapter("block_lora")
    x = torch.randn(4, IN)
    with torch.no_grad():
        out = base(x)
        expected = out + adapter.delta(x, base)
        y = adapter(x, out, base)
    torch.testing.assert_close(y, expected)
    assert y.data_ptr() == out.data_ptr()  # no out-wide temporary at inference
