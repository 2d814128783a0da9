"""LoRA-GA: the first step aligns with full fine-tuning (its defining property), the init from the
gradient's SVD, the base-weight correction, the missing-data error, and comparison with PEFT's LoRA-GA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from contract_cases import perturb
from toys import TOYS, TinyMLP

import mm
from mm.adapters import lora_ga
from mm.adapters.lora_ga import LoRAGAConfig

TARGETS = ["fc1", "fc2"]


def tiny_mlp() -> TinyMLP:
    torch.manual_seed(0)
    return TinyMLP(d_in=12, hidden=24, d_out=5)


def batches(n: int = 4, size: int = 16, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 12, generator=gen), torch.randint(0, 5, (size,), generator=gen)) for _ in range(n)]


def loss_fn(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def full_gradients(data) -> dict[str, torch.Tensor]:
    model = tiny_mlp()
    for batch in data:
        loss_fn(model, batch).backward()
    return {name: model.get_submodule(name).weight.grad / len(data) for name in TARGETS}


def first_step_change(model, data, lr: float = 1e-4) -> dict[str, torch.Tensor]:
    """The change of each layer's adapter weight (s B A, minus the frozen offset) after one SGD step."""
    layers = dict(mm.adapted_layers(model))
    before = {n: layers[n].adapters["default"].delta_weight(layers[n].base).detach().clone() for n in TARGETS}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    (sum(loss_fn(model, b) for b in data) / len(data)).backward()
    optimizer.step()
    return {n: layers[n].adapters["default"].delta_weight(layers[n].base).detach() - before[n] for n in TARGETS}


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


@pytest.mark.parametrize("r", [2, 4])
def test_first_step_aligns_with_full_finetuning_much_better_than_lora(r):
    data = batches()
    grads = full_gradients(data)
    plain = tiny_mlp()
    mm.attach(plain, mm.LoRAConfig(targets=TARGETS, r=r, alpha=2.0 * r))
    ga = tiny_mlp()
    mm.attach(ga, LoRAGAConfig(targets=TARGETS, r=r, alpha=2.0 * r))
    lora_ga.initialize(ga, data, loss_fn)
    plain_step, ga_step = first_step_change(plain, data), first_step_change(ga, data)
    for name in TARGETS:
        u, s, vh = torch.linalg.svd(grads[name], full_matrices=False)
        best_2r = u[:, : 2 * r] @ torch.diag(s[: 2 * r]) @ vh[: 2 * r]  # the paper's target: rank-2r approx of G
        cos_ga, cos_lora = cosine(-ga_step[name], grads[name]), cosine(-plain_step[name], grads[name])
        cos_best = cosine(best_2r, grads[name])
        report = f"{name} r={r}: cos(step, -G) LoRA-GA {cos_ga:.3f}, LoRA {cos_lora:.3f}, best rank-2r {cos_best:.3f}"
        assert cos_ga > 0.9 and cos_ga > cos_lora + 0.3, report
        assert abs(cos_ga - cos_best) < 0.02, report
        assert cosine(-ga_step[name], best_2r) > 0.999, report


def test_init_factors_come_from_the_gradient_svd_with_stable_scale():
    data = batches()
    model = tiny_mlp()
    config = LoRAGAConfig(targets=TARGETS, r=2, alpha=4.0, stable_gamma=9.0)
    mm.attach(model, config)
    grads = lora_ga.initialize(model, data, loss_fn)
    expected = full_gradients(data)
    for name, layer in mm.adapted_layers(model):
        torch.testing.assert_close(grads[name], expected[name], rtol=1e-5, atol=1e-7)
        u, _, vh = torch.linalg.svd(expected[name], full_matrices=False)
        adapter, c = layer.adapters["default"], 24**0.25 / 9.0**0.5  # d_out^(1/4) / sqrt(gamma)
        # ArB2r: A = c V[:, :r]^T, B = c U[:, r:2r] (each singular vector up to its sign)
        torch.testing.assert_close(adapter.lora_A.abs(), c * vh[:2].abs(), rtol=0, atol=1e-5)
        torch.testing.assert_close(adapter.lora_B.abs(), c * u[:, 2:4].abs(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("residual", ["base", "adapter"])
@pytest.mark.parametrize("toy_name", ["mlp", "vit", "llama", "gpt2"])
def test_output_equals_base_at_init_and_base_is_corrected(toy_name, residual):
    toy = TOYS[toy_name]
    model, x = toy.build(), toy.make_input()
    mm.attach(model, LoRAGAConfig(targets=toy.targets, r=2, alpha=4.0, residual=residual))
    lora_ga.initialize(model, [x], lambda m, b: toy.run(m, b).float().pow(2).mean())
    torch.testing.assert_close(toy.run(model, x), toy.run(toy.build(), x), rtol=1e-5, atol=1e-5)
    base = toy.build()
    mm.attach(base, mm.LoRAConfig(targets=toy.targets))
    originals = {n: mm.layer.weight_out_in(layer.base) for n, layer in mm.adapted_layers(base)}
    for name, layer in mm.adapted_layers(model):
        adapter = layer.adapters["default"]
        offset = adapter.scaling * adapter.init_B @ adapter.init_A
        assert offset.abs().max() > 1e-3, f"{name}: LoRA-GA init product is zero"
        expected = originals[name] - offset if residual == "base" else originals[name]
        torch.testing.assert_close(mm.layer.weight_out_in(layer.base), expected, rtol=0, atol=1e-6)


def test_running_before_initialisation_says_what_is_needed():
    model = tiny_mlp()
    mm.attach(model, LoRAGAConfig(targets=TARGETS, r=2))
    with pytest.raises(RuntimeError, match=r"lora_ga adapter is not initialised: it needs calibration data: "
                       r"call mm\.adapters\.lora_ga\.initialize\(model, batches, loss_fn"):
        model(torch.randn(2, 12))
    with pytest.raises(ValueError, match="no calibration batches"):
        lora_ga.initialize(model, [], loss_fn)


@pytest.mark.parametrize("residual", ["base", "adapter"])
def test_trained_adapter_loads_on_a_fresh_base_without_data(residual, tmp_path):
    """B0, A0 are saved, so the residual is rebuilt on a fresh base (for "base": on its first use)."""
    toy = TOYS["gpt2"]
    model, x = toy.build(), toy.make_input()
    mm.attach(model, LoRAGAConfig(targets=toy.targets, r=2, alpha=4.0, residual=residual))
    lora_ga.initialize(model, [x], lambda m, b: toy.run(m, b).float().pow(2).mean())
    perturb(model, scale=0.2)
    expected = toy.run(model, x)
    fresh = mm.load_adapters(toy.build(), mm.save_adapters(model, tmp_path / "ga.safetensors"))
    # "base": the first forward applies the residual and corrects its own base output (float rounding) ...
    torch.testing.assert_close(toy.run(fresh, x), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(toy.run(fresh, x), expected)  # ... from then on it is the same computation
    mm.delete_adapter(fresh, "default")
    torch.testing.assert_close(toy.run(fresh, x), toy.run(toy.build(), x), rtol=0, atol=1e-5)


def test_config_errors_name_the_key():
    with pytest.raises(mm.ConfigError, match="key 'direction'"):
        LoRAGAConfig(targets=["fc1"], direction="sideways")
    with pytest.raises(mm.ConfigError, match="key 'stable_gamma'"):
        LoRAGAConfig(targets=["fc1"], stable_gamma=0.0)
    with pytest.raises(mm.ConfigError, match=r"2r <= min\(in, out\), but fc1 is 24x12"):
        mm.attach(tiny_mlp(), LoRAGAConfig(targets=["fc1"], r=7))


# --- comparison with HF PEFT --------------------------------------------------------------------------

peft = pytest.importorskip("peft")


def test_compared_with_peft_lora_ga():
    """Same gradient, same singular directions, both leave the output at the base's. What differs is the
    "stable" scale: PEFT 0.21.2 keeps A0 orthonormal and sets B0 = U[:, r:2r] diag(S[r:2r]) c, scaling
    B0 only and weighting it by the gradient's singular values, where the paper (Theorem 3.4) and the
    authors' code scale both factors by c = d_out^(1/4) / sqrt(gamma) and use no S. So we check
    A0_peft == A0_ours / c and B0_peft == B0_ours diag(S[r:2r]) up to the sign of each singular vector.
    (PEFT takes a randomized SVD with q = 4r; the gradients here have rank <= 6 <= q, so it is exact.)"""
    from peft.tuners.lora.loraga import preprocess_loraga

    data, r = batches(n=2, size=3), 2
    peft_base = tiny_mlp()
    config = peft.LoraConfig(r=r, lora_alpha=2.0 * r, target_modules=TARGETS, init_lora_weights="lora_ga",
                             lora_ga_config=peft.LoraGAConfig())

    def train_step():
        for batch in data:
            loss_fn(peft_base, batch).backward()

    preprocess_loraga(peft_base, config, train_step)
    theirs = peft.get_peft_model(peft_base, config)
    ours = tiny_mlp()
    mm.attach(ours, LoRAGAConfig(targets=TARGETS, r=r, alpha=2.0 * r))
    grads = lora_ga.initialize(ours, data, loss_fn)
    x = data[0][0]
    torch.testing.assert_close(theirs(x), tiny_mlp()(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours(x), tiny_mlp()(x), rtol=1e-5, atol=1e-5)
    c = 24**0.25 / 16**0.5
    for name in TARGETS:
        adapter = ours.get_submodule(name).adapters["default"]
        peft_layer = theirs.base_model.model.get_submodule(name)
        peft_a, peft_b = peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight
        s = torch.linalg.svdvals(grads[name])[r : 2 * r]
        sign_a = torch.sign((peft_a * adapter.init_A).sum(dim=1))
        sign_b = torch.sign((peft_b * adapter.init_B).sum(dim=0))
        torch.testing.assert_close(peft_a, sign_a[:, None] * adapter.init_A / c, rtol=0, atol=1e-4)
        torch.testing.assert_close(peft_b, adapter.init_B * (s * sign_b)[None, :], rtol=0, atol=1e-4)
