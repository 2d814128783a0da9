"""Hot-swapping a saved adapter's weights into a running adapter in place: same outputs as loading it, the
same parameter objects, and no recompilation of a torch.compile'd model."""

from __future__ import annotations

import pytest
import torch
from contract_cases import perturb
from toys import TOYS

import mm
from mm.adapters.dora import DoRAConfig
from mm.hotswap import hotswap_adapter


def _saved(tmp_path, config, seed: int, file_name: str):
    toy = TOYS["mlp"]
    model = toy.build()
    mm.attach(model, config)
    perturb(model, seed=seed, scale=0.3)
    return mm.save_adapters(model, tmp_path / file_name), mm.load_adapters(toy.build(), tmp_path / file_name)


@pytest.mark.parametrize("config_cls", [mm.LoRAConfig, DoRAConfig], ids=["lora", "dora"])
def test_swap_gives_the_loaded_adapters_outputs_on_the_same_tensors(config_cls, tmp_path):
    toy = TOYS["mlp"]
    x = toy.make_input()
    first, _ = _saved(tmp_path, config_cls(targets=["fc1", "fc2"], r=4, alpha=8.0), 1, "first.safetensors")
    # A smaller rank, another alpha, rsLoRA and a per-layer alpha: all folded into the running tensors.
    second, reference = _saved(tmp_path, config_cls(targets=["fc1", "fc2"], r=2, alpha=3.0, rslora=True,
                                                    alpha_pattern={"fc2": 5.0}), 2, "second.safetensors")
    model = mm.load_adapters(toy.build(), first)
    params = {n: p for n, p in model.named_parameters()}
    hotswap_adapter(model, second)
    assert {n: p for n, p in model.named_parameters()}.items() == params.items(), "parameters were replaced"
    torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-6)
    hotswap_adapter(model, first)
    torch.testing.assert_close(model(x), mm.load_adapters(toy.build(), first)(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("config_cls", [mm.LoRAConfig, DoRAConfig], ids=["lora", "dora"])
def test_compiled_model_does_not_recompile_when_swapping(config_cls, tmp_path):
    """(Changing a layer's float ``scaling`` instead would recompile: the rescaled B avoids that.)"""
    import torch._dynamo

    toy = TOYS["mlp"]
    x = toy.make_input()
    first, _ = _saved(tmp_path, config_cls(targets=["fc1", "fc2"], r=4, alpha=8.0), 1, "first.safetensors")
    second, reference = _saved(tmp_path, config_cls(targets=["fc1", "fc2"], r=2, alpha=16.0), 2,
                               "second.safetensors")
    model = mm.load_adapters(toy.build(), first).eval()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")  # dynamo's guards decide recompiles, not the backend
    with torch.no_grad():
        # The first call compiles every frame (graph breaks in AdaptedLinear.forward resume once per layer shape).
        before = compiled(x)
        torch.testing.assert_close(compiled(x), before)
        with torch._dynamo.config.patch(error_on_recompile=True):
            hotswap_adapter(model, second)
            after = compiled(x)  # a recompilation would raise here
    torch.testing.assert_close(after, reference(x), rtol=1e-5, atol=1e-6)
    assert (after - before).abs().max() > 1e-3, "the swap did not reach the compiled model"


def test_refusals_name_file_and_layer(tmp_path):
    toy = TOYS["mlp"]
    big, _ = _saved(tmp_path, mm.LoRAConfig(targets=["fc1", "fc2"], r=6), 1, "big.safetensors")
    fewer, _ = _saved(tmp_path, mm.LoRAConfig(targets=["fc1"], r=2), 1, "fewer.safetensors")
    dora, _ = _saved(tmp_path, DoRAConfig(targets=["fc1", "fc2"], r=2), 1, "dora.safetensors")
    model = toy.build()
    mm.attach(model, mm.LoRAConfig(targets=["fc1", "fc2"], r=4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(mm.AdapterStateError, match=r"big.safetensors: default/fc1: rank 6 exceeds the running "
                       r"adapter's rank 4"):
        hotswap_adapter(model, big)
    with pytest.raises(mm.AdapterStateError, match=r"adapts other layers .* missing in file \['fc2'\]"):
        hotswap_adapter(model, fewer)
    with pytest.raises(mm.AdapterStateError, match="'dora', the running adapter 'default' is 'lora'"):
        hotswap_adapter(model, dora)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "a refused swap changed weights"
