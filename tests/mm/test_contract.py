"""The contract every adapter method keeps, on every toy backbone (MLP, MHA ViT, Llama, GPT-2 Conv1D), and for
the methods that adapt convolutions, on the conv toys (Conv1d, Conv2d, grouped, depthwise, Conv3d), and for those
that adapt embeddings, on the embedding toy (token and position nn.Embedding)."""

from __future__ import annotations

import pytest
import torch
from contract_cases import CASES, Case, perturb
from toys import CONV_TOYS, EMBEDDING_TOYS, TOYS, Toy

import mm


def attached(toy: Toy, case: Case, name: str = "default"):
    model = toy.build()
    x = toy.make_input()
    mm.attach(model, case.config(toy.targets), name)
    if case.prepare is not None:
        case.prepare(model, name, x)
    return model, x


def pytest_generate_tests(metafunc):
    """Every case on every linear toy; the cases whose method adapts convolutions also on every conv toy."""
    if {"toy", "case"} <= set(metafunc.fixturenames):
        pairs = [(t, c) for t in sorted(TOYS) for c in sorted(CASES) if CASES[c].adapts("linear")]
        pairs += [(t, c) for t in sorted(CONV_TOYS) for c in sorted(CASES) if CASES[c].adapts("conv")]
        pairs += [(t, c) for t in sorted(EMBEDDING_TOYS) for c in sorted(CASES) if CASES[c].adapts("embedding")]
        toys = {**TOYS, **CONV_TOYS, **EMBEDDING_TOYS}
        metafunc.parametrize(("toy", "case"), [(toys[t], CASES[c]) for t, c in pairs],
                             ids=[f"{t}-{c}" for t, c in pairs])


@pytest.mark.parametrize("case_name", [c for c in sorted(CASES) if CASES[c].adapts("linear") and not CASES[c].adapts("conv")])
def test_methods_without_conv_support_refuse_convs(case_name):
    case = CASES[case_name]
    model = CONV_TOYS["conv2d"].build()
    with pytest.raises(mm.ConfigError, match=rf"{case.method}: layer 'conv1' is a Conv2d, and method "
                       rf"'{case.method}' adapts linear layers only"):
        mm.attach(model, case.config(["conv1"]))
    assert not list(mm.adapted_layers(model)), "a refused attach changed the model"


def test_every_method_has_a_case():
    covered = {case.method for case in CASES.values()}
    assert set(mm.ADAPTERS.names()) <= covered, f"methods without a contract case: {set(mm.ADAPTERS.names()) - covered}"


def test_output_equals_base_at_init(toy, case):
    if not case.identity_at_init:
        pytest.skip(f"{case.method} does not promise the base output at init")
    base = toy.build()
    x = toy.make_input()
    model, _ = attached(toy, case)
    torch.testing.assert_close(toy.run(model, x), toy.run(base, x), rtol=1e-5, atol=1e-5)


def test_only_adapter_parameters_train(toy, case):
    model, x = attached(toy, case)
    perturb(model)  # B = 0 would leave A without gradient
    toy.run(model, x).float().pow(2).mean().backward()
    adapter_params = {id(p) for _, layer in mm.adapted_layers(model) for p in layer.adapters.parameters()}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable, "nothing trains"
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert id(param) in adapter_params, f"{name} trains but is not an adapter parameter"
            assert param.grad is not None and param.grad.abs().sum() > 0, f"{name} received no gradient"
        else:
            assert param.grad is None, f"frozen {name} received a gradient"


def _reference_through_delta_weight(adapter: mm.Adapter) -> None:
    """Make ``adapter`` add ``x @ delta_weight.T`` with autograd's own ops, bypassing its fused forward."""

    def forward(x, out, base):
        delta = adapter.delta_weight(base)
        if isinstance(base, torch.nn.Embedding):  # an embedding's update: rows of a (num_embeddings, dim) table
            update = torch.nn.functional.embedding(x, delta, base.padding_idx)
        elif delta.dim() > 2:  # a convolution's update: a kernel applied with the layer's own geometry
            from mm.conv import conv_fn

            update = conv_fn(base)(x.to(delta.dtype), delta, None, base.stride, base.padding, base.dilation,
                                   base.groups)
        else:
            update = torch.nn.functional.linear(x.to(delta.dtype), delta)
        return out + update.to(out.dtype)

    adapter.forward = forward


def test_adapter_gradients_match_autograd_through_the_weight_delta(toy, case):
    if not case.mergeable:
        pytest.skip(f"{case.method} has no weight delta to differentiate through; its own tests cover it")
    model, x = attached(toy, case)
    perturb(model)
    reference, _ = attached(toy, case)
    reference.load_state_dict(model.state_dict())
    for _, layer in mm.adapted_layers(reference):
        _reference_through_delta_weight(layer.adapters["default"])
    grads = {}
    for which, net in (("fused", model), ("reference", reference)):
        toy.run(net, x).float().pow(2).mean().backward()
        grads[which] = {n: p.grad for n, p in net.named_parameters() if p.requires_grad}
    assert grads["fused"].keys() == grads["reference"].keys()
    for name, grad in grads["reference"].items():
        assert grad is not None and grad.abs().max() > 0, f"reference gradient of {name} is zero"
        torch.testing.assert_close(grads["fused"][name], grad, rtol=1e-4, atol=1e-4 * float(grad.abs().max()),
                                   msg=lambda m, n=name: f"gradient of {n} differs from autograd: {m}")


def test_merge_equals_unmerged_and_unmerge_restores(toy, case):
    if not case.mergeable:
        model, _ = attached(toy, case)
        with pytest.raises(mm.NotMergeableError):
            mm.merge(model)
        return
    base = toy.build()
    model, x = attached(toy, case)
    perturb(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    unmerged = toy.run(model, x)
    assert (unmerged - toy.run(base, x)).abs().max() > 1e-4, "the adapter does not change the output"
    mm.merge(model)
    merged = toy.run(model, x)
    rel = (merged - unmerged).norm() / unmerged.norm()
    assert rel < 1e-5, f"merged forward differs from unmerged: relative error {rel:.2e}"
    mm.unmerge(model)
    for name, param in model.named_parameters():
        if name in before:
            assert (param - before[name]).abs().max() < 1e-6, f"unmerge did not restore {name}"
    torch.testing.assert_close(toy.run(model, x), unmerged, rtol=1e-5, atol=1e-6)


def test_merge_unload_gives_plain_model(toy, case):
    if not case.mergeable:
        pytest.skip("not mergeable")
    model, x = attached(toy, case)
    perturb(model)
    expected = toy.run(model, x)
    mm.merge(model, unload=True)
    assert not list(mm.adapted_layers(model))
    assert type(model) is type(toy.build())
    torch.testing.assert_close(toy.run(model, x), expected, rtol=1e-5, atol=1e-5)


def test_save_load_round_trip_is_exact(toy, case, tmp_path):
    model, x = attached(toy, case)
    perturb(model)
    expected = toy.run(model, x)
    path = mm.save_adapters(model, tmp_path / "adapters.safetensors")
    fresh = toy.build()
    mm.load_adapters(fresh, path)
    assert mm.adapter_names(fresh) == ["default"]
    assert torch.equal(toy.run(fresh, x), expected)


def test_two_adapters_side_by_side(toy, case):
    model, x = attached(toy, case, "a")
    mm.attach(model, case.config(toy.targets), "b")
    if case.prepare is not None:
        case.prepare(model, "b", x)
    perturb(model, "a", seed=1)
    perturb(model, "b", seed=2)
    only_a, _ = attached(toy, case, "a")
    only_a.load_state_dict(
        {k: v for k, v in model.state_dict().items() if ".adapters.b." not in k}, strict=True
    )
    mm.set_active(model, "a")
    torch.testing.assert_close(toy.run(model, x), toy.run(only_a, x), rtol=0, atol=0)
    mm.set_active(model, ["a", "b"])
    both = toy.run(model, x)
    assert (both - toy.run(only_a, x)).abs().max() > 1e-4, "adapter b has no effect"
    assert mm.active_adapters(model) == ["a", "b"]
    mm.delete_adapter(model, "b")
    assert mm.adapter_names(model) == ["a"]
    torch.testing.assert_close(toy.run(model, x), toy.run(only_a, x), rtol=0, atol=0)


def test_disable_restores_base_output(toy, case):
    base = toy.build()
    model, x = attached(toy, case)
    perturb(model)
    with mm.disable_adapters(model):
        torch.testing.assert_close(toy.run(model, x), toy.run(base, x), rtol=1e-6, atol=1e-6)
    assert (toy.run(model, x) - toy.run(base, x)).abs().max() > 1e-4


def test_delete_last_adapter_restores_original_modules(toy, case):
    base = toy.build()
    model, x = attached(toy, case)
    mm.delete_adapter(model, "default")
    assert [type(m) for m in model.modules()] == [type(m) for m in base.modules()]
    torch.testing.assert_close(toy.run(model, x), toy.run(base, x), rtol=0, atol=1e-6)


def test_bad_targets_name_closest_modules(toy, case):
    model = toy.build()
    wrong = [t[:-1] + "x" for t in toy.targets[:1]]
    with pytest.raises(mm.AttachError, match="closest module names: .*" + toy.targets[0]):
        mm.attach(model, case.config(wrong))


def test_mismatched_load_names_the_keys(toy, case, tmp_path):
    model, _ = attached(toy, case)
    path = mm.save_adapters(model, tmp_path / "a.safetensors")
    other = toy.build()
    mm.attach(other, case.config(toy.targets[:1]), "default")  # fewer layers than the file
    with pytest.raises(mm.AdapterStateError, match=r"not in model: .*" + toy.targets[1]):
        mm.load_adapters(other, path)
