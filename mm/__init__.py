"""mmtune's adapter core: attach parameter-efficient adapters to any PyTorch model.

    import mm
    mm.attach(model, mm.LoRAConfig(targets=["q_proj", "v_proj"], r=8, alpha=16))
    print(mm.trainable_report(model))
"""

from mm.adapters import ADAPTERS, Adapter, NotMergeableError
from mm.adapters.dora import DoRAConfig
from mm.adapters.lora import LoRAConfig
from mm.compose import merge_adapters
from mm.config import AdapterConfig, ConfigError
from mm.errors import MMTuneError
from mm.hotswap import hotswap_adapter
from mm.layer import AdaptedConv, AdaptedEmbedding, AdaptedLinear
from mm.merge import merge, unmerge
from mm.peft_format import export_peft, import_peft
from mm.pool import AdapterPool, PoolError
from mm.report import TrainableReport, trainable_report
from mm.route import route  # the function: ``with mm.route(...)`` as documented
from mm.state import AdapterStateError, load_adapters, save_adapters
from mm.wrap import (
    AttachError,
    active_adapters,
    adapted_layers,
    adapter_config,
    adapter_names,
    attach,
    delete_adapter,
    disable_adapters,
    select_targets,
    set_active,
)


def list_adapters() -> dict[str, str]:
    """Registered adapter methods: name -> one-line description (the config class's docstring)."""
    return {name: (ADAPTERS.get(name).__doc__ or "").strip().splitlines()[0] for name in ADAPTERS.names()}


__all__ = [
    "ADAPTERS", "Adapter", "AdapterPool", "AdaptedConv", "AdaptedEmbedding", "AdaptedLinear", "AdapterConfig", "AdapterStateError", "AttachError", "ConfigError",
    "MMTuneError",
    "DoRAConfig", "LoRAConfig", "hotswap_adapter", "NotMergeableError", "PoolError", "TrainableReport", "active_adapters", "adapted_layers", "adapter_config",
    "adapter_names", "attach", "delete_adapter", "disable_adapters", "export_peft", "import_peft",
    "list_adapters", "load_adapters", "merge", "merge_adapters", "route", "save_adapters", "select_targets", "set_active",
    "trainable_report", "unmerge",
]
