"""The balance loss and router init of the mixtures against their references: MixLoRA's loss over all
layers' router logits concatenated (MoE-PEFT), MoLA's Kaiming-initialised routers without a balance loss."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from contract_cases import perturb
from toys import tiny_llama

import mm
from mm.adapters.mixlora import MixLoRAConfig
from mm.adapters.moe import ROUTER_INIT_STD, aux_loss, load_balance_loss
from mm.adapters.moe_router import BalanceSums, concat_balance_loss

LLAMA_MLP = ["gate_proj", "up_proj", "down_proj"]


def sums_of(probs: torch.Tensor, experts: torch.Tensor) -> BalanceSums:
    counts = F.one_hot(experts, probs.shape[1]).sum((0, 1)).float()
    return BalanceSums(counts, probs.sum(0), torch.tensor(float(len(probs))))


def test_concat_form_is_the_loss_of_the_concatenated_logits_by_hand():
    # Layer 1: 2 tokens both to expert 0; layer 2: 2 tokens both to expert 1 (top-1, 2 experts).
    layer1 = torch.tensor([[0.9, 0.1], [0.7, 0.3]])
    layer2 = torch.tensor([[0.2, 0.8], [0.4, 0.6]])
    experts1, experts2 = torch.tensor([[0], [0]]), torch.tensor([[1], [1]])
    # Concatenated: f = (2/4, 2/4), P = ((0.9+0.7+0.2+0.4)/4, (0.1+0.3+0.8+0.6)/4) = (0.55, 0.45):
    # 2 * (0.5 * 0.55 + 0.5 * 0.45) = 1.0. Per layer: 2 * 0.8 = 1.6 and 2 * 0.7 = 1.4, mean 1.5.
    concat = concat_balance_loss([sums_of(layer1, experts1), sums_of(layer2, experts2)])
    assert math.isclose(float(concat), 1.0, rel_tol=1e-6)
    whole = load_balance_loss(torch.cat([layer1, layer2]), torch.cat([experts1, experts2]))
    assert math.isclose(float(concat), float(whole), rel_tol=1e-6)
    per_layer = (load_balance_loss(layer1, experts1) + load_balance_loss(layer2, experts2)) / 2
    assert math.isclose(float(per_layer), 1.5, rel_tol=1e-6)


def llama_with_mixlora(**options):
    model = tiny_llama()
    mm.attach(model, MixLoRAConfig(targets=LLAMA_MLP, r=4, num_experts=4, top_k=2, aux_loss_coef=0.5, **options))
    perturb(model, scale=0.3)
    inputs = {}
    for index, layer in enumerate(model.model.layers):  # each block's MLP input, to recompute by hand
        layer.mlp.register_forward_pre_hook(lambda m, args, i=index: inputs.__setitem__(i, args[0].detach()))
    return model, inputs


def test_mixlora_default_aux_loss_concatenates_every_layers_router_logits_with_padding_masked():
    model, inputs = llama_with_mixlora()
    assert model.model.layers[0].mlp.gate_proj.adapters["default"].config.balance_loss == "auto"
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with mm.route(token_masks={"attention": mask}):
        model(ids, attention_mask=mask)
    keep = mask.reshape(-1).bool()
    logits = torch.cat([F.linear(inputs[i].reshape(-1, 32)[keep], layer.mlp.gate_proj.adapters["default"].router.weight)
                        for i, layer in enumerate(model.model.layers)])  # MoE-PEFT: torch.cat(layer logits)
    probs = logits.softmax(-1)
    expected = 0.5 * load_balance_loss(probs, probs.topk(2, dim=-1).indices)
    loss = aux_loss(model)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert all(layer.mlp.gate_proj.adapters["default"].router.weight.grad.abs().sum() > 0
               for layer in model.model.layers)


def test_per_layer_option_differs_from_concat_on_the_same_forward():
    losses = {}
    for form in ("concat", "per_layer"):
        model, _ = llama_with_mixlora(balance_loss=form)
        with torch.no_grad():  # skewed routers, differently per layer: the two forms then disagree
            for i, layer in enumerate(model.model.layers):
                router = layer.mlp.gate_proj.adapters["default"].router
                router.weight.copy_(torch.randn(router.weight.shape, generator=torch.Generator().manual_seed(i)) * 2)
        model(torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(2)))
        losses[form] = float(aux_loss(model).detach())
    assert losses["concat"] != pytest.approx(losses["per_layer"], rel=1e-3)


def test_mola_routers_are_kaiming_initialised_and_add_no_balance_loss_by_default():
    model = tiny_llama()
    mm.attach(model, MixLoRAConfig(targets=LLAMA_MLP, r=2, num_experts=4, top_k=2, router_scope="layer"))
    routers = [layer.adapters["default"].router for _, layer in mm.adapted_layers(model)]
    for router in routers:  # nn.Linear's Kaiming-uniform: U(-1/sqrt(in), 1/sqrt(in)), std bound/sqrt(3)
        bound = 1 / math.sqrt(router.in_features)
        assert router.weight.abs().max() <= bound
        assert float(router.weight.std()) > 0.4 * bound > ROUTER_INIT_STD
    model(torch.randint(0, 64, (2, 6)))
    assert all(router.balance_loss is not None for router in routers)  # still computed for logging
    assert float(aux_loss(model)) == 0.0
    on = tiny_llama()
    mm.attach(on, MixLoRAConfig(targets=LLAMA_MLP, r=2, num_experts=4, top_k=2, router_scope="layer",
                                balance_loss="concat", router_init="normal"))
    assert all(float(layer.adapters["default"].router.weight.std()) < 2 * ROUTER_INIT_STD
               for _, layer in mm.adapted_layers(on))
    on(torch.randint(0, 64, (2, 6)))
    assert float(aux_loss(on)) > 0.0


def test_mixlora_router_init_is_normal_and_readme_states_the_default_coefficient():
    model = tiny_llama()
    mm.attach(model, MixLoRAConfig(targets=LLAMA_MLP, r=2, num_experts=4, top_k=2))
    router = model.model.layers[0].mlp.gate_proj.adapters["default"].router
    assert float(router.weight.std()) == pytest.approx(ROUTER_INIT_STD, rel=0.2)
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    stated = re.search(r"`aux_loss_coef`, default ([0-9.]+)", readme)
    assert stated and float(stated.group(1)) == MixLoRAConfig.aux_loss_coef == 0.001
