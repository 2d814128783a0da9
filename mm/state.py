"""Adapter-only checkpoints: one safetensors file holding each adapter's tensors and its config.

Keys are ``"<adapter>/<layer path>.<tensor>"``; the metadata holds every adapter's config as JSON, so
``load_adapters`` can re-attach adapters to a fresh base model before filling them in.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from mm.config import AdapterConfig
from mm.errors import MMTuneError
from mm.wrap import AttachError, adapted_layers, adapter_names, attach, delete_adapter

FORMAT = "mmtune.adapters"
FORMAT_VERSION = "1"
#: Metadata key of the sha256 over the file's tensors (see ``tensors_checksum``); files from older mmtune lack it.
CHECKSUM_KEY = "tensors_sha256"


class AdapterStateError(MMTuneError, ValueError):
    """A checkpoint does not fit the model (missing, unexpected or mis-shaped keys) or is not ours."""


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then rename over ``path``: readers see the old file or the new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp (and safetensors' writer) leave 0600; the file follows the umask as open() would.
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order: a flipped bit changes it."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().to("cpu").contiguous()
        digest.update(f"{key}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_finite(tensors: dict[str, torch.Tensor], source: str | os.PathLike) -> None:
    """Refuse NaN/inf in loaded tensors: one would make every output NaN, silently."""
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            count = int((~torch.isfinite(tensor)).sum())
            raise AdapterStateError(f"{source}: tensor {key!r} holds {count} NaN/inf value(s); expected finite "
                                    "numbers (was the run that wrote it diverging?)")


def adapter_state(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The persistent tensors of adapter ``name`` keyed by ``<layer path>.<tensor>``."""
    state = {}
    for layer_name, layer in adapted_layers(model):
        if name in layer.adapters:
            for key, tensor in layer.adapters[name].state_dict().items():
                state[f"{layer_name}.{key}"] = tensor
    return state


def save_adapters(model: nn.Module, path: str | os.PathLike, names: list[str] | None = None) -> Path:
    """Write the adapters (default: all) of ``model`` to one safetensors file, atomically."""
    from mm.wrap import adapter_config

    names = adapter_names(model) if names is None else list(names)
    if not names:
        raise AdapterStateError(f"{path}: model has no adapters to save")
    tensors, configs = {}, {}
    for name in names:
        configs[name] = adapter_config(model, name).to_dict()
        for key, tensor in adapter_state(model, name).items():
            tensors[f"{name}/{key}"] = tensor.detach().to("cpu").contiguous().clone()
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "adapters": json.dumps(configs),
                CHECKSUM_KEY: tensors_checksum(tensors)}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_tagged_safetensors(
    path: str | os.PathLike, expected_format: str, what: str = "adapter"
) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Metadata and tensors of a safetensors file whose metadata 'format' must be ``expected_format``.

    The tensors' checksum is verified where the file carries one, and every float tensor must be finite.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such {what} file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise AdapterStateError(f"{path}: not a readable safetensors file ({err})") from err
    if metadata.get("format") != expected_format:
        raise AdapterStateError(
            f"{path}: metadata 'format' is {metadata.get('format')!r}, expected {expected_format!r}")
    expected = metadata.get(CHECKSUM_KEY)
    if expected is not None and tensors_checksum(tensors) != expected:
        raise AdapterStateError(f"{path}: tensor checksum mismatch: the file changed after it was written "
                                f"(corrupt copy or disk?); metadata {CHECKSUM_KEY!r} is {expected[:12]}...")
    check_finite(tensors, path)
    return metadata, tensors


def read_adapter_file(path: str | os.PathLike) -> tuple[dict[str, AdapterConfig], dict[str, torch.Tensor]]:
    """Configs and tensors of an mmtune adapter file; errors name the file and what is wrong."""
    metadata, tensors = read_tagged_safetensors(path, FORMAT)
    if "adapters" not in metadata:
        raise AdapterStateError(f"{path}: metadata has no 'adapters' key (the adapters' configs as JSON)")
    try:
        raw = json.loads(metadata["adapters"])
    except json.JSONDecodeError as err:
        raise AdapterStateError(f"{path}: metadata 'adapters' is not valid JSON ({err})") from None
    if not isinstance(raw, dict) or not all(isinstance(cfg, dict) for cfg in raw.values()):
        raise AdapterStateError(f"{path}: metadata 'adapters' must map adapter names to config objects")
    configs = {name: AdapterConfig.from_dict(cfg, source=f"{path} adapter {name!r}") for name, cfg in raw.items()}
    return configs, tensors


def load_adapters(model: nn.Module, path: str | os.PathLike, names: list[str] | None = None) -> nn.Module:
    """Load adapters saved by ``save_adapters``; attaches those the model lacks, using the saved config.

    Loading is all-or-nothing per adapter: on any mismatch the error names the keys, and an adapter
    attached by this call is removed again.
    """
    configs, tensors = read_adapter_file(path)
    names = list(configs) if names is None else list(names)
    unknown = sorted(set(names) - set(configs))
    if unknown:
        raise AdapterStateError(f"{path}: no adapter(s) {unknown} in file; it holds {sorted(configs)}")
    for name in names:
        attached_here = name not in adapter_names(model)
        if attached_here:
            _attach_for_file(model, configs[name], name, tensors, path)
        prefix = f"{name}/"
        file_state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            _copy_state(model, name, file_state, path)
        except AdapterStateError:
            if attached_here:
                delete_adapter(model, name)
            raise
    return model


def _attach_for_file(model: nn.Module, config: AdapterConfig, name: str, tensors: dict[str, torch.Tensor],
                     path: str | os.PathLike) -> None:
    """Attach ``name`` as saved; a file made for other module names is refused naming it and the modules."""
    try:
        attach(model, config, name)
    except AttachError as err:
        layers = sorted({key[len(name) + 1:].rpartition(".")[0] for key in tensors if key.startswith(f"{name}/")})
        raise AdapterStateError(f"{path}: adapter {name!r} was saved for modules the model lacks "
                                f"({_preview(layers)}): {err}") from None


def _copy_state(model: nn.Module, name: str, file_state: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    model_state = adapter_state(model, name)
    missing = sorted(set(model_state) - set(file_state))
    unexpected = sorted(set(file_state) - set(model_state))
    shapes = [
        f"{key}: file {tuple(file_state[key].shape)} vs model {tuple(tensor.shape)}"
        for key, tensor in model_state.items()
        if key in file_state and file_state[key].shape != tensor.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing in file: {_preview(missing)}")
    if unexpected:
        problems.append(f"not in model: {_preview(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch: {_preview(shapes)}")
    if problems:
        raise AdapterStateError(f"{path}: adapter {name!r} does not fit the model; " + "; ".join(problems))
    with torch.no_grad():
        for key, tensor in model_state.items():
            tensor.copy_(file_state[key])


def _preview(items: list[str], limit: int = 6) -> str:
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more
