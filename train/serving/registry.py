"""The adapters a server offers: loaded from mmtune adapter files onto the one base model, named as
saved in the file. Files named at start may live anywhere (the operator chose them); files registered
while running must lie inside the configured adapter folders (no ``..`` or symlink escapes)."""

from __future__ import annotations

import threading
from pathlib import Path

from torch import nn

from mm.config import ConfigError
from mm.state import AdapterStateError, load_adapters, read_adapter_file


class AdapterRegistry:
    """name -> file of every adapter attached to ``model``; ``lock`` serialises model changes with forwards."""

    def __init__(self, model: nn.Module, folders: list[str | Path] = (), pool=None) -> None:
        self.model, self.pool = model, pool  # with an mm.AdapterPool, files are registered there, not attached
        self.folders = [Path(f).resolve() for f in folders]
        for folder in self.folders:
            if not folder.is_dir():
                raise ConfigError(f"{folder}: adapter folder does not exist")
        self.files: dict[str, Path] = {}
        self.lock = threading.Lock()

    def names(self) -> list[str]:
        return list(self.files)

    def files_to_load(self, paths: list[str | Path]) -> list[Path]:
        """``paths`` plus the adapter folders' ``*.safetensors`` files, in load order."""
        return [Path(p) for p in paths] + [f for folder in self.folders for f in sorted(folder.glob("*.safetensors"))]

    def load_folders(self) -> list[str]:
        """Every ``*.safetensors`` file of the adapter folders (sorted by name) not registered yet; returns
        the new names."""
        names: list[str] = []
        served = {p.resolve() for p in self.files.values()}
        for folder in self.folders:
            for path in sorted(folder.glob("*.safetensors")):
                if path.resolve() not in served:
                    names += self.register(path)
        return names

    def confined(self, path: str | Path) -> Path:
        """``path`` resolved, if it lies inside one of the adapter folders; else a ConfigError."""
        resolved = Path(path).resolve()
        if not any(resolved.is_relative_to(folder) for folder in self.folders):
            allowed = ", ".join(str(f) for f in self.folders) or "none configured"
            raise ConfigError(f"{path}: not inside the adapter folders ({allowed})")
        return resolved

    def register(self, path: str | Path) -> list[str]:
        """Attach every adapter of the file; a name already served or a file that does not fit the base
        is an error naming the file, and the adapters already served are untouched."""
        path = Path(path)
        configs, _ = read_adapter_file(path)  # bad file: AdapterStateError naming it, before any change
        taken = sorted(set(configs) & set(self.files))
        if taken:
            owners = ", ".join(f"{n!r} from {self.files[n]}" for n in taken)
            raise AdapterStateError(f"{path}: adapter name(s) already served: {owners}")
        loaded: list[str] = []
        with self.lock:
            try:
                for name in configs:
                    if self.pool is not None:
                        self.pool.register(name, path, adapter=name)  # checks the header; loads nothing
                    else:
                        load_adapters(self.model, path, [name])
                    loaded.append(name)
            except Exception:
                from mm.wrap import delete_adapter

                for name in loaded:  # all-or-nothing per file
                    self.pool.unregister(name) if self.pool is not None else delete_adapter(self.model, name)
                raise
        for name in loaded:
            self.files[name] = path
        return loaded
