"""Mixtures of LoRA experts (MoLE, MixLoRA, MoLA): routing, balance loss, expert counts, composition."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from contract_cases import perturb
from toys import TinyMLP, TinyViT, tiny_llama

import mm
from mm.adapters.mixlora import MixLoRAConfig
from mm.adapters.moe import aux_loss, load_balance_loss, router_logs, router_stats
from mm.adapters.mole import MoLEConfig

LLAMA_MLP = ["gate_proj", "up_proj", "down_proj"]


def _scaling(adapter) -> float:
    """alpha / r (alpha / sqrt(r) with rsLoRA) from the adapter's config: the reference does not read the
    ``scaling`` the code under test computed, so a wrong scaling there shows up here."""
    config = adapter.config
    return config.alpha / (math.sqrt(config.r) if config.rslora else config.r)


def _expert_proj(layer, vector, chosen, gates):
    """One token through one adapted projection, expert by expert: W v + b + sum_j g_j s B_j A_j v."""
    adapter = layer.adapters["default"]
    out = F.linear(vector, layer.base.weight, layer.base.bias)
    for expert, gate in zip(chosen, gates, strict=True):
        out = out + gate * _scaling(adapter) * (adapter.lora_B[expert] @ (adapter.lora_A[expert] @ vector))
    return out


def _route_one(router_weight, vector, top_k, renormalize):
    probs = torch.softmax(router_weight @ vector, dim=-1)
    chosen = sorted(range(probs.numel()), key=lambda e: -float(probs[e]))[:top_k]
    gates = probs[chosen]
    return chosen, gates / gates.sum() if renormalize else gates


def test_block_shares_one_router_and_one_routing():
    model = tiny_llama()
    mm.attach(model, MixLoRAConfig(targets=LLAMA_MLP, r=4, num_experts=4, top_k=2))
    for block in (model.model.layers[0].mlp, model.model.layers[1].mlp):
        adapters = [getattr(block, p).adapters["default"] for p in LLAMA_MLP]
        assert [a.owns_router for a in adapters] == [True, False, False]
        assert all(a.block_router is adapters[0].router for a in adapters)
        assert [a.routes_input for a in adapters] == [True, True, False]  # down_proj reuses the routing
        assert [a.expands_output for a in adapters] == [True, True, False]  # top-2: whole-FFN experts
        assert [a.folds_input for a in adapters] == [False, False, True]
    routers = [n for n, _ in model.named_parameters() if "router" in n]
    assert len(routers) == 2, routers  # one per block, saved once


def test_router_scope_layer_gives_each_projection_its_router():
    model = tiny_llama()
    mm.attach(model, MixLoRAConfig(targets=LLAMA_MLP, r=4, num_experts=4, top_k=2, router_scope="layer"))
    perturb(model, scale=0.3)
    mlp = model.model.layers[0].mlp
    assert all(getattr(mlp, p).adapters["default"].owns_router for p in LLAMA_MLP)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():  # each projection routes its own input: check down_proj against a direct computation
        hidden = F.silu(mlp.gate_proj(x)) * mlp.up_proj(x)
        down = mlp.down_proj.adapters["default"]
        rows = [
            _expert_proj(mlp.down_proj, v, *_route_one(down.router.weight, v, 2, True)) for v in hidden.reshape(-1, 64)
        ]
        torch.testing.assert_close(mlp.down_proj(hidden), torch.stack(rows).view(2, 5, 32), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale_by_gate", [True, False])
def test_mole_on_open_clip_mlp_is_the_chosen_experts_ffn(scale_by_gate):
    """Top-1: every token's MLP output is its expert's FFN (c_fc, GELU, c_proj with that expert's LoRAs)."""
    torch.manual_seed(0)
    vit = TinyViT().eval()
    mm.attach(vit, MoLEConfig(targets=["c_fc", "c_proj"], r=4, alpha=4.0, num_experts=3,
                              scale_by_gate=scale_by_gate))
    perturb(vit, scale=0.3)
    mlp = vit.blocks[0].mlp
    x = torch.randn(2, 16, 16)
    router = mlp.c_fc.adapters["default"].router.weight
    rows = []
    with torch.no_grad():
        for vector in x.reshape(-1, 16):
            chosen, gates = _route_one(router, vector, 1, renormalize=not scale_by_gate)
            assert math.isclose(float(gates[0]), 1.0) != scale_by_gate
            hidden = F.gelu(_expert_proj(mlp.c_fc, vector, chosen, gates))
            rows.append(_expert_proj(mlp.c_proj, hidden, chosen, gates))
        torch.testing.assert_close(mlp(x), torch.stack(rows).view(2, 16, 16), rtol=1e-5, atol=1e-5)


def test_masked_and_grouped_dispatch_agree_in_value_and_gradient():
    results = []
    for dispatch in ("masked", "grouped"):
        model = tiny_llama()
        mm.attach(model, MixLoRAConfig(targets=LLAMA_MLP, r=4, num_experts=6, top_k=3, dispatch=dispatch))
        perturb(model, scale=0.3)
        x = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
        logits = model(x).logits
        (logits.pow(2).mean() + aux_loss(model)).backward()
        results.append((logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (out_a, grads_a), (out_b, grads_b) = results
    torch.testing.assert_close(out_a, out_b, rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6, msg=name)


def test_load_balance_loss_is_the_papers_formula_on_a_hand_made_case():
    # 4 tokens, 2 experts, top-1. f = (3/4, 1/4), P = (0.65, 0.35): 2 * (0.75*0.65 + 0.25*0.35) = 1.15.
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    assert math.isclose(float(load_balance_loss(probs, torch.tensor([[0], [0], [1], [0]]))), 1.15, rel_tol=1e-6)
    # Top-2 of 3 experts, each choice counts (MixLoRA's code): counts (2, 1, 1) over T=2, P = (0.5, 0.3, 0.2).
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.4, 0.3, 0.3]])
    experts = torch.tensor([[0, 1], [0, 2]])
    expected = 3 * (1.0 * 0.5 + 0.5 * 0.3 + 0.5 * 0.2)
    assert math.isclose(float(load_balance_loss(probs, experts)), expected, rel_tol=1e-6)
    # Perfect balance gives k, the minimum.
    assert math.isclose(float(load_balance_loss(torch.full((4, 2), 0.5), torch.tensor([[0], [1], [0], [1]]))), 1.0)


def test_aux_loss_collects_every_layer_and_trains_the_routers():
    # The per-layer mean (our earlier form, an option); the default concatenation: tests/mm/test_moe_balance.py.
    model = tiny_llama()
    mm.attach(model, MixLoRAConfig(targets=LLAMA_MLP, r=4, num_experts=4, top_k=2, aux_loss_coef=0.5,
                                   balance_loss="per_layer"))
    perturb(model, scale=0.3)
    inputs = {}
    for index, layer in enumerate(model.model.layers):  # record each block's MLP input to recompute by hand
        layer.mlp.register_forward_pre_hook(lambda m, args, i=index: inputs.__setitem__(i, args[0].detach()))
    model(torch.randint(0, 64, (2, 6)))
    by_hand = []
    for index, layer in enumerate(model.model.layers):
        probs = F.linear(inputs[index].reshape(-1, 32), layer.mlp.gate_proj.adapters["default"].router.weight)
        probs = probs.softmax(-1)
        by_hand.append(load_balance_loss(probs, probs.topk(2, dim=-1).indices))
    loss = aux_loss(model)
    torch.testing.assert_close(loss, 0.5 * torch.stack(by_hand).mean())
    loss.backward()
    for layer in model.model.layers:
        assert layer.mlp.gate_proj.adapters["default"].router.weight.grad.abs().sum() > 0
    with mm.disable_adapters(model):
        assert float(aux_loss(model)) == 0.0  # disabled mixtures contribute nothing


def test_router_stats_count_tokens_per_expert_and_entropy():
    model = tiny_llama()
    mm.attach(model, MixLoRAConfig(targets=LLAMA_MLP, r=4, num_experts=4, top_k=2), "ffn")
    model(torch.randint(0, 64, (3, 5)))
    stats = router_stats(model)
    assert [s.block for s in stats] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    for s in stats:
        assert s.adapter == "ffn" and len(s.tokens_per_expert) == 4 and sum(s.tokens_per_expert) == 15 * 2
        assert 0.0 <= s.entropy <= math.log(4) + 1e-6
    logs = router_logs(model)
    assert math.isclose(sum(logs[f"moe/ffn/model.layers.0.mlp/expert{e}"] for e in range(4)), 1.0)
    assert "moe/ffn/model.layers.1.mlp/entropy" in logs


def test_one_expert_mole_equals_plain_lora_with_the_same_weights():
    lora_model, mole_model = tiny_llama(), tiny_llama()
    mm.attach(lora_model, mm.LoRAConfig(targets=LLAMA_MLP, r=4, alpha=8.0))
    mm.attach(mole_model, MoLEConfig(targets=LLAMA_MLP, r=4, alpha=8.0, num_experts=1))
    perturb(lora_model, scale=0.3)
    with torch.no_grad():
        for name, layer in mm.adapted_layers(lora_model):
            mole = mole_model.get_submodule(name).adapters["default"]
            mole.lora_A[0].copy_(layer.adapters["default"].lora_A)
            mole.lora_B[0].copy_(layer.adapters["default"].lora_B)
    x = torch.randint(0, 64, (2, 7))
    expected = lora_model(x).logits
    assert (expected - tiny_llama()(x).logits).abs().max() > 1e-3
    torch.testing.assert_close(mole_model(x).logits, expected, rtol=1e-5, atol=1e-6)


def _experts_per_layer(model) -> dict[str, int]:
    return {name: layer.adapters["default"].lora_A.shape[0] for name, layer in mm.adapted_layers(model)}


def test_mola_expert_counts_follow_the_list_and_the_depth_rule():
    model = tiny_llama()
    mm.attach(model, MixLoRAConfig(targets=LLAMA_MLP, r=2, layer_experts=[2, 5], top_k=2))
    counts = _experts_per_layer(model)
    assert counts == {f"model.layers.{i}.mlp.{p}": (2, 5)[i] for i in range(2) for p in LLAMA_MLP}
    model = tiny_llama()  # "more experts in higher layers": groups of equal depth, lowest first
    mm.attach(model, MoLEConfig(targets=LLAMA_MLP, r=2, expert_groups=[2, 4], num_layers=2))
    assert set(_experts_per_layer(model).values()) == {2, 4}
    assert model.model.layers[1].mlp.down_proj.adapters["default"].lora_A.shape[0] == 4
    rule = MixLoRAConfig(targets=["x"], expert_groups=[2, 4, 6, 8], num_layers=32)  # MoLA's 2-4-6-8 (▽)
    assert [rule.experts_at(f"model.layers.{i}.mlp.up_proj") for i in range(32)] == [2] * 8 + [4] * 8 + [6] * 8 + [8] * 8
    uneven = MixLoRAConfig(targets=["x"], expert_groups=[8, 4, 2], num_layers=6)  # fewer in higher layers
    assert [uneven.experts_at(f"h.{i}.mlp.c_fc") for i in range(6)] == [8, 8, 4, 4, 2, 2]


def test_mola_counts_survive_save_and_load(tmp_path):
    model = tiny_llama()
    mm.attach(model, MixLoRAConfig(targets=LLAMA_MLP, r=2, layer_experts=[3, 6], top_k=2))
    perturb(model, scale=0.3)
    x = torch.randint(0, 64, (2, 5))
    expected = model(x).logits
    fresh = tiny_llama()
    mm.load_adapters(fresh, mm.save_adapters(model, tmp_path / "mola.safetensors"))
    assert _experts_per_layer(fresh) == _experts_per_layer(model)
    assert torch.equal(fresh(x).logits, expected)


def test_mola_errors_name_the_module_and_key():
    with pytest.raises(mm.ConfigError, match=r"'fc1' has no layer index"):
        mm.attach(TinyMLP(), MixLoRAConfig(targets=["fc1"], layer_experts=[2, 2]))
    with pytest.raises(mm.ConfigError, match=r"'layer_experts' has 1 entries, module 'model.layers.1.mlp.gate_proj'"):
        mm.attach(tiny_llama(), MixLoRAConfig(targets=LLAMA_MLP, layer_experts=[2]))
    with pytest.raises(mm.ConfigError, match="'expert_groups' and 'num_layers' go together"):
        MixLoRAConfig(targets=["x"], expert_groups=[2, 4])
    with pytest.raises(mm.ConfigError, match="key 'layer_experts' has 1 experts; each layer needs at least top_k=2"):
        MixLoRAConfig(targets=["x"], layer_experts=[4, 1])
    with pytest.raises(mm.ConfigError, match="key 'router_scope'"):
        mm.AdapterConfig.from_dict({"method": "mole", "targets": ["x"], "router_scope": "token"})
    with pytest.raises(mm.ConfigError, match="key 'dispatch'"):
        mm.AdapterConfig.from_dict({"method": "mixlora", "targets": ["x"], "dispatch": "loop"})
    with pytest.raises(mm.ConfigError, match="unknown key.*'top_k'"):  # MoLE is top-1 by definition
        mm.AdapterConfig.from_dict({"method": "mole", "targets": ["x"], "top_k": 2})


def test_merge_is_refused_with_a_clear_message():
    model = tiny_llama()
    mm.attach(model, MoLEConfig(targets=LLAMA_MLP, r=2))
    with pytest.raises(mm.NotMergeableError, match="no weight delta"):
        mm.merge(model)
    adapter = model.model.layers[0].mlp.up_proj.adapters["default"]
    with pytest.raises(mm.NotMergeableError, match="mole routes every token to its own experts"):
        adapter.delta_weight(model.model.layers[0].mlp.up_proj.base)


def test_down_proj_without_its_blocks_routing_is_a_clear_error():
    model = tiny_llama()
    mm.attach(model, MoLEConfig(targets=LLAMA_MLP, r=2, num_experts=2))
    with pytest.raises(RuntimeError, match="reuses the routing of block 'model.layers.0.mlp' for 4 tokens"):
        model.model.layers[0].mlp.down_proj(torch.randn(4, 64))
    model = tiny_llama()  # top-2: the down projection folds expanded rows that were never made
    mm.attach(model, MixLoRAConfig(targets=LLAMA_MLP, r=2, num_experts=2))
    with pytest.raises(RuntimeError, match="block 'model.layers.0.mlp'.*input projections have not run"):
        model.model.layers[0].mlp.down_proj(torch.randn(4, 64))
    model(torch.randint(0, 64, (2, 3)))  # routed 6 tokens; a call with other tokens names the shapes
    with pytest.raises(RuntimeError, match=r"expected the block's expanded hidden states of shape \(2, 3, 2, 64\)"):
        model.model.layers[0].mlp.down_proj(torch.randn(4, 64))


def test_same_config_attached_twice_gets_separate_routers():
    config = MoLEConfig(targets=LLAMA_MLP, r=2, num_experts=3)
    model = tiny_llama()
    mm.attach(model, config, "a")
    mm.attach(model, config, "b")
    up = model.model.layers[0].mlp.up_proj
    assert up.adapters["a"].block_router is not up.adapters["b"].block_router
    assert up.adapters["b"].block_router is model.model.layers[0].mlp.gate_proj.adapters["b"].router


def test_mixlora_beside_plain_attention_lora_trains_and_round_trips(tmp_path):
    """MixLoRA's attention LoRA is a second, independently configured adapter."""
    model = tiny_llama()
    mm.attach(model, mm.LoRAConfig(targets=["q_proj", "k_proj", "v_proj", "o_proj"], r=2, alpha=4.0), "attn")
    mm.attach(model, MixLoRAConfig(targets=LLAMA_MLP, r=2, num_experts=4, top_k=2), "ffn")
    assert mm.active_adapters(model) == ["attn", "ffn"]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(5):
        out = model(batch, labels=batch)
        (out.loss + aux_loss(model)).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(out.loss.detach()))
    assert losses[-1] < losses[0]
    report = mm.trainable_report(model)
    assert report.per_adapter["attn"] > 0 and report.per_adapter["ffn"] > 0
    expected = model(batch).logits
    fresh = tiny_llama()
    mm.load_adapters(fresh, mm.save_adapters(model, tmp_path / "both.safetensors"))
    assert torch.equal(fresh(batch).logits, expected)


def test_deepcopy_after_a_training_forward():
    model = tiny_llama()
    mm.attach(model, MixLoRAConfig(targets=LLAMA_MLP, r=2, num_experts=3))
    perturb(model, scale=0.3)
    x = torch.randint(0, 64, (2, 5))
    model(x).logits.sum()  # routers now hold graph tensors
    clone = copy.deepcopy(model)
    mlp = clone.model.layers[0].mlp
    assert mlp.up_proj.adapters["default"].block_router is mlp.gate_proj.adapters["default"].router
    torch.testing.assert_close(clone(x).logits, model(x).logits)


def test_auto_dispatch_masks_thin_mixtures_and_groups_wide_ones():
    from mm.adapters.moe import grouped_delta, masked_delta

    thin, wide = TinyMLP(), TinyMLP()
    mm.attach(thin, MixLoRAConfig(targets=["fc1"], r=8, num_experts=8))
    mm.attach(wide, MixLoRAConfig(targets=["fc1"], r=8, num_experts=64))
    assert thin.fc1.adapters["default"].dispatch is masked_delta
    assert wide.fc1.adapters["default"].dispatch is grouped_delta


def test_bf16_model_routes_in_fp32_and_trains():
    model = tiny_llama().to(torch.bfloat16)
    mm.attach(model, MixLoRAConfig(targets=LLAMA_MLP, r=2, num_experts=4))
    adapter = model.model.layers[0].mlp.gate_proj.adapters["default"]
    assert adapter.lora_A.dtype == torch.bfloat16 and adapter.router.weight.dtype == torch.float32
    model.to(torch.bfloat16)  # a later cast of the whole model still routes in fp32
    (model(torch.randint(0, 64, (2, 5))).logits.float().pow(2).mean() + aux_loss(model)).backward()
    assert adapter.router.weight.grad is not None and adapter.lora_A.grad is not None


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = tiny_llama()
        mm.attach(model, MixLoRAConfig(targets=LLAMA_MLP, r=2, num_experts=4))
        perturb(model, scale=0.3)
        model.train()
        if checkpointing:  # transformers 5 renamed gradient_checkpointing_enable
            (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
            assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
        batch = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
        (model(batch, labels=batch).loss + aux_loss(model)).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("config", [MoLEConfig(targets=["fc1", "fc2"], r=2, num_experts=4),
                                    MixLoRAConfig(targets=["fc1", "fc2"], r=2, num_experts=4, top_k=2)],
                         ids=["top1-reuses-routing", "top2-whole-ffn"])
def test_a_reused_input_tensor_is_routed_again_after_the_router_changes(config):
    model = TinyMLP()
    mm.attach(model, config)
    perturb(model, scale=0.3)
    x = torch.randn(6, 12, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        first = model(x)
        router = model.fc1.adapters["default"].router
        router.weight.copy_(torch.randn(router.weight.shape, generator=torch.Generator().manual_seed(5)) * 3)
        assert (model(x) - first).abs().max() > 1e-4
        torch.testing.assert_close(model(x), model(x.clone()))


def test_padding_tokens_stay_out_of_the_balance_loss_and_counts():
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    experts = torch.tensor([[0], [0], [1], [0]])
    valid = torch.tensor([True, False, True, False])  # f = (1/2, 1/2), P = (0.6, 0.4): 2 * 0.5 = 1.0
    assert math.isclose(float(load_balance_loss(probs, experts, valid)), 1.0, rel_tol=1e-6)
    assert float(load_balance_loss(probs, experts, torch.zeros(4, dtype=torch.bool))) == 0.0
    model = tiny_llama()
    mm.attach(model, MixLoRAConfig(targets=LLAMA_MLP, r=2, num_experts=4, top_k=2))
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    seen = {}
    model.model.layers[0].mlp.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0].detach()))
    with mm.route(token_masks={"attention": mask}):
        model(ids, attention_mask=mask)
    assert all(sum(s.tokens_per_expert) == 10 * 2 for s in router_stats(model))  # 10 real tokens, top-2
    router = model.model.layers[0].mlp.gate_proj.adapters["default"].router
    probs = F.linear(seen["x"].reshape(-1, 32), router.weight).softmax(-1)
    expected = load_balance_loss(probs[mask.reshape(-1).bool()], probs.topk(2, dim=-1).indices[mask.reshape(-1).bool()])
    torch.testing.assert_close(router.balance_loss, expected)
    model(ids, attention_mask=mask)  # no route: every token counts
    assert sum(router_stats(model)[0].tokens_per_expert) == 12 * 2



def test_router_jitter_perturbs_training_routing_only():
    model = TinyMLP()
    mm.attach(model, MixLoRAConfig(targets=["fc1", "fc2"], r=2, num_experts=4, top_k=2, router_jitter=0.5))
    perturb(model, scale=0.3)
    router = model.fc1.adapters["default"].router
    x = torch.randn(64, 12, generator=torch.Generator().manual_seed(0))
    clean = torch.softmax(x @ router.weight.T, -1).topk(2, dim=-1).indices
    model.eval()
    model(x)
    assert torch.equal(router.routing.experts, clean)  # eval: no noise
    model.train()
    torch.manual_seed(0)
    model(x.clone())
    assert not torch.equal(router.routing.experts, clean)  # +-50% noise moves some tokens' choices
    with pytest.raises(mm.ConfigError, match="key 'router_jitter' must be in"):
        MixLoRAConfig(targets=["x"], router_jitter=1.5)
