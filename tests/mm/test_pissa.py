"""PiSSA: the defining property (residual + s B A == W, with A, B the principal singular directions),
both places the residual can live, the seeded fast SVD, and parity with PEFT's ``init_lora_weights="pissa"``."""

from __future__ import annotations

import pytest
import torch
from contract_cases import perturb
from toys import TOYS

import mm
from mm.adapters.pissa import PiSSAConfig, randomized_svd
from mm.layer import weight_out_in

R, ALPHA = 4, 8.0


def pissa_model(toy_name: str, **options):
    toy = TOYS[toy_name]
    model = toy.build()
    mm.attach(model, PiSSAConfig(targets=toy.targets, r=R, alpha=ALPHA, **options))
    return toy, model


def original_weights(toy) -> dict[str, torch.Tensor]:
    base = toy.build()
    mm.attach(base, mm.LoRAConfig(targets=toy.targets))  # only to get the same layer names (incl. split q/k/v)
    return {name: weight_out_in(layer.base).detach().clone() for name, layer in mm.adapted_layers(base)}


@pytest.mark.parametrize("svd", ["exact", "fast"])
@pytest.mark.parametrize("toy_name", ["mlp", "vit", "gpt2"])
def test_residual_plus_scaled_BA_is_W(toy_name, svd):
    toy, model = pissa_model(toy_name, svd=svd)
    originals = original_weights(toy)
    for name, layer in mm.adapted_layers(model):
        adapter = layer.adapters["default"]
        rebuilt = weight_out_in(layer.base) + adapter.scaling * adapter.lora_B @ adapter.lora_A
        torch.testing.assert_close(rebuilt, originals[name], rtol=0, atol=1e-6, msg=f"{name}: W_res + sBA != W")


@pytest.mark.parametrize("toy_name", ["mlp", "llama"])
def test_A_B_are_the_top_singular_directions(toy_name):
    toy, model = pissa_model(toy_name)
    originals = original_weights(toy)
    for name, layer in mm.adapted_layers(model):
        adapter = layer.adapters["default"]
        u, s, vh = torch.linalg.svd(originals[name], full_matrices=False)
        # s B A is the best rank-r approximation U_r S_r V_r^T ...
        torch.testing.assert_close(adapter.scaling * adapter.lora_B @ adapter.lora_A,
                                   u[:, :R] @ torch.diag(s[:R]) @ vh[:R], rtol=0, atol=1e-5)
        # ... split evenly: A's rows are sqrt(S_r / s) V_r^T and B's columns U_r sqrt(S_r / s), up to sign.
        root = (s[:R] / adapter.scaling).sqrt()
        torch.testing.assert_close(adapter.lora_A.abs(), (root[:, None] * vh[:R]).abs(), rtol=0, atol=1e-5)
        torch.testing.assert_close(adapter.lora_B.abs(), (u[:, :R] * root).abs(), rtol=0, atol=1e-5)
        # The residual holds exactly the tail of the spectrum.
        tail = torch.linalg.svdvals(weight_out_in(layer.base))
        torch.testing.assert_close(tail[: s.numel() - R], s[R:], rtol=0, atol=1e-5)


@pytest.mark.parametrize("residual", ["base", "adapter"])
@pytest.mark.parametrize("toy_name", ["mlp", "vit", "llama", "gpt2"])
def test_output_equals_base_at_init(toy_name, residual):
    toy, model = pissa_model(toy_name, residual=residual)
    x = toy.make_input()
    torch.testing.assert_close(toy.run(model, x), toy.run(toy.build(), x), rtol=1e-5, atol=1e-5)


def test_both_residual_layouts_compute_the_same_after_training():
    toy = TOYS["llama"]
    _, in_base = pissa_model("llama", residual="base")
    _, in_adapter = pissa_model("llama", residual="adapter")
    perturb(in_base, seed=3)
    perturb(in_adapter, seed=3)
    x = toy.make_input()
    torch.testing.assert_close(toy.run(in_base, x), toy.run(in_adapter, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("svd", ["exact", "fast"])
def test_trained_adapter_loads_on_a_fresh_base(svd, tmp_path):
    """Attaching to a fresh base recomputes the same (seeded) SVD, hence the same residual, bit for bit."""
    toy, model = pissa_model("gpt2", svd=svd)
    perturb(model, scale=0.3)
    x = toy.make_input()
    expected = toy.run(model, x)
    path = mm.save_adapters(model, tmp_path / "pissa.safetensors")
    fresh = mm.load_adapters(toy.build(), path)
    assert torch.equal(toy.run(fresh, x), expected)
    assert not torch.equal(expected, toy.run(toy.build(), x))


def test_release_restores_W_and_disable_runs_the_residual_model():
    """With residual="base" the base weight changes: delete gives W back; disable runs W_res (documented)."""
    toy, model = pissa_model("mlp", residual="base")
    x, base = toy.make_input(), toy.build()
    perturb(model)
    layer = model.fc1
    adapter = layer.adapters["default"]
    with mm.disable_adapters(model):
        residual_out = layer(x)
    expected = torch.nn.functional.linear(x, base.fc1.weight - adapter.scaling * adapter.init_B @ adapter.init_A,
                                          base.fc1.bias)
    torch.testing.assert_close(residual_out, expected, rtol=0, atol=1e-5)
    mm.delete_adapter(model, "default")
    for name in ("fc1", "fc2"):
        torch.testing.assert_close(model.get_submodule(name).weight, base.get_submodule(name).weight,
                                   rtol=0, atol=1e-6)


def test_fast_svd_is_seeded_and_close_to_exact():
    gen = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(40, 40, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(30, 30, generator=gen)).Q
    spectrum = torch.logspace(0, -3, 30)
    matrix = u[:, :30] @ torch.diag(spectrum) @ v.T
    first = randomized_svd(matrix, 4, niter=4, seed=7)
    again = randomized_svd(matrix, 4, niter=4, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    torch.testing.assert_close(first[1], spectrum[:4], rtol=1e-3, atol=0)
    other_seed = randomized_svd(matrix, 4, niter=4, seed=8)
    assert not torch.equal(first[0], other_seed[0])


def test_bad_config_names_key_and_layer():
    with pytest.raises(mm.ConfigError, match="key 'svd'"):
        PiSSAConfig(targets=["fc1"], svd="slow")
    with pytest.raises(mm.ConfigError, match="key 'residual'"):
        PiSSAConfig(targets=["fc1"], residual="elsewhere")
    with pytest.raises(mm.ConfigError, match=r"key 'r'=13 exceeds the rank of fc1 \(24x12\)"):
        mm.attach(TOYS["mlp"].build(), PiSSAConfig(targets=["fc1"], r=13))


# --- parity with HF PEFT ------------------------------------------------------------------------------

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("toy_name", ["mlp", "llama", "gpt2"])
def test_parity_with_peft_pissa(toy_name):
    """PEFT's ``init_lora_weights="pissa"`` (exact SVD, residual in the base) gives the same factors up to
    the sign of each singular pair, the same residual base weights, and, with the same trained A, B, the
    same outputs."""
    toy, ours = pissa_model(toy_name)
    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=toy.targets, init_lora_weights="pissa")
    theirs = peft.get_peft_model(toy.build(), config).eval()
    x = toy.make_input()
    torch.testing.assert_close(toy.run(theirs, x), toy.run(ours, x), rtol=1e-5, atol=1e-5)
    for name, layer in mm.adapted_layers(ours):
        adapter, peft_layer = layer.adapters["default"], theirs.base_model.model.get_submodule(name)
        peft_a = peft_layer.lora_A["default"].weight
        peft_b = peft_layer.lora_B["default"].weight
        signs = torch.sign((peft_a * adapter.lora_A).sum(dim=1))  # one sign per singular pair
        torch.testing.assert_close(peft_a, signs[:, None] * adapter.lora_A, rtol=0, atol=1e-5)
        torch.testing.assert_close(peft_b, adapter.lora_B * signs[None, :], rtol=0, atol=1e-5)
        torch.testing.assert_close(weight_out_in(peft_layer.base_layer), weight_out_in(layer.base), rtol=0, atol=1e-6)
        with torch.no_grad():  # stand-in for training: move both to the same A, B
            step = torch.randn(adapter.lora_A.shape, generator=torch.Generator().manual_seed(1)) * 0.1
            adapter.lora_A.add_(step)
            peft_a.copy_(signs[:, None] * adapter.lora_A)
            peft_b.copy_(adapter.lora_B * signs[None, :])
    trained = toy.run(ours, x)
    assert (trained - toy.run(toy.build(), x)).abs().max() > 1e-3
    torch.testing.assert_close(toy.run(theirs, x), trained, rtol=1e-5, atol=1e-5)
