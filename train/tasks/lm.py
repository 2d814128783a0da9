"""The ``causal_lm`` task: a transformers causal LM (a tiny Llama from the sizes below, or loaded from a
local folder) on the user's text (``data.train``: a corpus, instruction or chat file, see data/text.py)
or, without one, on generated arithmetic sequences.

The tokenizer comes from ``model.tokenizer``, else ``model.path``'s folder; with neither (a tiny model on
text) a word-level one is built from the data and saved as ``<out_dir>/tokenizer.json``, which a resumed
run reads back."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

import mm
from data.text import IGNORE_INDEX, KINDS, TextCollator, TextDataset
from data.text_files import BUILDERS
from train.engine.task import TASKS, AdapterTask


@dataclass
class LMModelConfig:
    path: str | None = field(
        default=None, metadata={"help": "Local folder of a transformers causal LM (null: a tiny Llama "
                                        "built from the sizes below, random init from the recipe seed)."})
    tokenizer: str | None = field(
        default=None, metadata={"help": "Tokenizer folder or tokenizer.json (null: model.path's own; with no "
                                        "model.path, a word-level one built from data.train/data.eval)."})
    vocab_size: int = field(default=64, metadata={"help": "Tiny model: vocabulary size."})
    hidden_size: int = field(default=32, metadata={"help": "Tiny model: hidden size."})
    intermediate_size: int = field(default=64, metadata={"help": "Tiny model: MLP width."})
    layers: int = field(default=2, metadata={"help": "Tiny model: decoder layers."})
    heads: int = field(default=4, metadata={"help": "Tiny model: attention heads."})
    kv_heads: int = field(default=2, metadata={"help": "Tiny model: key/value heads."})


@dataclass
class LMDataConfig:
    train: str | None = field(default=None, metadata={
        "help": "Local text data (.jsonl, .json, .csv, .parquet, .txt): a corpus ('text'), instructions "
                "('prompt'/'completion' or Alpaca fields) or chat ('messages'); null: generated sequences."})
    eval: str | None = field(default=None, metadata={"help": "Held-out file of the same kind (null: none)."})
    kind: Literal["auto", "text", "instruct", "chat"] = field(default="auto", metadata={
        "help": "Record kind (auto: from the columns)."})
    pack: bool = field(default=True, metadata={
        "help": "Corpus: pack documents (EOS between) into seq_len blocks; false: one truncated sample each."})
    on_bad: Literal["error", "skip"] = field(default="error", metadata={
        "help": "A bad record is an error naming its line, or skipped and counted."})
    seq_len: int = field(default=16, metadata={"help": "Tokens per sequence (longer samples are cut, counted)."})
    train_size: int = field(default=512, metadata={"help": "Generated training sequences (no data.train)."})
    eval_size: int = field(default=64, metadata={"help": "Generated evaluation sequences."})
    strides: list[int] = field(default_factory=lambda: [1, 2, 3],
                               metadata={"help": "Each sequence counts up by one of these, modulo the vocab."})
    seed: int = field(default=0, metadata={"help": "Seed of the generated data."})


class ArithmeticSequences:
    """``{"input_ids": (seq_len,)}`` samples: ``start + stride * i (mod vocab)``. The next token follows
    from the two before it, so a small LM learns it and its loss has a known floor of 0."""

    def __init__(self, size: int, seq_len: int, vocab: int, strides: list[int], seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, vocab, (size, 1), generator=gen)
        stride = torch.tensor(strides)[torch.randint(0, len(strides), (size, 1), generator=gen)]
        self.tokens = (starts + stride * torch.arange(seq_len)) % vocab

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.tokens[i]}


@TASKS.register("causal_lm")
class CausalLM(AdapterTask):
    """Next-token prediction with an adapted (optionally 4/8-bit quantised) transformers causal LM."""

    sections: ClassVar[dict[str, type]] = {"model": LMModelConfig, "data": LMDataConfig}

    def __init__(self, recipe: Any) -> None:
        super().__init__(recipe)
        self.tokenizer = self._tokenizer() if recipe.data.train else None
        self._datasets: dict[str, TextDataset] = {}
        if recipe.data.train:  # bad data fails before a large model is loaded
            self.train_dataset(), self.eval_dataset()
        with self.seeded():
            self.lm = self.adapt(self._load_base())
        rows = self.lm.get_input_embeddings().num_embeddings
        if self.tokenizer is not None and len(self.tokenizer) > rows:
            raise mm.ConfigError(f"{recipe.source}: key 'model.tokenizer': the tokenizer has {len(self.tokenizer)} "
                                 f"tokens but the model's embedding has {rows} rows; use the model's own tokenizer")

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

        texts = [t for path in (data.train, data.eval) if path for t in read_texts(path, data.kind)]
        tokenizer = word_tokenizer(texts)
        atomic_write(saved, lambda tmp: tokenizer.backend_tokenizer.save(tmp))
        return tokenizer

    def _load_base(self) -> nn.Module:
        from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

        cfg, quant = self.recipe.model, self.recipe.quant
        if cfg.path and quant.mode != "none":  # load straight into 4/8 bits: no full-precision copy
            from train.engine.quant import bnb_config, load_device

            return AutoModelForCausalLM.from_pretrained(
                cfg.path, quantization_config=bnb_config(quant), device_map={"": load_device()})
        if cfg.path:
            return AutoModelForCausalLM.from_pretrained(cfg.path, dtype=torch.float32)
        vocab = len(self.tokenizer) if self.tokenizer is not None else cfg.vocab_size
        config = LlamaConfig(vocab_size=vocab, hidden_size=cfg.hidden_size,
                             intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.layers,
                             num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
                             max_position_embeddings=max(64, self.recipe.data.seq_len))
        return LlamaForCausalLM(config)

    @classmethod
    def validate(cls, recipe: Any) -> None:
        data, source = recipe.data, recipe.source
        if data.seq_len < 2 or data.train_size < 1 or data.eval_size < 1:
            raise mm.ConfigError(f"{source}: keys 'data.seq_len' (>= 2), 'data.train_size' and "
                                 f"'data.eval_size' (>= 1) are out of range")
        if not data.strides:
            raise mm.ConfigError(f"{source}: key 'data.strides' needs at least one stride")
        for key in ("train", "eval"):
            path = getattr(data, key)
            if key == "eval" and path and not data.train:
                raise mm.ConfigError(f"{source}: key 'data.eval' is set but 'data.train' is not")
            if path and Path(path).suffix not in BUILDERS:
                raise mm.ConfigError(f"{source}: key 'data.{key}': {path} is not one of {', '.join(BUILDERS)}")
            if path and not Path(path).is_file():
                raise mm.ConfigError(f"{source}: key 'data.{key}': no such file {path}")
        if data.kind not in ("auto", *KINDS):
            raise mm.ConfigError(f"{source}: key 'data.kind' is {data.kind!r}; expected auto, {', '.join(KINDS)}")

    def training_step(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        out = self.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        return out.loss, {}

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict]) -> dict[str, float]:
        """Loss, perplexity and next-token accuracy over the target tokens (labels other than -100)."""
        loss_sum, correct, count = 0.0, 0, 0
        for batch in batches:
            logits = self.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logits, target = logits[:, :-1].float(), batch["labels"][:, 1:]
            loss_sum += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                        ignore_index=IGNORE_INDEX, reduction="sum").item()
            counted = target != IGNORE_INDEX
            correct += int(((logits.argmax(-1) == target) & counted).sum())
            count += int(counted.sum())
        loss = loss_sum / max(count, 1)
        return {"loss": loss, "perplexity": float(torch.tensor(loss).exp()), "next_token_accuracy": correct / max(count, 1)}

    def collate(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        pad = self.tokenizer.pad_token_id if self.tokenizer is not None else None
        return TextCollator(pad if pad is not None else 0)(samples)  # padded positions carry no loss

    def text_dataset(self, path: str) -> TextDataset:
        if path not in self._datasets:
            d = self.recipe.data
            dataset = TextDataset(path, self.tokenizer, d.seq_len, kind=d.kind, pack=d.pack, on_bad=d.on_bad)
            print(dataset.summary())  # truncation and skips are said, never silent
            self._datasets[path] = dataset
        return self._datasets[path]

    def _vocab(self) -> int:
        return int(self.lm.config.vocab_size)

    def train_dataset(self) -> Sequence[dict]:
        d = self.recipe.data
        if d.train:
            return self.text_dataset(d.train)
        return ArithmeticSequences(d.train_size, d.seq_len, self._vocab(), d.strides, d.seed)

    def eval_dataset(self) -> Sequence[dict] | None:
        d = self.recipe.data
        if d.train:
            return self.text_dataset(d.eval) if d.eval else None
        return ArithmeticSequences(d.eval_size, d.seq_len, self._vocab(), d.strides, d.seed + 1)
