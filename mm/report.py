"""How many parameters train, per adapter and per layer type, and their share of the whole model."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from torch import nn

from mm.wrap import adapted_layers


@dataclass
class TrainableReport:
    total: int
    trainable: int
    per_adapter: dict[str, int] = field(default_factory=dict)
    per_layer_type: dict[str, int] = field(default_factory=dict)
    layers_per_adapter: dict[str, int] = field(default_factory=dict)

    @property
    def share(self) -> float:
        """Trainable parameters as a fraction of all parameters (adapters included)."""
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        lines = [f"trainable {self.trainable:,} of {self.total:,} parameters ({100 * self.share:.3f}%)"]
        for name, count in self.per_adapter.items():
            lines.append(f"  adapter {name}: {count:,} params on {self.layers_per_adapter[name]} layers")
        for kind, count in self.per_layer_type.items():
            lines.append(f"  on {kind}: {count:,} params")
        return "\n".join(lines)


def _layer_type(model: nn.Module, name: str, base: nn.Module) -> str:
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    from mm.mha import SplitMultiheadAttention

    if isinstance(parent, SplitMultiheadAttention):
        return "MultiheadAttention"
    return type(base).__name__


def trainable_report(model: nn.Module) -> TrainableReport:
    """Counts adapter parameters (all of them, trainable or not) per adapter and per base layer type."""
    params = list({id(p): p for p in model.parameters()}.values())
    report = TrainableReport(
        total=sum(p.numel() for p in params), trainable=sum(p.numel() for p in params if p.requires_grad)
    )
    per_adapter: Counter[str] = Counter()
    per_type: Counter[str] = Counter()
    layers: Counter[str] = Counter()
    for name, layer in adapted_layers(model):
        kind = _layer_type(model, name, layer.base)
        for adapter_name, adapter in layer.adapters.items():
            count = sum(p.numel() for p in adapter.parameters() if p.requires_grad)
            per_adapter[adapter_name] += count
            per_type[kind] += count
            layers[adapter_name] += 1
    report.per_adapter, report.per_layer_type = dict(per_adapter), dict(per_type)
    report.layers_per_adapter = dict(layers)
    return report
