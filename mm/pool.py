"""``AdapterPool``: serve many LoRA adapters from one frozen base, S-LoRA style.

Any number of adapters are *registered* (mmtune adapter files or PEFT LoRA directories): registering reads
only the file's header and checks every tensor's layer and shape against the base, so a file that does not
fit is refused naming it, before anything changes. Their weights stay on disk (memory-mapped by the OS)
until a batch needs them; then they are paged into a fixed device pool of ``slots`` (from ``slots`` or
``budget_bytes``), the least recently used resident adapter making room. Device memory is thus bounded by
the budget, not by the number of adapters. Adapters of different ranks share the pool (zero-padded to
``r_max``); scaling is folded into the stored A.

    pool = mm.AdapterPool(model, targets=["q_proj", "v_proj"], r_max=16, budget_bytes=64 << 20)
    pool.register("support", "runs/support/adapters.safetensors")
    pool.register("legal", "peft_dirs/legal")            # a PEFT LoRA directory
    with pool.route(["support", "legal", None]):          # one adapter (or none) per row
        logits = model(input_ids).logits
    # or, to keep the slots of a running batch: slots = pool.acquire(names); with pool.route_slots(slots): ...

Each row's update runs through ``mm.batched.gathered_low_rank`` (one batched computation, no loop over
adapters). Adapters attached to the model with ``mm.attach`` are not applied inside ``pool.route``.
On CUDA, host copies are pinned and copied with ``non_blocking`` so paging overlaps compute; ``prefetch(names)``
reads files on a background thread, so the ``acquire`` that needs them waits for no disk. Registering and
acquiring hold a lock: a server may call them from several threads.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from mm.batched import gathered_low_rank
from mm.config import ConfigError
from mm.errors import MMTuneError
from mm.layer import AdaptedLinear
from mm.route import route
from mm.state import FORMAT, AdapterStateError, read_adapter_file
from mm.wrap import _matches_any, _replace, adaptable_layer_kinds


class PoolError(MMTuneError, KeyError):
    """An adapter the pool cannot serve: not registered, already registered, or more than the pool's slots."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass(frozen=True)
class _Entry:
    path: Path
    kind: str  # "mmtune" or "peft"
    file_name: str  # the adapter's name inside an mmtune file
    #: layer name -> (key of A, key of B, rank, scaling)
    layers: dict[str, tuple[str, str, int, float]]


class AdapterPool:
    """A fixed device pool of LoRA adapters over ``model``'s ``targets`` layers (suffixes or regexes, as
    ``mm.attach``'s targets); ``slots`` and/or ``budget_bytes`` bound it (the smaller wins)."""

    def __init__(self, model: nn.Module, *, targets: Sequence[str], r_max: int, slots: int | None = None,
                 budget_bytes: int | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        if r_max < 1:
            raise ConfigError(f"AdapterPool: r_max must be >= 1, got {r_max}")
        if slots is None and budget_bytes is None:
            raise ConfigError("AdapterPool: give slots or budget_bytes (the device pool's size)")
        kinds = adaptable_layer_kinds(model)
        names = [n for n, kind in kinds.items() if kind == "linear" and _matches_any(n, list(targets))]
        if not names:
            raise ConfigError(f"AdapterPool: targets {list(targets)} match no linear layer of the model")
        self.model, self.r_max = model, r_max
        self._layers: dict[str, AdaptedLinear] = {}
        for name in names:
            layer = model.get_submodule(name)
            if not isinstance(layer, AdaptedLinear):
                layer = AdaptedLinear(layer)
                _replace(model, name, layer)
            self._layers[name] = layer
        first = next(iter(self._layers.values())).weight
        self.device = torch.device(device) if device is not None else first.device
        self.dtype = dtype or (first.dtype if first.is_floating_point() else torch.float32)
        size = torch.empty((), dtype=self.dtype).element_size()
        self.slot_bytes = sum(r_max * (layer.in_features + layer.out_features) * size for layer in self._layers.values())
        fit = budget_bytes // self.slot_bytes if budget_bytes is not None else slots
        self.slots = int(min(fit, slots) if slots is not None else fit)
        if self.slots < 1:
            raise ConfigError(f"AdapterPool: budget_bytes={budget_bytes} holds no adapter; one slot takes "
                              f"{self.slot_bytes} bytes (r_max={r_max} over {len(names)} layers)")
        # One extra all-zero slot (index self.slots) for rows without an adapter.
        self._a = {n: torch.zeros(self.slots + 1, r_max, layer.in_features, dtype=self.dtype, device=self.device)
                   for n, layer in self._layers.items()}
        self._b = {n: torch.zeros(self.slots + 1, layer.out_features, r_max, dtype=self.dtype, device=self.device)
                   for n, layer in self._layers.items()}
        self._by_layer = {id(layer): n for n, layer in self._layers.items()}
        self._entries: dict[str, _Entry] = {}
        self._resident: OrderedDict[str, int] = OrderedDict()  # name -> slot, least recently used first
        self._free = list(range(self.slots - 1, -1, -1))
        self.loads = self.evictions = 0
        self._lock = threading.RLock()
        self._pending: dict[str, Future] = {}
        self._reader: ThreadPoolExecutor | None = None

    # -- registration -------------------------------------------------------------------------------------
    def register(self, name: str, path: str | os.PathLike, *, adapter: str | None = None) -> None:
        """Register ``path`` (an mmtune adapter file, or a PEFT LoRA directory) as ``name``; ``adapter`` picks
        one adapter of a multi-adapter mmtune file. Checks layers and shapes now; loads nothing."""
        with self._lock:
            self._register(name, Path(path), adapter)

    def _register(self, name: str, path: Path, adapter: str | None) -> None:
        if name in self._entries:
            raise PoolError(f"adapter {name!r} is already registered (from {self._entries[name].path})")
        entry = self._read_peft_header(path) if path.is_dir() else self._read_mmtune_header(path, adapter)
        self._entries[name] = entry

    def unregister(self, name: str) -> None:
        with self._lock:
            self._known(name)
            slot = self._resident.pop(name, None)
            if slot is not None:
                self._free.append(slot)
            self._pending.pop(name, None)
            del self._entries[name]

    def prefetch(self, names: Sequence[str]) -> None:
        """Start reading these adapters' files on a background thread (those not resident or already coming);
        the next ``acquire`` naming them takes the host copies without touching the disk. Errors surface there."""
        with self._lock:
            for name in dict.fromkeys(names):
                self._known(name)
                if name not in self._resident and name not in self._pending:
                    if self._reader is None:
                        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mm-pool")
                    self._pending[name] = self._reader.submit(self._read, name)

    def names(self) -> list[str]:
        return list(self._entries)

    def resident(self) -> list[str]:
        """Adapters now on the device, least recently used first."""
        return list(self._resident)

    def device_bytes(self) -> int:
        """Bytes the pool holds on its device: fixed at construction, whatever the number registered."""
        return sum(t.nbytes for t in (*self._a.values(), *self._b.values()))

    def _read_mmtune_header(self, path: Path, adapter: str | None) -> _Entry:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such adapter file or PEFT directory")
        configs, _ = _header_configs(path)
        if adapter is None and len(configs) != 1:
            raise AdapterStateError(f"{path}: holds adapters {sorted(configs)}; say which one (adapter=...)")
        adapter = adapter if adapter is not None else next(iter(configs))
        if adapter not in configs:
            raise AdapterStateError(f"{path}: no adapter {adapter!r} in file; it holds {sorted(configs)}")
        config = configs[adapter]
        if config.method != "lora" or getattr(config, "init", "kaiming") in ("olora", "loftq"):
            raise AdapterStateError(f"{path}: adapter {adapter!r} is method {config.method!r} (init "
                                    f"{getattr(config, 'init', '-')!r}); the pool serves plain LoRA / rsLoRA only")
        with safe_open(str(path), framework="pt") as handle:
            shapes = {k[len(adapter) + 1:]: tuple(handle.get_slice(k).get_shape())
                      for k in handle.keys() if k.startswith(f"{adapter}/")}  # noqa: SIM118
        return self._entry(path, "mmtune", adapter, shapes, config, lambda key: f"{adapter}/{key}")

    def _read_peft_header(self, path: Path) -> _Entry:
        from mm.peft_format import CONFIG_FILE, PEFT_PREFIX, WEIGHTS_FILE, _lora_config, _read_peft_config

        peft_config = _read_peft_config(path / CONFIG_FILE)
        weights = path / WEIGHTS_FILE
        if not weights.is_file():
            raise FileNotFoundError(f"{weights}: missing (only safetensors PEFT adapters are read)")
        try:
            with safe_open(str(weights), framework="pt") as handle:
                raw = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}  # noqa: SIM118
        except Exception as err:  # safetensors raises its own error types for corrupt files
            raise AdapterStateError(f"{weights}: not a readable safetensors file ({err})") from None
        shapes, keys = {}, {}
        for key, shape in raw.items():
            body = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
            layer, _, rest = body.partition(".lora_")
            if not rest or rest.split(".")[0] not in ("A", "B"):
                raise AdapterStateError(f"{weights}: key {key!r} is not a PEFT LoRA A/B weight (the pool serves LoRA)")
            shapes[f"{layer}.lora_{rest[0]}"] = shape
            keys[f"{layer}.lora_{rest[0]}"] = key
        config = _lora_config(peft_config, {k.rpartition(".")[0]: {} for k in shapes}, path / CONFIG_FILE)
        if config.method != "lora" or config.init != "kaiming":
            raise AdapterStateError(f"{path}: a {config.method} adapter (init {config.init!r}); the pool serves plain LoRA")
        return self._entry(weights, "peft", "", shapes, config, keys.__getitem__)

    def _entry(self, path: Path, kind: str, file_name: str, shapes: dict, config, key_of) -> _Entry:
        """Check every (layer, A/B) shape against the pool's layers; refuse naming ``path`` and the tensor."""
        layers: dict[str, tuple[str, str, int, float]] = {}
        for layer_name in sorted({k.rpartition(".")[0] for k in shapes}):
            a_shape, b_shape = shapes.get(f"{layer_name}.lora_A"), shapes.get(f"{layer_name}.lora_B")
            layer = self._layers.get(layer_name)
            if layer is None:
                raise AdapterStateError(f"{path}: adapts layer {layer_name!r}, which is not one of the pool's "
                                        f"{len(self._layers)} target layers (e.g. {next(iter(self._layers))!r})")
            if a_shape is None or b_shape is None or len(a_shape) != 2 or len(b_shape) != 2:
                raise AdapterStateError(f"{path}: layer {layer_name!r} needs 2-D lora_A and lora_B, got "
                                        f"{a_shape} and {b_shape}")
            rank = a_shape[0]
            want_a, want_b = (rank, layer.in_features), (layer.out_features, rank)
            if a_shape != want_a or b_shape != want_b:
                raise AdapterStateError(f"{path}: {layer_name}.lora_A/lora_B are {a_shape}/{b_shape}; the base layer "
                                        f"needs {want_a}/{want_b}")
            if rank > self.r_max:
                raise AdapterStateError(f"{path}: {layer_name} has rank {rank}, above the pool's r_max={self.r_max}")
            scaling = config.for_layer(layer_name).scaling
            layers[layer_name] = (key_of(f"{layer_name}.lora_A"), key_of(f"{layer_name}.lora_B"), rank, scaling)
        if not layers:
            raise AdapterStateError(f"{path}: holds no LoRA tensors")
        return _Entry(path, kind, file_name, layers)

    # -- paging -------------------------------------------------------------------------------------------
    def acquire(self, row_names: Sequence[str | None]) -> torch.Tensor:
        """Each row's slot (a device tensor), paging in the adapters the rows name (None: the base alone).
        Errors (unknown adapter, too many for the pool, a file that changed) leave the pool as it was."""
        with self._lock:
            return self._acquire(row_names)

    def _acquire(self, row_names: Sequence[str | None]) -> torch.Tensor:
        wanted = list(dict.fromkeys(n for n in row_names if n is not None))
        for name in wanted:
            self._known(name)
        if len(wanted) > self.slots:
            raise PoolError(f"batch names {len(wanted)} adapters; the pool holds {self.slots} (raise budget_bytes/slots)")
        missing = [n for n in wanted if n not in self._resident]
        host = {name: self._host_copy(name) for name in missing}  # every read before any eviction
        for name in wanted:
            if name in self._resident:
                self._resident.move_to_end(name)
        for name in missing:
            self._store(name, self._take_slot(set(wanted)), host[name])
        slot_of = {n: self._resident[n] for n in wanted}
        return torch.tensor([self.slots if n is None else slot_of[n] for n in row_names], device=self.device)

    @contextlib.contextmanager
    def route(self, row_names: Sequence[str | None]) -> Iterator[torch.Tensor]:
        """Run the forward passes inside the block with row i through adapter ``row_names[i]``."""
        with self.route_slots(self.acquire(row_names)) as slots:
            yield slots

    @contextlib.contextmanager
    def route_slots(self, row_slots: torch.Tensor) -> Iterator[torch.Tensor]:
        """As ``route``, for slots from an earlier ``acquire`` (valid while those adapters stay resident)."""
        with route(pool=self, row_slots=row_slots):
            yield row_slots

    def add_rows(self, layer: AdaptedLinear, x: torch.Tensor, out: torch.Tensor, row_slots: torch.Tensor) -> torch.Tensor:
        """Called by ``AdaptedLinear.forward`` inside ``route``: ``out`` plus each row's adapter update."""
        name = self._by_layer.get(id(layer))
        if name is None:
            return out
        if row_slots.shape[0] != x.shape[0]:
            raise ValueError(f"pool route gives slots for {row_slots.shape[0]} rows, the batch has {x.shape[0]}")
        return gathered_low_rank(x, out, self._a[name], self._b[name], row_slots)

    def _known(self, name: str) -> None:
        if name not in self._entries:
            known = sorted(self._entries)
            preview = ", ".join(known[:8]) + (f" (+{len(known) - 8} more)" if len(known) > 8 else "")
            raise PoolError(f"unknown adapter {name!r}; registered: {preview or 'none'}")

    def _host_copy(self, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        pending = self._pending.pop(name, None)
        return pending.result() if pending is not None else self._read(name)

    def _read(self, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The adapter's (A * scaling, B) per layer on the host, checked finite (and its checksum, for mmtune
        files); pinned when the pool is on CUDA so the device copy can be asynchronous."""
        entry = self._entries[name]
        if entry.kind == "mmtune":
            _, tensors = read_adapter_file(entry.path)
        else:
            from mm.state import check_finite

            with safe_open(str(entry.path), framework="pt") as handle:
                tensors = {k: handle.get_tensor(k) for pair in entry.layers.values() for k in pair[:2]}
            check_finite(tensors, entry.path)
        host = {}
        for layer_name, (key_a, key_b, _, scaling) in entry.layers.items():
            if key_a not in tensors or key_b not in tensors:
                raise AdapterStateError(f"{entry.path}: lacks {key_a!r} or {key_b!r} (the file changed since register)")
            a = tensors[key_a].to(self.dtype) * scaling
            b = tensors[key_b].to(self.dtype)
            if self.device.type == "cuda":
                a, b = a.pin_memory(), b.pin_memory()
            host[layer_name] = (a, b)
        return host

    def _take_slot(self, keep: set[str]) -> int:
        if self._free:
            return self._free.pop()
        victim = next(n for n in self._resident if n not in keep)  # exists: len(keep) <= slots
        self.evictions += 1
        return self._resident.pop(victim)

    @torch.no_grad()
    def _store(self, name: str, slot: int, host: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        for layer_name in self._layers:
            a_slot, b_slot = self._a[layer_name][slot], self._b[layer_name][slot]
            if layer_name not in host:
                a_slot.zero_()
                b_slot.zero_()
                continue
            a, b = host[layer_name]
            rank = a.shape[0]
            a_slot[:rank].copy_(a, non_blocking=True)
            a_slot[rank:].zero_()
            b_slot[:, :rank].copy_(b, non_blocking=True)
            b_slot[:, rank:].zero_()
        self._resident[name] = slot
        self.loads += 1


def _header_configs(path: Path):
    """An mmtune adapter file's configs, from its header alone (tensors are read when paged in)."""
    import json

    from mm.config import AdapterConfig

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise AdapterStateError(f"{path}: not a readable safetensors file ({err})") from None
    if metadata.get("format") != FORMAT:
        raise AdapterStateError(f"{path}: metadata 'format' is {metadata.get('format')!r}, expected {FORMAT!r} "
                                "(or give a PEFT adapter directory)")
    try:
        raw = json.loads(metadata.get("adapters", ""))
    except json.JSONDecodeError as err:
        raise AdapterStateError(f"{path}: metadata 'adapters' is not valid JSON ({err})") from None
    if not isinstance(raw, dict) or not all(isinstance(c, dict) for c in raw.values()):
        raise AdapterStateError(f"{path}: metadata 'adapters' must map adapter names to config objects")
    return {n: AdapterConfig.from_dict(c, source=f"{path} adapter {n!r}") for n, c in raw.items()}, metadata
