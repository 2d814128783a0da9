"""Accelerate and DeepSpeed set-up for the loop: one process, DDP, DeepSpeed ZeRO-2/3 or FSDP2, on GPUs or
on the CPU (gloo). Kept apart from the loop so that the loop reads as training, not plumbing.

FSDP2 comes from ``accelerate launch`` with an FSDP config (configs/accelerate/fsdp2.yaml); its parameters
are DTensors, each rank holding a slice, so reading an adapter (save, rank check) gathers the full tensors
first and writing one (resume) scatters them (see ``gathered`` and ``loading``).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mm.config import ConfigError
from train.engine.config import Recipe

REPO_ROOT = Path(__file__).resolve().parents[2]


def launched_distributed() -> bool:
    """Whether a launcher (torchrun, accelerate launch, deepspeed) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or "LOCAL_RANK" in os.environ


def stop_with_launcher() -> None:
    """Have the kernel send this worker SIGTERM when its launcher process dies, even by SIGKILL (Linux).

    torch elastic starts each worker in a session of its own, so killing the launcher's process group
    (a scheduler cancelling the job, ``kill -9 -PGID``) misses the workers: they would train on, orphaned,
    holding the devices. The launchers forward catchable signals; this covers the uncatchable one.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM))
        if os.getppid() == 1:  # the launcher died before the request above was in place
            os.kill(os.getpid(), signal.SIGTERM)


def deepspeed_config(recipe: Recipe, base: dict[str, Any]) -> dict[str, Any]:
    """The DeepSpeed JSON ``base`` with the values the recipe owns filled in.

    The files in configs/deepspeed/ say "auto" for batch size, accumulation, clipping and precision:
    the recipe decides those, so a launcher config never disagrees with the recipe.
    """
    config = dict(base)
    t = recipe.train
    config["train_micro_batch_size_per_gpu"] = t.batch_size
    config["gradient_accumulation_steps"] = t.grad_accum
    config["gradient_clipping"] = float(t.clip_norm) if t.clip_norm else 0.0
    config["bf16"] = {**config.get("bf16", {}), "enabled": t.precision == "bf16"}
    config.pop("train_batch_size", None)  # DeepSpeed derives it from the two above and the world size
    # The loop builds a torch optimizer (or bitsandbytes' 8-bit AdamW); ZeRO wraps it.
    config.setdefault("zero_allow_untested_optimizer", True)
    if "optimizer" in config or "scheduler" in config:
        raise ConfigError(f"{deepspeed_file(recipe)}: remove 'optimizer'/'scheduler'; the recipe's optim "
                          "section defines them")
    return config


def make_accelerator(recipe: Recipe):
    """An ``Accelerator`` for the recipe: DeepSpeed if ``train.deepspeed`` (or ``accelerate launch``'s
    config) asks for it, DDP when launched with several processes, else one process."""
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.utils import InitProcessGroupKwargs

    t = recipe.train
    kwargs: dict[str, Any] = {}
    if launched_distributed() and not torch.cuda.is_available():
        # Without this accelerate picks no backend for DeepSpeed on the CPU (shared ENVIRONMENT.md).
        kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
    ds_file = deepspeed_file(recipe)
    fsdp_plugin = _fsdp_plugin(recipe) if fsdp_requested() else None
    if fsdp_plugin is not None and ds_file:
        raise ConfigError(f"{recipe.source}: pick one engine: train.deepspeed is set but accelerate launch asked "
                          "for FSDP")
    if fsdp_plugin is not None:
        kwargs["fsdp_plugin"] = fsdp_plugin
    if ds_file:
        if not launched_distributed():
            raise ConfigError(f"{recipe.source}: DeepSpeed needs a launcher: scripts/launch_deepspeed.sh "
                              "<recipe> <processes> (or scripts/launch_accelerate.sh with a zero config)")
        if not torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true"):
            raise ConfigError("ACCELERATE_USE_CPU=1 makes accelerate ignore DeepSpeed; unset it for DeepSpeed runs")
        config = deepspeed_config(recipe, _read_json(ds_file, recipe))
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=config)
    else:
        kwargs["gradient_accumulation_steps"] = t.grad_accum
        kwargs["mixed_precision"] = "bf16" if t.precision == "bf16" else "no"
    if not launched_distributed():
        # accelerate keeps its state in process-wide singletons; a second run in one process (tests,
        # notebooks) with other settings must start from scratch.
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    if launched_distributed():
        stop_with_launcher()
    accelerator = Accelerator(**kwargs)
    if fsdp_plugin is not None:
        _enable_fsdp_on_cpu(accelerator, fsdp_plugin)
    return accelerator


def fsdp_requested() -> bool:
    """Whether ``accelerate launch`` was given an FSDP config (it exports ACCELERATE_USE_FSDP=true)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def _fsdp_plugin(recipe: Recipe):
    """accelerate's FSDP plugin from the FSDP_* variables ``accelerate launch`` exported; FSDP2 only."""
    from accelerate import FullyShardedDataParallelPlugin

    if not launched_distributed():
        raise ConfigError(f"{recipe.source}: FSDP needs a launcher: scripts/launch_accelerate.sh <recipe> "
                          "<processes> fsdp2")
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise ConfigError(f"accelerate config: key 'fsdp_config.fsdp_version' must be 2 (mmtune shards with "
                          f"FSDP2 only), got {version}")
    return FullyShardedDataParallelPlugin(fsdp_version=2)


def _enable_fsdp_on_cpu(accelerator, plugin) -> None:
    """Turn FSDP on where accelerate would not: without a GPU.

    accelerate's ``AcceleratorState`` selects FSDP only for GPU-like process groups (MULTI_GPU, MULTI_NPU,
    ...); on CPU processes over gloo it stays at NO / MULTI_CPU and silently ignores the plugin. PyTorch's
    ``fully_shard`` itself runs on a gloo CPU mesh, and accelerate's FSDP2 preparation uses nothing
    GPU-specific, so the state is switched to FSDP here: CPU runs (tests, CI) then exercise the same
    sharded code path as a GPU run.
    """
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return
    if torch.cuda.is_available():
        raise ConfigError(f"accelerate did not enable FSDP (distributed type {accelerator.distributed_type}); "
                          "launch with scripts/launch_accelerate.sh <recipe> <processes> fsdp2")
    if accelerator.mixed_precision != "no":  # what accelerate does when it selects FSDP itself
        plugin.set_mixed_precision(accelerator.mixed_precision)
    from accelerate.state import PartialState

    # Both shared states: every new AcceleratorState() copies PartialState's fields over its own.
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin


def is_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def setup_name(accelerator) -> str:
    """How the run is spread, for summary.json: single, ddp, fsdp2 or deepspeed-zeroN."""
    if is_deepspeed(accelerator):
        return f"deepspeed-zero{zero_stage(accelerator)}"
    if is_fsdp(accelerator):
        return "fsdp2"
    return "ddp" if accelerator.num_processes > 1 else "single"


def cuda_peak_mib(accelerator) -> float | None:
    """This rank's CUDA allocator peak so far in MiB (summary.json, bench_train_scaling), None off the GPU."""
    if accelerator.device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(accelerator.device) / 2**20


def before_prepare(accelerator, task: nn.Module) -> None:
    """FSDP2: shard each transformer block of a Hugging Face model inside ``task`` as its own unit (the
    blocks its ``_no_split_modules`` names), so a forward gathers one block at a time, not the model."""
    if not is_fsdp(accelerator):
        return
    plugin = accelerator.state.fsdp_plugin
    if plugin.transformer_cls_names_to_wrap is None:
        plugin.transformer_cls_names_to_wrap = fsdp_unit_classes(task) or None


def fsdp_unit_classes(task: nn.Module) -> list[str]:
    """Class names of the blocks to shard one by one: what the Hugging Face models inside ``task`` list
    in ``_no_split_modules`` (their transformer layers)."""
    names = {name for module in task.modules() for name in (getattr(module, "_no_split_modules", None) or [])}
    present = {type(module).__name__ for module in task.modules()}
    return sorted(names & present)


def after_prepare(accelerator, task: nn.Module) -> None:
    """FSDP2 gathers a unit's parameters around its ``forward`` only; the loop also calls the task's
    ``evaluate``, which uses the model through other methods: register it as a forward method too."""
    if not is_fsdp(accelerator):
        return
    from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method

    if isinstance(task, FSDPModule):
        register_fsdp_forward_method(task, "evaluate")


def deepspeed_file(recipe: Recipe) -> str | None:
    """The DeepSpeed JSON to use: the recipe's ``train.deepspeed``, else the one ``accelerate launch``
    was given (its config names it in ``deepspeed_config_file``), else None."""
    if recipe.train.deepspeed:
        return recipe.train.deepspeed
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return None
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if not path or path == "none":
        raise ConfigError("accelerate launch asked for DeepSpeed without a JSON: set deepspeed_config_file "
                          "in the accelerate config (see configs/accelerate/zero2.yaml)")
    if not Path(path).is_absolute() and not Path(path).exists() and (REPO_ROOT / path).is_file():
        # configs/accelerate/*.yaml name their JSON relative to the repository; the launchers run in the
        # caller's folder.
        return str(REPO_ROOT / path)
    return path


def _read_json(path: str, recipe: Recipe) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{recipe.source}: DeepSpeed config {path}: cannot read it ({err})") from None


def is_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def zero_stage(accelerator) -> int:
    if not is_deepspeed(accelerator):
        return 0
    return int(accelerator.state.deepspeed_plugin.zero_stage)


@contextlib.contextmanager
def gathered(accelerator, params: list[nn.Parameter], owner: nn.Module | None = None) -> Iterator[None]:
    """Inside the block every rank holds the full ``params`` (read-only): ZeRO-3 partitions them between
    ranks (a rank alone sees shape [0]) and FSDP2 keeps a slice per rank as a DTensor, so saving without
    this gathers nothing. FSDP2 needs ``owner``, the module holding ``params``. No-op for other set-ups."""
    if zero_stage(accelerator) == 3 and params:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
    elif is_fsdp(accelerator) and params:
        if owner is None:
            raise TypeError("gathered: FSDP2 needs the module that owns the parameters (owner=)")
        with _full_tensors_swapped_in(owner, params):
            yield
    else:
        yield


@contextlib.contextmanager
def _full_tensors_swapped_in(owner: nn.Module, params: list[nn.Parameter]) -> Iterator[None]:
    """Replace each sharded (DTensor) parameter of ``params`` in its module by its gathered full tensor,
    and put the shard back afterwards. Only ``params`` are gathered (the adapters, not the frozen base),
    unlike ``FSDPModule.unshard``, which would gather every weight of the model at once."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    wanted = {id(p) for p in params}
    slots = [(module, name) for module in owner.modules() for name, param in module._parameters.items()
             if param is not None and id(param) in wanted]
    for module in owner.modules():
        if isinstance(module, FSDPModule):
            # A unit left gathered (the root after a forward) would re-shard itself in state_dict()'s
            # pre-hook and put the DTensors back; re-shard first so that hook finds nothing to do.
            module.reshard()
    swapped = []
    try:
        for module, name in slots:  # the same slots now hold the shards (new objects)
            param = module._parameters[name]
            if isinstance(param, DTensor):
                full = nn.Parameter(param.detach().full_tensor(), requires_grad=param.requires_grad)
                module._parameters[name] = full  # bypasses __setattr__: FSDP's hooks stay as they are
                swapped.append((module, name, param))
        yield
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param


def loading(accelerator) -> contextlib.AbstractContextManager:
    """Copying full tensors from a file into the model's parameters (``param.copy_(full)``) inside this
    block works under FSDP2 too: each rank keeps its own slice of the full tensor. No-op otherwise."""
    if not is_fsdp(accelerator):
        return contextlib.nullcontext()
    from torch.distributed.tensor.experimental import implicit_replication

    return implicit_replication()


def all_ranks_agree(accelerator, flag: bool) -> bool:
    """True when ``flag`` holds on every process (one tiny all-reduce)."""
    if accelerator.num_processes == 1:
        return flag
    value = torch.tensor([0.0 if flag else 1.0], device=accelerator.device)
    return float(accelerator.reduce(value, "sum")) == 0.0


def rank_disagreement(accelerator, params: list[nn.Parameter]) -> float:
    """Largest difference between any rank's and rank 0's fingerprint of ``params`` (0.0: they agree).

    A fingerprint is (sum, sum of squares, a position-weighted sum) per tensor in float64: replicas
    that drifted apart (a missed all-reduce, a rank-dependent init) show up as a non-zero value.
    """
    if accelerator.num_processes == 1:
        return 0.0
    from torch.distributed.tensor import DTensor

    # FSDP2's DTensors are gathered one by one below; ZeRO-3 gathers through ``gathered``.
    with contextlib.nullcontext() if is_fsdp(accelerator) else gathered(accelerator, params):
        rows = []
        for p in params:
            full = p.detach().full_tensor() if isinstance(p, DTensor) else p.detach()  # FSDP2: gather the slices
            flat = full.double().flatten()
            weights = torch.cos(torch.arange(flat.numel(), device=flat.device, dtype=torch.float64))
            rows.append(torch.stack([flat.sum(), flat.square().sum(), (flat * weights).sum()]))
        fingerprint = torch.stack(rows).to(accelerator.device)
    everyone = accelerator.gather(fingerprint.unsqueeze(0))  # (ranks, tensors, 3)
    return float((everyone - everyone[0:1]).abs().max())


def validate_deepspeed_config(path: str | Path) -> dict[str, Any]:
    """A configs/deepspeed JSON: readable, a known ZeRO stage, and no optimizer/scheduler of its own."""
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: not a readable JSON file ({err})") from None
    stage = config.get("zero_optimization", {}).get("stage")
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{path}: key 'zero_optimization.stage' must be 0-3, got {stage!r}")
    for key in ("optimizer", "scheduler"):
        if key in config:
            raise ConfigError(f"{path}: remove key {key!r}; the recipe's optim section defines it")
    return config


def validate_accelerate_config(path: str | Path) -> Any:
    """A configs/accelerate YAML: accelerate itself parses it (unknown keys are its error); a DeepSpeed one
    must name an existing configs/deepspeed JSON (paths are relative to the repository root)."""
    from accelerate.commands.config.config_args import ClusterConfig

    try:
        config = ClusterConfig.from_yaml_file(str(path))
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{path}: {err}") from None
    if str(config.distributed_type) in ("DEEPSPEED", "DistributedType.DEEPSPEED"):
        ds_file = (config.deepspeed_config or {}).get("deepspeed_config_file")
        root = Path(path).resolve().parents[2]
        if not ds_file or not (root / ds_file).is_file():
            raise ConfigError(f"{path}: key 'deepspeed_config.deepspeed_config_file' must name an existing "
                              f"JSON relative to {root}, got {ds_file!r}")
        validate_deepspeed_config(root / ds_file)
    if str(config.distributed_type) in ("FSDP", "DistributedType.FSDP"):
        version = (config.fsdp_config or {}).get("fsdp_version")
        if version != 2:
            raise ConfigError(f"{path}: key 'fsdp_config.fsdp_version' must be 2 (mmtune shards with FSDP2 only), "
                              f"got {version!r}")
    return config
