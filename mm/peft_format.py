"""Exchange LoRA adapters with HF PEFT: ``adapter_config.json`` + ``adapter_model.safetensors``.

PEFT keys look like ``base_model.model.<layer path>.lora_A.weight`` (the adapter name is dropped on save),
and its LoRA scaling is ``lora_alpha / r`` (or ``/ sqrt(r)`` with ``use_rslora``), the same as ours.
Convolutions use PEFT's keys too. On a grouped convolution PEFT's A is dense (in -> r) where ours is grouped:
export writes ours as a block-diagonal dense A (same outputs), and import takes a dense A only when it is
block-diagonal. PEFT's conv A ignores the layer's dilation and padding mode, so such layers are refused.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mm.adapters.dora import DoRA, DoRAConfig
from mm.adapters.lora import ConvLoRA, LoRA, LoRAConfig, pattern_key
from mm.config import ConfigError
from mm.embedding import EmbeddingLoRA, fill_embedding_lora, peft_embedding_key, peft_embedding_tensors
from mm.layer import is_conv1d
from mm.mha import SplitMultiheadAttention
from mm.modules_to_save import ModuleCopy
from mm.state import AdapterStateError, atomic_write, check_finite
from mm.wrap import AttachError, adaptable_layers, adapted_layers, adapter_config, attach, delete_adapter

PEFT_PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# PEFT LoRA options that change the computation; we refuse to import what we would compute differently.
_UNSUPPORTED = {"lora_bias": False}
#: The PEFT LoRA configs mmtune writes and reads: plain LoRA and DoRA (``use_dora``).
_PEFT_LORA_CONFIGS = (LoRAConfig, DoRAConfig)


def export_peft(model: nn.Module, directory: str | os.PathLike, adapter: str = "default") -> Path:
    """Write adapter ``adapter`` (LoRA or DoRA) in PEFT's format, loadable by ``PeftModel.from_pretrained``."""
    directory = Path(directory)
    config = adapter_config(model, adapter)
    if type(config) not in _PEFT_LORA_CONFIGS:
        raise TypeError(f"adapter {adapter!r} is {config.method!r}; only 'lora' and 'dora' have a PEFT LoRA form")
    if config.init == "loftq":
        raise TypeError(f"adapter {adapter!r} has init 'loftq': its A, B belong to the quantised base it made, which "
                        "PEFT would not rebuild on load; merge it, or save the base with mm.save_adapters")
    tensors, layer_names, conv1d, saved = {}, [], False, []
    for name, layer in adapted_layers(model):
        module = layer.adapters[adapter] if adapter in layer.adapters else None
        if isinstance(module, ModuleCopy):  # PEFT saves a modules_to_save copy under the module's own keys
            saved.append(name)
            tensors.update({f"{PEFT_PREFIX}{name}.{k}": v.detach().cpu().contiguous().clone()
                            for k, v in module.module.state_dict().items()})
            continue
        if isinstance(module, EmbeddingLoRA):  # PEFT's lora_embedding_A/B keys (mm.embedding)
            layer_names.append(name)
            tensors.update(peft_embedding_tensors(name, module, PEFT_PREFIX))
            continue
        if not isinstance(module, LoRA | ConvLoRA):
            continue
        if isinstance(model.get_submodule(name.rpartition(".")[0]), SplitMultiheadAttention):
            raise TypeError(
                f"{name}: PEFT packs q/k/v of nn.MultiheadAttention into one adapter; split q/k/v LoRAs "
                "have no PEFT form"
            )
        layer_names.append(name)
        conv1d = conv1d or is_conv1d(layer.base)
        lora_a = module.lora_A.detach().cpu()
        if isinstance(module, ConvLoRA):
            _refuse_peft_conv_geometry(name, layer.base, TypeError)
            lora_a = _dense_conv_a(lora_a, layer.base.groups)
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = lora_a.contiguous().clone()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = module.lora_B.detach().cpu().contiguous().clone()
        if isinstance(module, DoRA):
            tensors[f"{PEFT_PREFIX}{name}.lora_magnitude_vector"] = module.lora_magnitude_vector.detach().cpu().clone()
    peft_config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
        "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        "use_rslora": config.rslora, "fan_in_fan_out": conv1d, "bias": "none",
        # A full-name regex: exactly these layers, as PEFT matches a string target with re.fullmatch.
        "target_modules": "|".join(re.escape(n) for n in layer_names),
        # PEFT re-runs an 'olora' init when it loads the adapter, taking s B0 A0 out of the base as we do.
        "init_lora_weights": "olora" if config.init == "olora" else True,
        "modules_to_save": saved or None, "layers_to_transform": None,
        "use_dora": isinstance(config, DoRAConfig),
        "rank_pattern": dict(config.rank_pattern), "alpha_pattern": dict(config.alpha_pattern),
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
    saved = _saved_module_tensors(tensors, peft_config.get("modules_to_save") or [], directory / CONFIG_FILE)
    for key, tensor in tensors.items():
        if key in saved["keys"]:
            continue
        if (embedding_key := peft_embedding_key(key, PEFT_PREFIX)) is not None:
            layers.setdefault(embedding_key[0], {})[embedding_key[1]] = tensor
            continue
        found = (re.fullmatch(rf"{re.escape(PEFT_PREFIX)}(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight", key)
                 or re.fullmatch(rf"{re.escape(PEFT_PREFIX)}(.+)\.(lora_magnitude_vector)(?:\.[^.]+)?", key))
        if found is None:
            raise AdapterStateError(f"{weights_path}: key {key!r} is not a PEFT LoRA A/B weight or DoRA magnitude")
        layers.setdefault(found.group(1), {})[found.group(2)] = tensor
    if not layers:
        raise AdapterStateError(f"{weights_path}: holds no LoRA weights")
    config = _lora_config(peft_config, layers, directory / CONFIG_FILE)
    config.modules_to_save = sorted(saved["modules"])
    try:
        attach(model, config, name)
    except AttachError as err:
        lacking = sorted(set(layers) - set(adaptable_layers(model)))
        raise AdapterStateError(f"{weights_path}: LoRA weights for modules the model lacks "
                                f"({', '.join(lacking[:6])}{' ...' if len(lacking) > 6 else ''}); {err}") from None
    try:
        _fill(model, name, layers, weights_path)
        _fill_saved_modules(model, name, saved["modules"], weights_path)
    except AdapterStateError:
        delete_adapter(model, name)
        raise
    return model


def _saved_module_tensors(tensors: dict[str, torch.Tensor], patterns: object, path: Path) -> dict:
    """PEFT's modules_to_save tensors: {'keys': those keys, 'modules': {module path: {tensor name: tensor}}}."""
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise AdapterStateError(f"{path}: key 'modules_to_save' must be a list of module names, got {patterns!r}")
    keys, modules = set(), {}
    for key, tensor in tensors.items():
        for pattern in patterns:
            found = re.fullmatch(rf"{re.escape(PEFT_PREFIX)}((?:.*\.)?{re.escape(pattern)})\.(.+)", key)
            if found is not None:
                modules.setdefault(found.group(1), {})[found.group(2)] = tensor
                keys.add(key)
                break
    return {"keys": keys, "modules": modules}


def _fill_saved_modules(model: nn.Module, name: str, modules: dict[str, dict[str, torch.Tensor]], path: Path) -> None:
    for module_name, state in modules.items():
        copy = model.get_submodule(module_name).adapters[name].module
        expected = copy.state_dict()
        wrong = sorted(set(expected) ^ set(state)) or [
            f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}" for k, v in state.items()
            if v.shape != expected[k].shape]
        if wrong:
            raise AdapterStateError(f"{path}: modules_to_save {module_name!r} does not fit the model: {wrong[:6]}")
        copy.load_state_dict(state)


def _lora_config(peft_config: dict, layers: dict, path: Path) -> LoRAConfig:
    """Our LoRA (or DoRA) config for exactly the layers the weights hold; a bad key names ``path``."""
    for key, kinds in (("r", int), ("lora_alpha", int | float)):
        value = peft_config.get(key)
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise AdapterStateError(f"{path}: key {key!r} must be a number, got {value!r}")
    patterns = {}
    for key in ("rank_pattern", "alpha_pattern"):
        given = peft_config.get(key) or {}
        if not isinstance(given, dict):
            raise AdapterStateError(f"{path}: key {key!r} must be an object {{pattern: value}}, got {given!r}")
        # PEFT ignores patterns that match no layer; keep those that decide some layer's value.
        used = {pattern_key(given, n) for n in layers}
        patterns[key] = {p: v for p, v in given.items() if p in used}
    dora = bool(peft_config.get("use_dora", False))
    if not dora and any(p.get("lora_magnitude_vector") is not None for p in layers.values()):
        raise AdapterStateError(f"{path}: weights hold DoRA magnitudes (lora_magnitude_vector) but 'use_dora' is false")
    try:
        return (DoRAConfig if dora else LoRAConfig)(
            target_regex="|".join(re.escape(n) for n in layers), r=int(peft_config["r"]),
            alpha=float(peft_config["lora_alpha"]), dropout=float(peft_config.get("lora_dropout") or 0.0),
            rslora=bool(peft_config.get("use_rslora", False)), **patterns,
            # An 'olora' adapter is relative to the residual base its init makes (PEFT rebuilds it on load too).
            **({"init": "olora"} if peft_config.get("init_lora_weights") == "olora" else {}),
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


def _refuse_peft_conv_geometry(layer_name: str, conv: nn.Module, error: type[Exception], where: str = "") -> None:
    """PEFT 0.21 builds a conv LoRA's A without the layer's dilation and padding mode: its outputs differ."""
    if any(d != 1 for d in conv.dilation) or conv.padding_mode != "zeros":
        raise error(f"{where}{layer_name}: PEFT's conv LoRA ignores dilation {tuple(conv.dilation)} and "
                    f"padding_mode {conv.padding_mode!r} of the layer; no PEFT LoRA computes what ours does there")


def _dense_conv_a(lora_a: torch.Tensor, groups: int) -> torch.Tensor:
    """Our grouped A (r, in/groups, *k) as PEFT's dense (r, in, *k): zero outside each group's block."""
    if groups == 1:
        return lora_a
    rank, per_group = lora_a.shape[0] // groups, lora_a.shape[1]
    dense = lora_a.new_zeros(lora_a.shape[0], per_group * groups, *lora_a.shape[2:])
    for g in range(groups):
        dense[g * rank:(g + 1) * rank, g * per_group:(g + 1) * per_group] = lora_a[g * rank:(g + 1) * rank]
    return dense


def _grouped_conv_a(layer_name: str, conv: nn.Module, dense: torch.Tensor, path: Path) -> torch.Tensor:
    """PEFT's dense A on a grouped conv as our grouped A; refused unless it is block-diagonal."""
    _refuse_peft_conv_geometry(layer_name, conv, AdapterStateError, f"{path}: ")
    groups = conv.groups
    if groups == 1 or dense.dim() < 3 or dense.shape[1] != conv.in_channels or dense.shape[0] % groups:
        return dense  # the shape check that follows names a wrong shape
    rank, per_group = dense.shape[0] // groups, conv.in_channels // groups
    grouped = torch.cat([dense[g * rank:(g + 1) * rank, g * per_group:(g + 1) * per_group] for g in range(groups)])
    if not torch.equal(_dense_conv_a(grouped, groups), dense):
        raise AdapterStateError(
            f"{path}: {layer_name}.lora_A mixes channels across the {groups} groups of a grouped "
            f"{type(conv).__name__} (PEFT's dense A); mmtune's grouped conv LoRA holds only block-diagonal A")
    return grouped


def _fill(model: nn.Module, name: str, layers: dict[str, dict[str, torch.Tensor]], path: Path) -> None:
    modules = {layer_name: layer.adapters[name] for layer_name, layer in adapted_layers(model)
               if name in layer.adapters}
    bases = {layer_name: layer.base for layer_name, layer in adapted_layers(model)}
    missing = sorted(set(layers) - set(modules))
    if missing:
        raise AdapterStateError(f"{path}: layers {missing} are not adaptable layers of the model")
    with torch.no_grad():
        for layer_name, pair in layers.items():
            if isinstance(modules[layer_name], EmbeddingLoRA):
                fill_embedding_lora(layer_name, modules[layer_name], bases[layer_name], pair, path)
                continue
            missing_part = next((p for p in ("lora_A", "lora_B") if p not in pair), None)
            if missing_part:
                raise AdapterStateError(f"{path}: layer {layer_name!r} has no {missing_part} weight")
            if isinstance(modules[layer_name], ConvLoRA):
                pair = {**pair, "lora_A": _grouped_conv_a(layer_name, bases[layer_name], pair["lora_A"], path)}
            parts = ["lora_A", "lora_B"]
            if isinstance(modules[layer_name], DoRA):
                if "lora_magnitude_vector" not in pair:
                    raise AdapterStateError(f"{path}: layer {layer_name!r} has no lora_magnitude_vector (DoRA)")
                parts.append("lora_magnitude_vector")
            for part in parts:
                target = getattr(modules[layer_name], part)
                if target.shape != pair[part].shape:
                    raise AdapterStateError(
                        f"{path}: {layer_name}.{part} has shape {tuple(pair[part].shape)}, "
                        f"model expects {tuple(target.shape)}"
                    )
                target.copy_(pair[part])
