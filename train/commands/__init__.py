"""Subcommands of ``mmtune``, in the order ``--help`` lists them (one module each in this package)."""

COMMANDS = ["adapters", "demo", "fewshot", "train", "federate", "eval", "cluster", "generate", "merge", "generate_lora", "transfer", "limits", "serve"]
