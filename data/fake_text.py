"""Fake text data in the real formats for tests and demos: a tokenizer folder as ``save_pretrained``
writes it (a word-level ``tokenizers`` model with a chat template), and records written as jsonl,
json, csv, parquet or txt files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SPECIALS = ("<pad>", "<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>")
#: A Zephyr-like template: each turn is "<|role|> content </s>"; a generation prompt opens an assistant turn.
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|> {% endif %}")


def make_tokenizer_folder(folder: str | Path, texts: list[str], *, chat_template: str | None = CHAT_TEMPLATE) -> Path:
    """A ``PreTrainedTokenizerFast`` folder whose lower-cased word vocabulary covers ``texts`` (plus the
    Alpaca prompt's words) with bos/eos/pad/unk and, unless None, ``chat_template``."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    from data.text import ALPACA_PROMPT_INPUT

    pre = pre_tokenizers.Whitespace()
    words = sorted({w for text in [*texts, ALPACA_PROMPT_INPUT] for w, _ in pre.pre_tokenize_str(text.lower())}
                   - set(SPECIALS))
    vocab = {token: i for i, token in enumerate([*SPECIALS, *words])}
    core = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre
    core.add_special_tokens(list(SPECIALS))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                        bos_token="<s>", eos_token="</s>",
                                        additional_special_tokens=list(SPECIALS[4:]))
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    folder = Path(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_records(path: str | Path, records: list[dict[str, Any]]) -> Path:
    """``records`` in the format of ``path``'s suffix: .jsonl, .json (a list), .csv, .parquet, .txt (the
    'text' of each record, paragraphs separated by a blank line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    elif path.suffix == ".json":
        path.write_text(json.dumps(records), encoding="utf-8")
    elif path.suffix == ".txt":
        path.write_text("\n\n".join(r["text"] for r in records) + "\n", encoding="utf-8")
    elif path.suffix in (".csv", ".parquet"):
        import pandas as pd

        frame = pd.DataFrame.from_records(records)
        frame.to_csv(path, index=False) if path.suffix == ".csv" else frame.to_parquet(path, index=False)
    else:
        raise ValueError(f"{path}: unknown suffix")
    return path
