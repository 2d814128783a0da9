"""MoS: shards from global pools shared across layers, private shards, separate A/B routing."""

from __future__ import annotations

import torch
from torch import nn

import mm
from mm.adapters.mos import MoSConfig, ShardPool, mos_trainable_params


class Branches(nn.Module):
    """Four same-shape linear layers on separate inputs plus one of another shape."""

    def __init__(self) -> None:
        super().__init__()
        self.branches = nn.ModuleList(nn.Linear(16, 8) for _ in range(4))
        self.wide = nn.Linear(32, 24)

    def forward(self, xs: list[torch.Tensor], wide_x: torch.Tensor) -> list[torch.Tensor]:
        return [branch(x) for branch, x in zip(self.branches, xs, strict=True)] + [self.wide(wide_x)]


def _model() -> Branches:
    torch.manual_seed(0)
    return Branches()


def _config(**overrides) -> MoSConfig:
    options = {"targets": ["branches.0", "branches.1", "branches.2", "branches.3", "wide"], "r": 4,
               "shards_per_vector": 2, "pool_shards": 10, "private_shards": 2}
    return MoSConfig(**{**options, **overrides})


def _adapters(model: nn.Module, name: str = "default"):
    return {layer_name: layer.adapters[name] for layer_name, layer in mm.adapted_layers(model) if name in layer.adapters}


def test_layers_of_one_shard_length_share_one_pool_stored_once():
    model = _model()
    mm.attach(model, _config())
    adapters = _adapters(model)
    pools_a = {id(a._pools[0]) for n, a in adapters.items() if n.startswith("branches")}
    assert len(pools_a) == 1, "the four same-shape layers must draw A's shards from one pool"
    assert adapters["wide"]._pools[0] is not adapters["branches.0"]._pools[0]  # other shard length, other pool
    pool_keys = [k for k in model.state_dict() if k.endswith(".shards")]
    # One pool per (factor, shard length): A 8 and 16 long, B 4 and 12 long; each saved once, by its first user.
    assert sorted(pool_keys) == sorted([
        "branches.0.adapters.default.pool_a.shards", "branches.0.adapters.default.pool_b.shards",
        "wide.adapters.default.pool_a.shards", "wide.adapters.default.pool_b.shards",
    ])
    assert sum(isinstance(m, ShardPool) for m in model.modules()) == 4


def test_a_shards_gradient_collects_from_every_layer_that_uses_it():
    model = _model()
    mm.attach(model, _config())
    adapters = _adapters(model)
    with torch.no_grad():
        for adapter in adapters.values():
            for param in adapter.parameters():
                param.normal_()
    pool = adapters["branches.0"]._pools[0].shards
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(3, 16, generator=gen) for _ in range(4)]
    outs = model(xs, torch.randn(3, 32, generator=gen))
    per_layer = []
    for out in outs[:4]:
        (grad,) = torch.autograd.grad(out.square().sum(), pool, retain_graph=True)
        per_layer.append(grad)
    total = sum(out.square().sum() for out in outs[:4])
    total.backward()
    torch.testing.assert_close(pool.grad, sum(per_layer))
    # A pool shard selected by several layers has nonzero gradient from each of them.
    users = [set(a.index_a.tolist()) for n, a in adapters.items() if n.startswith("branches")]
    counts = {s: sum(s in u for u in users) for s in range(pool.shape[0])}
    shard = max(counts, key=counts.get)
    assert counts[shard] >= 2, f"no pool shard is used by two layers: {counts}"
    contributions = [g[shard].abs().sum() > 0 for g, u in zip(per_layer, users, strict=True) if shard in u]
    assert len(contributions) == counts[shard] and all(contributions)


def test_each_layer_routes_distinct_shards_with_its_private_ones_once():
    model = _model()
    config = _config()
    mm.attach(model, config)
    slots = config.r * config.shards_per_vector
    for adapter in _adapters(model).values():
        for index in (adapter.index_a, adapter.index_b):
            assert index.numel() == slots and len(set(index.tolist())) == slots  # subset selection
            private = [i for i in index.tolist() if i >= config.pool_shards]
            assert sorted(private) == [config.pool_shards + k for k in range(config.private_shards)]
        assert not torch.equal(adapter.index_a, adapter.index_b)  # pair dissociation: A and B routed apart
    private_ids = {id(a.private_a) for a in _adapters(model).values()}
    assert len(private_ids) == 5  # shard privatization: every layer owns its own


def test_factors_are_shards_concatenated_along_each_vector():
    model = _model()
    mm.attach(model, _config())
    adapter = _adapters(model)["branches.2"]
    lora_a, lora_b = adapter.factors()
    pool_a = torch.cat([adapter._pools[0].shards, adapter.private_a])
    l_shards = 2
    for k in range(4):
        expected_row = torch.cat([pool_a[adapter.index_a[k * l_shards + s]] for s in range(l_shards)])
        torch.testing.assert_close(lora_a[k], expected_row)
    assert lora_b.shape == (8, 4) and lora_a.shape == (4, 16)


def test_parameter_saving_against_lora_of_equal_capacity():
    model, lora_model = _model(), _model()
    config = _config()
    mm.attach(model, config)
    mm.attach(lora_model, mm.LoRAConfig(targets=config.targets, r=config.r))
    shapes = [(16, 8)] * 4 + [(32, 24)]
    mos_count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lora_count = sum(p.numel() for p in lora_model.parameters() if p.requires_grad)
    assert mos_count == mos_trainable_params(config, shapes)
    # Pools: A 10*8 + 10*16, B 10*4 + 10*12; private: 2 shards of (in+out)/2 per layer.
    assert mos_count == 10 * (8 + 16 + 4 + 12) + 4 * 2 * (8 + 4) + 2 * (16 + 12)
    assert lora_count == 4 * 4 * (16 + 8) + 4 * (32 + 24)
    assert mos_count < lora_count  # same rank-4 factors per layer, fewer numbers behind them


def test_two_adapters_from_one_config_get_their_own_pools(tmp_path):
    model = _model()
    config = _config()
    mm.attach(model, config, "a")
    mm.attach(model, config, "b")
    a, b = _adapters(model, "a")["branches.1"], _adapters(model, "b")["branches.1"]
    assert a._pools[0] is not b._pools[0]
    gen = torch.Generator().manual_seed(3)
    xs, wide_x = [torch.randn(2, 16, generator=gen) for _ in range(4)], torch.randn(2, 32, generator=gen)
    with torch.no_grad():
        for adapter in [*_adapters(model, "a").values(), *_adapters(model, "b").values()]:
            for param in adapter.parameters():
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)
    path = mm.save_adapters(model, tmp_path / "mos.safetensors")
    fresh = _model()
    mm.load_adapters(fresh, path)
    for ours, theirs in zip(model(xs, wide_x), fresh(xs, wide_x), strict=True):
        assert torch.equal(ours, theirs)


def test_lengths_that_l_does_not_divide_use_ceil_shards_cut_back():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 5), nn.Linear(5, 7))
    config = MoSConfig(targets=["0", "1"], r=2, shards_per_vector=2, pool_shards=6, private_shards=1)
    mm.attach(model, config)
    adapter = model[0].adapters["default"]
    lora_a, lora_b = adapter.factors()
    assert lora_a.shape == (2, 7) and lora_b.shape == (5, 2)
    assert adapter._pools[0].shards.shape[1] == 4 and adapter._pools[1].shards.shape[1] == 3  # ceil(7/2), ceil(5/2)
    # Layer 1's A rows and layer 0's B columns both cut into 3-long shards, yet A and B pools stay apart.
    assert model[1].adapters["default"]._pools[0] is not adapter._pools[1]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == mos_trainable_params(
        config, [(7, 5), (5, 7)])
