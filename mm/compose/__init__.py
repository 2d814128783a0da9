"""Combining adapters: PEFT's merging baselines (task arithmetic, TIES, DARE, magnitude pruning, cat, SVD)
and Concrete subspace merging (Tang et al., 2023). Results are plain LoRA adapters of the same model."""

from mm.compose.adapters import METHODS, MergeError, merge_adapters

__all__ = ["METHODS", "MergeError", "merge_adapters"]
