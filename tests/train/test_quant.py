"""QLoRA on the CPU: adapters on bitsandbytes 4-bit / 8-bit layers train, merge dequantises explicitly."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from toys import tiny_llama

import mm
from mm.quant import dequantised_weight, is_quantised_linear
from train.engine.config import QuantConfig
from train.engine.quant import quantize_linears

ROOT = Path(__file__).resolve().parents[2]
TARGETS = ["q_proj", "v_proj", "down_proj"]
MODES = ["nf4", "fp4", "int8"]


def _quantised_llama(mode: str) -> torch.nn.Module:
    model = tiny_llama()
    quantize_linears(model, QuantConfig(mode=mode))
    return model


@pytest.mark.parametrize("mode", MODES)
def test_quantised_layers_keep_shape_and_approximate_the_weight(mode):
    reference, model = tiny_llama(), _quantised_llama(mode)
    layer, original = model.model.layers[0].mlp.down_proj, reference.model.layers[0].mlp.down_proj
    assert is_quantised_linear(layer) and not is_quantised_linear(model.lm_head)  # lm_head is skipped
    assert (layer.in_features, layer.out_features) == (original.in_features, original.out_features)
    dense = dequantised_weight(layer)
    assert dense.shape == original.weight.shape and dense.dtype == torch.float32
    # 4-bit keeps ~1/8 of the weight's scale as error, int8 far less: the packed bits are really the weight.
    bound = 0.02 if mode == "int8" else 0.25
    relative = (dense - original.weight).norm() / original.weight.norm()
    assert relative < bound, relative
    # The logits carry the same relative error (measured: nf4 0.10, fp4 0.13, int8 0.003 on this model);
    # the bound leaves 2x room, and an all-zero or unrelated output (relative error >= 1) fails it.
    x = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        quantised_logits, full_logits = model(x).logits, reference(x).logits
    logits_error = (quantised_logits - full_logits).norm() / full_logits.norm()
    assert logits_error < bound, logits_error


@pytest.mark.parametrize("mode", MODES)
def test_qlora_forward_backward_trains_only_the_adapters(mode):
    model = _quantised_llama(mode)
    mm.attach(model, mm.LoRAConfig(targets=TARGETS, r=4, alpha=8.0))
    adapted = dict(mm.adapted_layers(model))
    assert len(adapted) == 6 and all(is_quantised_linear(layer.base) for layer in adapted.values())
    lora = adapted["model.layers.0.mlp.down_proj"].adapters["default"]
    assert lora.lora_A.shape == (4, 64) and lora.lora_B.shape == (32, 4) and lora.lora_A.dtype == torch.float32
    x = torch.randint(0, 64, (2, 7))
    before = model(x).logits.detach()
    model(input_ids=x, labels=x).loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.grad is not None for p in trainable.values())
    assert any(p.grad.abs().sum() > 0 for n, p in trainable.items() if "lora_B" in n)
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    optimizer.step()
    assert not torch.allclose(model(x).logits, before), "a step on the adapters must change the output"


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_merge_into_quantised_base_dequantises_and_says_so(mode):
    model = _quantised_llama(mode)
    mm.attach(model, mm.LoRAConfig(targets=TARGETS, r=4, alpha=8.0))
    with torch.no_grad():
        for _, layer in mm.adapted_layers(model):
            layer.adapters["default"].lora_B.normal_(std=0.1)
    x = torch.randint(0, 64, (2, 7))
    unmerged = model(x).logits
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mm.merge(model, unload=True)
    assert any("dequantised" in str(w.message) and "no longer quantised" in str(w.message) for w in caught)
    layer = model.model.layers[0].mlp.down_proj
    assert type(layer) is torch.nn.Linear and layer.weight.dtype == torch.float32
    assert torch.allclose(model(x).logits, unmerged, atol=1e-4)


def test_adamw8bit_steps_and_its_state_reloads_weights_only(tmp_path):
    from train.engine.config import OptimConfig
    from train.engine.loop import build_optimizer

    param = torch.nn.Parameter(torch.randn(64, 64))
    optimizer = build_optimizer([param], OptimConfig(name="adamw8bit", lr=1e-2))
    assert type(optimizer).__name__ == "AdamW8bit"
    for _ in range(2):
        param.grad = torch.randn_like(param)
        optimizer.step()
    torch.save(optimizer.state_dict(), tmp_path / "opt.pt")
    restored = build_optimizer([torch.nn.Parameter(param.detach().clone())], OptimConfig(name="adamw8bit", lr=1e-2))
    restored.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    assert restored.state_dict()["state"][0]["step"] == 2


def _saved_llama(folder, hidden: int = 64):
    """A tiny Llama saved as a local folder. Width 64: bitsandbytes' eval-mode CPU kernel repacks 4-bit
    weights in blocks of 64 inputs and fails on narrower layers (a bitsandbytes limit, not ours)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_causal_lm_task_loads_a_local_model_in_4bit(tmp_path):
    from train.engine.config import load_recipe
    from train.tasks.lm import CausalLM

    folder = _saved_llama(tmp_path / "tiny-llama")
    recipe = load_recipe(ROOT / "configs/tiny/llama_qlora.yaml", [f"model.path={folder}", "data.train_size=8"])
    task = CausalLM(recipe)
    q_proj = task.lm.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, mm.AdaptedLinear) and is_quantised_linear(q_proj.base)
    assert not is_quantised_linear(task.lm.lm_head)
    batch = task.collate([task.train_dataset()[i] for i in range(4)])
    loss, _ = task.training_step(batch)
    loss.backward()
    assert torch.isfinite(loss) and q_proj.adapters["default"].lora_B.grad is not None
    # An eval forward without grad lets bitsandbytes repack the bits for its CPU kernel; reading the
    # weight (for a merge) must still give the same matrix, and must not disturb the layer.
    before = dequantised_weight(q_proj.base)
    task.eval()
    with torch.no_grad():
        logits = task.lm(input_ids=batch["input_ids"]).logits
        assert torch.allclose(dequantised_weight(q_proj.base), before, atol=1e-3)
        assert torch.equal(task.lm(input_ids=batch["input_ids"]).logits, logits)
