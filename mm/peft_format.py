"""Exchange LoRA adapters with HF PEFT: ``adapter_config.json`` + ``adapter_model.safetensors``.

PEFT keys look like ``base_model.model.<layer path>.lora_A.weight`` (the adapter name is dropped on save),
and its LoRA scaling is ``lora_alpha / r`` (or ``/ sqrt(r)`` with ``use_rslora``), the same as ours.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mm.adapters.lora import LoRA, LoRAConfig
from mm.config import ConfigError
from mm.layer import is_conv1d
from mm.mha import SplitMultiheadAttention
from mm.state import AdapterStateError, atomic_write, check_finite
from mm.wrap import AttachError, adaptable_layers, adapted_layers, adapter_config, attach, delete_adapter

PEFT_PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# PEFT LoRA options that change the computation; we refuse to import what we would compute differently.
_UNSUPPORTED = {"use_dora": False, "lora_bias": False, "rank_pattern": {}, "alpha_pattern": {}}


def export_peft(model: nn.Module, directory: str | os.PathLike, adapter: str = "default") -> Path:
    """Write adapter ``adapter`` (a plain LoRA) in PEFT's format, loadable by ``PeftModel.from_pretrained``."""
    directory = Path(directory)
    config = adapter_config(model, adapter)
    if type(config) is not LoRAConfig:
        raise TypeError(f"adapter {adapter!r} is {config.method!r}; only plain 'lora' has a PEFT LoRA form")
    tensors, layer_names, conv1d = {}, [], False
    for name, layer in adapted_layers(model):
        module = layer.adapters[adapter] if adapter in layer.adapters else None
        if not isinstance(module, LoRA):
            continue
        if isinstance(model.get_submodule(name.rpartition(".")[0]), SplitMultiheadAttention):
            raise TypeError(
                f"{name}: PEFT packs q/k/v of nn.MultiheadAttention into one adapter; split q/k/v LoRAs "
                "have no PEFT form"
            )
        layer_names.append(name)
        conv1d = conv1d or is_conv1d(layer.base)
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = module.lora_A.detach().cpu().contiguous().clone()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = module.lora_B.detach().cpu().contiguous().clone()
    peft_config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
        "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        "use_rslora": config.rslora, "fan_in_fan_out": conv1d, "bias": "none",
        # A full-name regex: exactly these layers, as PEFT matches a string target with re.fullmatch.
        "target_modules": "|".join(re.escape(n) for n in layer_names),
        "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None,
        "use_dora": False,
    }
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(directory / CONFIG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(peft_config, indent=2)))
    return directory


def import_peft(model: nn.Module, directory: str | os.PathLike, name: str = "default") -> nn.Module:
    """Attach a PEFT LoRA adapter saved in ``directory`` to ``model`` (the bare base model) as ``name``."""
    directory = Path(directory)
    peft_config = _read_peft_config(directory / CONFIG_FILE)
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path}: missing (only safetensors PEFT adapters are read)")
    try:
        tensors = load_file(str(weights_path))
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise AdapterStateError(f"{weights_path}: not a readable safetensors file ({err})") from None
    check_finite(tensors, weights_path)
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        found = re.fullmatch(rf"{re.escape(PEFT_PREFIX)}(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight", key)
        if found is None:
            raise AdapterStateError(f"{weights_path}: key {key!r} is not a PEFT LoRA A/B weight")
        layers.setdefault(found.group(1), {})[found.group(2)] = tensor
    if not layers:
        raise AdapterStateError(f"{weights_path}: holds no LoRA weights")
    config = _lora_config(peft_config, layers, directory / CONFIG_FILE)
    try:
        attach(model, config, name)
    except AttachError as err:
        lacking = sorted(set(layers) - set(adaptable_layers(model)))
        raise AdapterStateError(f"{weights_path}: LoRA weights for modules the model lacks "
                                f"({', '.join(lacking[:6])}{' ...' if len(lacking) > 6 else ''}); {err}") from None
    try:
        _fill(model, name, layers, weights_path)
    except AdapterStateError:
        delete_adapter(model, name)
        raise
    return model


def _lora_config(peft_config: dict, layers: dict, path: Path) -> LoRAConfig:
    """Our LoRA config for exactly the layers the weights hold; a missing or ill-typed key names ``path``."""
    for key, kinds in (("r", int), ("lora_alpha", int | float)):
        value = peft_config.get(key)
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise AdapterStateError(f"{path}: key {key!r} must be a number, got {value!r}")
    try:
        return LoRAConfig(
            target_regex="|".join(re.escape(n) for n in layers), r=int(peft_config["r"]),
            alpha=float(peft_config["lora_alpha"]), dropout=float(peft_config.get("lora_dropout") or 0.0),
            rslora=bool(peft_config.get("use_rslora", False)),
        )
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def _read_peft_config(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing PEFT adapter config")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterStateError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise AdapterStateError(f"{path}: expected a JSON object, got {type(config).__name__}")
    if config.get("peft_type") != "LORA":
        raise AdapterStateError(f"{path}: key 'peft_type' is {config.get('peft_type')!r}, expected 'LORA'")
    for key, plain in _UNSUPPORTED.items():
        if config.get(key) not in (plain, None):
            raise AdapterStateError(f"{path}: key {key!r}={config[key]!r} is not supported (expected {plain!r})")
    return config


def _fill(model: nn.Module, name: str, layers: dict[str, dict[str, torch.Tensor]], path: Path) -> None:
    modules = {layer_name: layer.adapters[name] for layer_name, layer in adapted_layers(model)
               if name in layer.adapters}
    missing = sorted(set(layers) - set(modules))
    if missing:
        raise AdapterStateError(f"{path}: layers {missing} are not adaptable layers of the model")
    with torch.no_grad():
        for layer_name, pair in layers.items():
            for part in ("lora_A", "lora_B"):
                if part not in pair:
                    raise AdapterStateError(f"{path}: layer {layer_name!r} has no {part} weight")
                target = getattr(modules[layer_name], part)
                if target.shape != pair[part].shape:
                    raise AdapterStateError(
                        f"{path}: {layer_name}.{part} has shape {tuple(pair[part].shape)}, "
                        f"model expects {tuple(target.shape)}"
                    )
                target.copy_(pair[part])
