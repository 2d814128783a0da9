"""Trans-LoRA's pieces (mm/compose/trans_lora.py): sampling from the source, the real-vs-synthetic discriminator,
the distillation of the target's adapter, the whole transfer's filter on tiny Llama / GPT-2 models, and a source
LoRA moved into a target adapter of another method (DoRA, PiSSA)."""

from __future__ import annotations

import pytest
import torch
from toys import tiny_gpt2, tiny_llama

import mm
from mm.adapters.dora import DoRA
from mm.adapters.pissa import PiSSAConfig, ResidualLoRA
from mm.compose.trans_lora import (
    Discriminator,
    TransferError,
    distill,
    sample_sequences,
    sequence_features,
    transfer_lora,
)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_greedy_sampling_follows_the_model_and_keeps_the_prompt():
    lm = tiny_llama()
    prompts = torch.tensor([[3, 4], [10, 11]])
    out = sample_sequences(lm, prompts, 6, temperature=0.0)
    assert out.shape == (2, 6) and torch.equal(out[:, :2], prompts)
    with torch.no_grad():
        for step in range(2, 6):
            assert torch.equal(lm(input_ids=out[:, :step]).logits[:, -1].argmax(-1), out[:, step])
    drawn = [sample_sequences(lm, prompts, 6, 1.0, torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    assert torch.equal(drawn[0], drawn[1]) and not torch.equal(drawn[0], drawn[2])
    with pytest.raises(TransferError, match=r"prompts of shape \(2,\): expected \(N, P\)"):
        sample_sequences(lm, torch.tensor([1, 2]), 6)
    with pytest.raises(TransferError, match="temperature -1"):
        sample_sequences(lm, prompts, 6, temperature=-1)


def test_discriminator_separates_real_from_synthetic_features():
    gen = torch.Generator().manual_seed(0)
    real = torch.randn(16, 8, generator=gen) + torch.tensor([2.0] + [0.0] * 7)
    fake = torch.randn(200, 8, generator=gen) - torch.tensor([2.0] + [0.0] * 7)
    disc = Discriminator.fit(real, fake)
    with torch.no_grad():
        assert disc(real).mean() > 0.8 and disc(fake).mean() < 0.2
    with pytest.raises(TransferError, match="0 real and 200 synthetic"):
        Discriminator.fit(real[:0], fake)
    with pytest.raises(TransferError, match=r"real features \(8,\) vs synthetic \(4,\)"):
        Discriminator.fit(real, fake[:, :4])


def test_distill_trains_only_the_target_adapter_on_the_sequences():
    lm = tiny_gpt2()
    with torch.no_grad():  # a random init's tied head (std 0.02) after LayerNorm caps every logit near 0
        lm.transformer.wte.weight.mul_(50.0)
    mm.attach(lm, mm.LoRAConfig(targets=["c_attn", "c_proj", "c_fc"], r=8, alpha=16.0), "moved")
    base = {k: v.clone() for k, v in lm.state_dict().items() if "lora_" not in k}
    data = (torch.arange(8).unsqueeze(0) * 3 + torch.arange(6).unsqueeze(1) * 7) % 64
    losses = distill(lm, data, steps=60, lr=3e-2, batch_size=6)
    assert losses[-1] < 0.5 * losses[0]
    assert all(torch.equal(v, lm.state_dict()[k]) for k, v in base.items())
    with pytest.raises(TransferError, match="no sequences to learn"):
        distill(lm, data[:0], steps=1)
    with pytest.raises(TransferError, match="no trainable parameters"):
        distill(tiny_gpt2().requires_grad_(False), data, steps=1)


def test_transfer_keeps_what_the_discriminator_passes():
    source, target = tiny_llama(), tiny_gpt2()
    mm.attach(target, mm.LoRAConfig(targets=["c_attn"], r=2, alpha=2.0), "moved")
    seeds = (torch.arange(10).unsqueeze(0) * -2 + torch.arange(6).unsqueeze(1) * 5) % 64
    # An untrained source writes noise, which a discriminator that saw the seeds scores as fake.
    out = transfer_lora(source, target, seeds, synthetic=24, threshold=0.1, steps=2, seed=3)
    assert float(out["scores"].mean()) < 0.5
    assert out["generated"] == 24 and out["kept"] == int((out["scores"] >= 0.1).sum()) == len(out["sequences"])
    assert 0 < out["kept"] < 24
    assert out["sequences"].shape[1] == 10
    features = sequence_features(source, out["sequences"])
    assert features.shape == (out["kept"], 32)
    everything = transfer_lora(source, target, seeds, synthetic=24, threshold=None, steps=2, seed=3)
    assert everything["kept"] == 24 and everything["scores"] is None and len(everything["losses"]) == 2
    prompts = torch.arange(24).reshape(12, 2) % 64
    given = transfer_lora(source, target, seeds, synthetic=12, threshold=None, steps=1, prompts=prompts)
    assert torch.equal(given["sequences"][:, :2], prompts)
    with pytest.raises(TransferError, match="reject every synthetic sample"):
        transfer_lora(source, target, seeds, synthetic=8, threshold=1.01, steps=1)
    with pytest.raises(TransferError, match=r"seed examples of shape \(1, 10\)"):
        transfer_lora(source, target, seeds[:1])
    with pytest.raises(TransferError, match="prompt_len=10"):
        transfer_lora(source, target, seeds, prompt_len=10)


def _count_down(size: int, seed: int) -> torch.Tensor:
    """(size, 8) sequences counting down by 1 mod 64 from random starts: the next token follows from the last."""
    starts = torch.randint(0, 64, (size, 1), generator=torch.Generator().manual_seed(seed))
    return (starts - torch.arange(8)) % 64


@torch.no_grad()
def _next_token_accuracy(lm, data: torch.Tensor) -> float:
    return float((lm(input_ids=data).logits[:, :-1].argmax(-1) == data[:, 1:]).float().mean())


@pytest.fixture(scope="module")
def source_with_task_lora():
    """A tiny Llama whose LoRA (frozen base) learned to count down; built once, the transfers only read it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before the autouse one
    source = tiny_llama()
    torch.manual_seed(0)
    mm.attach(source, mm.LoRAConfig(targets=["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                                    r=8, alpha=16.0), "task")
    distill(source, _count_down(256, 0), steps=60, lr=1e-2)
    torch.set_num_threads(before)
    return source.requires_grad_(False)


@pytest.mark.parametrize("method", ["dora", "pissa"])
def test_lora_moves_into_a_target_adapter_of_another_method(source_with_task_lora, method):
    held_out = _count_down(64, 1)
    assert _next_token_accuracy(source_with_task_lora, held_out) > 0.9
    target = tiny_gpt2()
    with torch.no_grad():  # as above: without it the random tied head's logits are all near 0
        target.transformer.wte.weight.mul_(10.0)
    alone = _next_token_accuracy(target, held_out)  # before attaching: PiSSA rewrites the base to its residual
    layers = ["c_attn", "c_proj", "c_fc"]
    config = mm.DoRAConfig(targets=layers, r=8, alpha=16.0) if method == "dora" else PiSSAConfig(targets=layers, r=8,
                                                                                                 alpha=16.0)
    mm.attach(target, config, "moved")
    modules = [layer.adapters["moved"] for _, layer in mm.adapted_layers(target)]
    assert mm.adapter_config(target, "moved").method == method and len(modules) == 8  # 2 blocks x (c_attn, 2 c_proj, c_fc)
    assert all(type(m) is (DoRA if method == "dora" else ResidualLoRA) for m in modules)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    trainable = {k for k, p in target.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.moved." in k for k in trainable)
    # Greedy continuations of uniformly drawn first tokens: the source's LoRA writes the task's sequences; no
    # discriminator filter (its behaviour is tested above), the point here is the target's method.
    prompts = torch.randint(0, 64, (64, 1), generator=torch.Generator().manual_seed(5))
    out = transfer_lora(source_with_task_lora, target, _count_down(8, 2), synthetic=64, prompts=prompts,
                        temperature=0.0, threshold=None, steps=80, lr=1e-2, seed=0)
    assert out["losses"][-1] < 0.5 * out["losses"][0]
    after = target.state_dict()
    changed = {k for k, v in before.items() if not torch.equal(v, after[k])}
    assert changed == trainable  # every parameter of the new adapter moved, nothing else did (base, PiSSA's buffers)
    if method == "dora":
        assert any(k.endswith("lora_magnitude_vector") for k in changed)
    moved = _next_token_accuracy(target, held_out)
    assert moved > alone + 0.3, (method, alone, moved)
