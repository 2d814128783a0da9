"""Combining adapters: PEFT's merging baselines (task arithmetic, TIES, DARE, magnitude pruning, cat, SVD)
and Concrete subspace merging (Tang et al., 2023). Results are plain LoRA adapters of the same model."""

from mm.compose.adapters import METHODS, MergeError, merge_adapters
from mm.compose.concrete import ConcreteConfig, ConcreteResult, entropy_loss
from mm.compose.icm_lora import GeneratorError, LoraGenerator, describe_task
from mm.compose.task_vectors import (
    adapter_task_vectors,
    concrete_merge_adapters,
    concrete_merge_task_vectors,
    state_dict_task_vectors,
)

__all__ = ["GeneratorError", "LoraGenerator", "describe_task",  # ICM-LoRA (icm_lora.py)
    "METHODS", "ConcreteConfig", "ConcreteResult", "MergeError", "adapter_task_vectors", "concrete_merge_adapters",
    "concrete_merge_task_vectors", "entropy_loss", "merge_adapters", "state_dict_task_vectors",
]
