"""Hot-swapping: put another saved adapter's weights into a running LoRA/DoRA adapter, in place.

Nothing is rebuilt: the same parameter tensors receive new values (``copy_``), so optimiser references,
hooks, device placement and a ``torch.compile``d graph all stay valid; a compiled model does not recompile
(its guards see the same tensors and the same Python floats). Two things would otherwise change the graph,
and are folded into the tensors instead:

- a different scaling (alpha, rsLoRA, per-layer patterns): B is multiplied by s_new / s_running, so
  s_running B' A = s_new B A while the layer's float ``scaling`` stays what the graph was traced with;
- a smaller rank: A gets zero rows and B zero columns up to the running rank (the product is unchanged).
  A larger rank than the running adapter's cannot fit; attach the running adapter with the largest rank
  you will swap in (PEFT's ``prepare_model_for_compiled_hotswap(target_rank=...)`` does the same).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from mm.adapters.dora import DoRA, DoRAConfig
from mm.adapters.lora import LoRA, LoRAConfig
from mm.state import AdapterStateError, read_adapter_file
from mm.wrap import adapted_layers, adapter_config, adapter_names

_SWAPPABLE = (LoRAConfig, DoRAConfig)


def hotswap_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default", *,
                    source: str | None = None) -> nn.Module:
    """Replace the weights of ``model``'s adapter ``name`` with adapter ``source`` of the file ``path``
    (written by ``mm.save_adapters``; default: the one adapter it holds, or the one called ``name``).

    All-or-nothing: every layer's new tensors are checked before any is written. Errors name the file,
    the adapter and the layer.
    """
    if name not in adapter_names(model):
        raise KeyError(f"model has no adapter {name!r}; it has {adapter_names(model)}")
    configs, tensors = read_adapter_file(path)
    source = _pick_source(configs, name, source, path)
    new_config, running_config = configs[source], adapter_config(model, name)
    for config, what in ((new_config, f"file adapter {source!r}"), (running_config, f"running adapter {name!r}")):
        if type(config) not in _SWAPPABLE:
            raise AdapterStateError(f"{path}: {what} is {config.method!r}; hot-swapping takes 'lora' or 'dora'")
    if type(new_config) is not type(running_config):
        raise AdapterStateError(f"{path}: adapter {source!r} is {new_config.method!r}, the running adapter {name!r} "
                                f"is {running_config.method!r}")
    if new_config.init == "olora" or running_config.init == "olora":
        raise AdapterStateError(f"{path}: init 'olora' adapters carry their own residual base; load them instead")
    modules = {layer_name: layer.adapters[name] for layer_name, layer in adapted_layers(model)
               if name in layer.adapters}
    file_state = _file_layers(tensors, source)
    if set(file_state) != set(modules):
        missing, extra = sorted(set(modules) - set(file_state)), sorted(set(file_state) - set(modules))
        raise AdapterStateError(f"{path}: adapter {source!r} adapts other layers than the running {name!r}: "
                                f"missing in file {missing[:6]}, not in model {extra[:6]}")
    plan = {layer: _swapped_tensors(modules[layer], file_state[layer], new_config.for_layer(layer).scaling,
                                    f"{path}: {source}/{layer}") for layer in modules}
    with torch.no_grad():
        for layer, new in plan.items():
            for key, value in new.items():
                getattr(modules[layer], key).copy_(value)
    return model


def _pick_source(configs: dict, name: str, source: str | None, path: str | os.PathLike) -> str:
    if source is None:
        source = name if name in configs else (next(iter(configs)) if len(configs) == 1 else None)
    if source not in configs:
        raise AdapterStateError(f"{path}: pick the adapter to swap in (source=...); the file holds {sorted(configs)}")
    return source


def _file_layers(tensors: dict[str, torch.Tensor], source: str) -> dict[str, dict[str, torch.Tensor]]:
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if key.startswith(f"{source}/"):
            layer, _, part = key[len(source) + 1:].rpartition(".")
            layers.setdefault(layer, {})[part] = tensor
    return layers


def _swapped_tensors(module: nn.Module, state: dict[str, torch.Tensor], new_scaling: float,
                     where: str) -> dict[str, torch.Tensor]:
    """The running module's tensors holding the file's update: B rescaled to the running scaling, zero-padded."""
    if not isinstance(module, LoRA) or type(module) not in (LoRA, DoRA):
        raise AdapterStateError(f"{where}: the running layer is a {type(module).__name__}; only LoRA/DoRA swap")
    expected = {"lora_A", "lora_B"} | ({"lora_magnitude_vector"} if isinstance(module, DoRA) else set())
    if set(state) != expected:
        raise AdapterStateError(f"{where}: holds {sorted(state)}, expected {sorted(expected)}")
    lora_a, lora_b = state["lora_A"], state["lora_B"]
    rank, running_rank = lora_a.shape[0], module.lora_A.shape[0]
    if lora_a.shape[1:] != module.lora_A.shape[1:] or lora_b.shape[0] != module.lora_B.shape[0]:
        raise AdapterStateError(f"{where}: A {tuple(lora_a.shape)}, B {tuple(lora_b.shape)} do not fit the running "
                                f"layer's A {tuple(module.lora_A.shape)}, B {tuple(module.lora_B.shape)}")
    if rank > running_rank:
        raise AdapterStateError(f"{where}: rank {rank} exceeds the running adapter's rank {running_rank}; attach the "
                                f"running adapter with r >= {rank} (zero ranks cost nothing in the output)")
    padded_a = lora_a.new_zeros(module.lora_A.shape)
    padded_a[:rank] = lora_a
    padded_b = lora_b.new_zeros(module.lora_B.shape)
    padded_b[:, :rank] = lora_b.double().mul(new_scaling / module.scaling).to(lora_b.dtype)
    new = {"lora_A": padded_a, "lora_B": padded_b}
    if isinstance(module, DoRA):
        new["lora_magnitude_vector"] = state["lora_magnitude_vector"]
    return new
