"""The ``multi_adapter_lm`` task: several adapters trained at once on one frozen causal LM, each on its own
data (PEFT #2639, verl #7909; mLoRA does it for text only).

The recipe lists several adapters (``adapters:``) and gives each its own text file (``data.sources``:
adapter name -> file, any kind ``data/text.py`` reads). Every micro-batch holds ``train.batch_size`` rows of
*each* adapter (row j of adapter k is that file's sample j, cycling a shorter file); one forward/backward of
the frozen base trains all of them, each row through its own adapter (``mm.route(row_adapters=...)``,
the gathered kernel of ``mm.batched``). The loss is the sum of the adapters' own mean token losses, so each
adapter's gradient is exactly what training it alone on its rows gives; each adapter is initialised from
the recipe seed and its name alone. Hence the result equals training each adapter alone on the same rows
in the same order (a recipe with that adapter and source only), provided the adapters do not share a
gradient-norm clip (``train.clip_norm`` must be null) and use no dropout.

Logged per step: ``loss_<adapter>``; evaluation (``data.eval_sources``): ``eval_loss_<adapter>``. The
final ``adapters.safetensors`` holds every adapter under its name (``mm.load_adapters(..., names=[k])``,
``mm.AdapterPool.register(k, path, adapter=k)``).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

import mm
from data.text import IGNORE_INDEX, TextCollator, TextDataset
from data.text_files import BUILDERS
from train.engine.task import TASKS, AdapterTask


@dataclass
class MultiModelConfig:
    path: str | None = field(default=None, metadata={
        "help": "Local folder of a transformers causal LM (null: a tiny Llama from the sizes below)."})
    tokenizer: str | None = field(default=None, metadata={
        "help": "Tokenizer folder or tokenizer.json (null: model.path's; with neither, a word-level one built "
                "from every source, saved as <out_dir>/tokenizer.json)."})
    hidden_size: int = field(default=32, metadata={"help": "Tiny model: hidden size."})
    intermediate_size: int = field(default=64, metadata={"help": "Tiny model: MLP width."})
    layers: int = field(default=2, metadata={"help": "Tiny model: decoder layers."})
    heads: int = field(default=4, metadata={"help": "Tiny model: attention heads."})


@dataclass
class MultiDataConfig:
    sources: dict[str, str] = field(default_factory=dict, metadata={
        "help": "Adapter name -> its training file (.jsonl, .json, .csv, .parquet, .txt); one per adapter."})
    eval_sources: dict[str, str] = field(default_factory=dict, metadata={
        "help": "Adapter name -> held-out file (optional; adapters without one are not evaluated)."})
    seq_len: int = field(default=32, metadata={"help": "Tokens per sequence (corpora are packed to it)."})


class _Groups:
    """Item j: (sample j of each adapter's dataset, cycling shorter ones): one row of every adapter."""

    def __init__(self, datasets: dict[str, TextDataset]) -> None:
        self.datasets = datasets

    def __len__(self) -> int:
        return max(len(d) for d in self.datasets.values())

    def __getitem__(self, j: int) -> dict[str, dict]:
        return {name: d[j % len(d)] for name, d in self.datasets.items()}


@TASKS.register("multi_adapter_lm")
class MultiAdapterLM(AdapterTask):
    """Several adapters on one frozen causal LM, each trained on its own data, all in one forward/backward."""

    sections: ClassVar[dict[str, type]] = {"model": MultiModelConfig, "data": MultiDataConfig}

    def __init__(self, recipe: Any) -> None:
        super().__init__(recipe)
        self.names = list(recipe.adapters)
        self.tokenizer = self._tokenizer()
        self._datasets: dict[str, TextDataset] = {}
        self.train_dataset(), self.eval_dataset()  # bad data fails before the model is built
        with self.seeded():
            self.lm = self._load_base()
        for name, config in recipe.adapters.items():
            # Each adapter's init depends on the seed and its own name only: alone or together, it starts equal.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(recipe.seed + zlib.crc32(name.encode()))
                mm.attach(self.lm, config, name)

    @classmethod
    def validate(cls, recipe: Any) -> None:
        data, source = recipe.data, recipe.source
        names = list(recipe.adapters)
        if not names:
            raise mm.ConfigError(f"{source}: key 'adapters': list at least one adapter")
        if sorted(data.sources) != sorted(names):
            raise mm.ConfigError(f"{source}: key 'data.sources' names {sorted(data.sources)}; expected one file per "
                                 f"adapter of 'adapters': {sorted(names)}")
        unknown = sorted(set(data.eval_sources) - set(names))
        if unknown:
            raise mm.ConfigError(f"{source}: key 'data.eval_sources' names {unknown}, which are not adapters {names}")
        for key, files in (("sources", data.sources), ("eval_sources", data.eval_sources)):
            for name, path in files.items():
                if Path(path).suffix not in BUILDERS:
                    raise mm.ConfigError(f"{source}: key 'data.{key}.{name}': {path} is not one of {', '.join(BUILDERS)}")
                if not Path(path).is_file():
                    raise mm.ConfigError(f"{source}: key 'data.{key}.{name}': no such file {path}")
        if data.seq_len < 2:
            raise mm.ConfigError(f"{source}: key 'data.seq_len' must be >= 2, got {data.seq_len}")
        if recipe.train.clip_norm:
            raise mm.ConfigError(f"{source}: key 'train.clip_norm' must be null for multi_adapter_lm: one global "
                                 "gradient norm would couple the adapters' updates")

    def _tokenizer(self) -> Any:
        from encoders.llm import load_tokenizer, word_tokenizer
        from mm.state import atomic_write

        cfg, data = self.recipe.model, self.recipe.data
        if cfg.tokenizer or cfg.path:
            return load_tokenizer(cfg.tokenizer or cfg.path)
        saved = self.recipe.out_dir / "tokenizer.json"
        if saved.is_file():  # a resumed run keeps the ids its model learned
            return load_tokenizer(str(saved))
        from data.text import read_texts

        files = [*data.sources.values(), *data.eval_sources.values()]
        tokenizer = word_tokenizer([t for path in files for t in read_texts(path)])
        atomic_write(saved, lambda tmp: tokenizer.backend_tokenizer.save(tmp))
        return tokenizer

    def _load_base(self) -> nn.Module:
        from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

        cfg = self.recipe.model
        if cfg.path:
            return AutoModelForCausalLM.from_pretrained(cfg.path, dtype=torch.float32)
        config = LlamaConfig(vocab_size=len(self.tokenizer), hidden_size=cfg.hidden_size,
                             intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.layers,
                             num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
                             max_position_embeddings=max(64, self.recipe.data.seq_len))
        return LlamaForCausalLM(config)

    def _dataset(self, path: str) -> TextDataset:
        if path not in self._datasets:
            self._datasets[path] = TextDataset(path, self.tokenizer, self.recipe.data.seq_len)
        return self._datasets[path]

    def train_dataset(self) -> Sequence[dict]:
        return _Groups({name: self._dataset(self.recipe.data.sources[name]) for name in self.names})

    def eval_dataset(self) -> Sequence[dict] | None:
        files = self.recipe.data.eval_sources
        return _Groups({n: self._dataset(files[n]) for n in self.names if n in files}) if files else None

    def collate(self, samples: list[dict[str, dict]]) -> dict[str, Any]:
        """Rows adapter by adapter (all of the first adapter's, then the next...), padded together."""
        names = list(samples[0])
        rows = [group[name] for name in names for group in samples]
        pad = self.tokenizer.pad_token_id
        batch = TextCollator(pad if pad is not None else 0)(rows)
        batch["row_adapters"] = [name for name in names for _ in samples]
        return batch

    def adapter_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Each adapter's mean token loss over its own rows, from one forward of the whole mixed batch."""
        with mm.route(row_adapters=batch["row_adapters"]):
            logits = self.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits, target = logits[:, :-1].float(), batch["labels"][:, 1:]
        token_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                     ignore_index=IGNORE_INDEX, reduction="none").view(target.shape)
        counted = (target != IGNORE_INDEX).float()
        losses = {}
        for name in dict.fromkeys(batch["row_adapters"]):  # a handful of adapters: sums over their rows
            rows = torch.tensor([n == name for n in batch["row_adapters"]], device=counted.device)
            losses[name] = (token_loss[rows] * counted[rows]).sum() / counted[rows].sum().clamp(min=1)
        return losses

    def training_step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        losses = self.adapter_losses(batch)
        return sum(losses.values()), {f"loss_{name}": float(loss.detach()) for name, loss in losses.items()}

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict[str, Any]]) -> dict[str, float]:
        totals: dict[str, list[float]] = {}
        for batch in batches:
            for name, loss in self.adapter_losses(batch).items():
                totals.setdefault(name, []).append(float(loss))
        return {f"eval_loss_{name}": sum(v) / len(v) for name, v in totals.items()}
