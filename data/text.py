"""Text data for causal-LM fine-tuning from local files (jsonl, json, csv, parquet, txt via ``datasets``).

Three kinds of records, told apart by their columns (or named by ``kind``):

- ``text``: a plain-text corpus, column ``text`` (a ``.txt`` file: one document per paragraph). Packed:
  documents joined with the tokenizer's EOS token between them and cut into ``seq_len`` blocks; the
  loss covers every token. The tail shorter than a block is dropped and counted.
- ``instruct``: ``prompt``/``completion``, or Alpaca's ``instruction``/``input``/``output`` (rendered
  with Alpaca's prompt). The loss covers the completion and its EOS token only.
- ``chat``: ``messages``, a list of ``{"role": system|user|assistant, "content": str}`` rendered with
  the tokenizer's own chat template. The loss covers the assistant turns only (their characters in the
  rendered text, mapped to tokens through the tokenizer's offsets).

Samples are ``{"input_ids", "labels"}`` (labels -100 where no loss). Instruction and chat samples longer
than ``seq_len`` are cut and counted; one left without a single target token is dropped and counted.
``stats`` holds the counts and ``summary()`` says them in one line.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from data.text_files import TextDataError, load_table, record_lines, where

IGNORE_INDEX = -100
KINDS = ("text", "instruct", "chat")
ROLES = ("system", "user", "assistant")
ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                 "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                       "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                       "{instruction}\n\n### Input:\n{input}\n\n### Response:\n")

__all__ = ["IGNORE_INDEX", "KINDS", "TextDataError", "TextDataset", "TextCollator", "detect_kind", "read_texts"]


def detect_kind(columns: list[str], path: Path, kind: str = "auto") -> str:
    """The record kind of a table with ``columns``; a wrong or undecidable one names what was expected."""
    needs = {"chat": [["messages"]], "instruct": [["prompt", "completion"], ["instruction", "output"]],
             "text": [["text"]]}
    if kind != "auto":
        if kind not in needs:
            raise TextDataError(f"{path}: unknown data kind {kind!r}; expected auto, {', '.join(KINDS)}")
        if not any(all(c in columns for c in option) for option in needs[kind]):
            wanted = " or ".join("+".join(option) for option in needs[kind])
            raise TextDataError(f"{path}: kind {kind!r} needs column(s) {wanted}; the file has {columns}")
        return kind
    for name in ("chat", "instruct", "text"):
        if any(all(c in columns for c in option) for option in needs[name]):
            return name
    raise TextDataError(f"{path}: cannot tell the data kind from columns {columns}; expected 'text' (a corpus), "
                        "'prompt'+'completion' or Alpaca 'instruction'+'output' (instructions), or 'messages' (chat)")


def _string(record: dict, key: str, place: str, *, optional: bool = False) -> str:
    value = record.get(key)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise TextDataError(f"{place}: key {key!r} must be a string, got {type(value).__name__}")
    return value


def instruct_pair(record: dict, place: str) -> tuple[str, str]:
    """(prompt, completion) of a prompt/completion or Alpaca record."""
    if "prompt" in record and record.get("prompt") is not None:
        prompt, completion = _string(record, "prompt", place), _string(record, "completion", place)
    else:
        instruction = _string(record, "instruction", place)
        extra = _string(record, "input", place, optional=True)
        template = ALPACA_PROMPT_INPUT if extra.strip() else ALPACA_PROMPT
        prompt, completion = template.format(instruction=instruction, input=extra), _string(record, "output", place)
    if not completion.strip():
        raise TextDataError(f"{place}: empty completion")
    return prompt, completion


def chat_messages(record: dict, place: str) -> list[dict[str, str]]:
    """The ``messages`` list, checked: role/content strings, known roles, at least one assistant turn."""
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise TextDataError(f"{place}: key 'messages' must be a non-empty list of {{role, content}} objects, "
                            f"got {type(messages).__name__}")
    for k, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise TextDataError(f"{place}: key 'messages[{k}]' needs string 'role' and 'content', got {message!r}")
        if message["role"] not in ROLES:
            raise TextDataError(f"{place}: key 'messages[{k}].role' is {message['role']!r}; expected one of "
                                f"{', '.join(ROLES)}")
    if not any(m["role"] == "assistant" for m in messages):
        raise TextDataError(f"{place}: key 'messages' has no assistant turn (nothing to learn)")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def assistant_spans(tokenizer: Any, messages: list[dict[str, str]], place: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns (each with whatever the
    template closes a turn with, e.g. its end-of-turn token)."""
    def render(turns: list[dict[str, str]], prompt: bool) -> str:
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=prompt)

    try:
        full = render(messages, False)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before, through = render(messages[:i], True), render(messages[: i + 1], False)
            if not (through.startswith(before) and full.startswith(through)):
                raise TextDataError(f"{place}: the tokenizer's chat template renders a conversation's start "
                                    "differently from the whole, so assistant turns cannot be located")
            spans.append((len(before), len(through)))
    except TextDataError:
        raise
    except Exception as err:  # a jinja error inside the template
        raise TextDataError(f"{place}: the tokenizer's chat template failed ({type(err).__name__}: {err})") from None
    return full, spans


def tokenize_chat(tokenizer: Any, messages: list[dict[str, str]], place: str) -> tuple[list[int], list[int], int]:
    """(ids, labels on the assistant turns' tokens, number of tokens before the last assistant turn)."""
    full, spans = assistant_spans(tokenizer, messages, place)
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, starts = encoded["input_ids"], [begin for begin, _ in encoded["offset_mapping"]]
    labels = [token if any(start <= begin < end for start, end in spans) else IGNORE_INDEX
              for token, begin in zip(ids, starts, strict=True)]
    return ids, labels, sum(begin < spans[-1][0] for begin in starts)


def tokenize_instruct(tokenizer: Any, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """bos (if the tokenizer adds one) + prompt + completion + eos; labels only on completion + eos."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    answer = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids + answer, [IGNORE_INDEX] * len(prompt_ids) + answer


@dataclass
class _Source:
    path: Path
    table: Any
    kind: str
    lines: list[int] | None

    def records(self) -> Iterator[tuple[str, dict]]:
        for index, record in enumerate(self.table):
            yield where(self.path, index, self.lines), record


def _open(path: str | Path, kind: str) -> _Source:
    path = Path(path)
    table = load_table(path)
    return _Source(path, table, detect_kind(list(table.column_names), path, kind), record_lines(path))


def read_texts(path: str | Path, kind: str = "auto") -> list[str]:
    """Every string of the file's records (text, prompts, completions, message contents): what a
    word-level vocabulary is built from. Records are not checked here."""
    source, out = _open(path, kind), []
    for _, record in source.records():
        for key in ("text", "prompt", "completion", "instruction", "input", "output"):
            if isinstance(record.get(key), str):
                out.append(record[key])
        if source.kind == "instruct" and record.get("instruction") is not None:
            out.append(ALPACA_PROMPT_INPUT)
        for message in record.get("messages") or []:
            if isinstance(message, dict) and isinstance(message.get("content"), str):
                out.append(message["content"])
    return out


class TextDataset:
    """``{"input_ids", "labels"}`` samples of one local file (kinds above); ``on_bad='skip'`` leaves bad
    records out and counts them (``stats['skipped']``) instead of raising."""

    def __init__(self, path: str | Path, tokenizer: Any, seq_len: int, *, kind: str = "auto", pack: bool = True,
                 on_bad: str = "error") -> None:
        if on_bad not in ("error", "skip"):
            raise TextDataError(f"key 'on_bad' must be 'error' or 'skip', got {on_bad!r}")
        if seq_len < 2:
            raise TextDataError(f"key 'seq_len' must be >= 2, got {seq_len}")
        if tokenizer.eos_token_id is None:
            raise TextDataError(f"{path}: the tokenizer has no EOS token (needed between documents and after "
                                "each completion); set eos_token in its tokenizer_config.json")
        source = _open(path, kind)
        self.path, self.kind, self.seq_len, self.on_bad = source.path, source.kind, seq_len, on_bad
        self.stats: Counter[str] = Counter()
        self.samples: list[dict[str, torch.Tensor]] = []
        if self.kind == "chat" and not getattr(tokenizer, "chat_template", None):
            raise TextDataError(f"{path}: chat data needs a tokenizer with a chat template (set 'chat_template' "
                                "in the model folder's tokenizer_config.json or chat_template.jinja)")
        if self.kind == "text":
            self._read_corpus(source, tokenizer, pack)
        else:
            self._read_supervised(source, tokenizer)
        if not self.samples:
            raise TextDataError(f"{path}: no usable sample ({self.summary()})")

    def _bad(self, err: TextDataError) -> None:
        if self.on_bad == "error":
            raise TextDataError(f"{err} (set data.on_bad: skip to leave such records out)")
        self.stats["skipped"] += 1

    def _read_corpus(self, source: _Source, tokenizer: Any, pack: bool) -> None:
        eos, stream = tokenizer.eos_token_id, []
        for place, record in source.records():
            self.stats["records"] += 1
            try:
                text = _string(record, "text", place)
            except TextDataError as err:
                self._bad(err)
                continue
            if not text.strip():
                self.stats["empty"] += 1
                continue
            ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
            if pack:
                stream += ids
            else:
                self._add(ids, ids)
        if pack:
            blocks = len(stream) // self.seq_len
            self.stats["tokens_dropped"] += len(stream) - blocks * self.seq_len
            for b in range(blocks):
                block = stream[b * self.seq_len : (b + 1) * self.seq_len]
                self.samples.append({"input_ids": torch.tensor(block), "labels": torch.tensor(block)})
            if not blocks:
                raise TextDataError(f"{source.path}: the corpus has {len(stream)} tokens, fewer than one "
                                    f"block of data.seq_len={self.seq_len}")

    def _read_supervised(self, source: _Source, tokenizer: Any) -> None:
        for place, record in source.records():
            self.stats["records"] += 1
            try:
                if self.kind == "chat":
                    ids, labels, _ = tokenize_chat(tokenizer, chat_messages(record, place), place)
                else:
                    ids, labels = tokenize_instruct(tokenizer, *instruct_pair(record, place))
            except TextDataError as err:
                self._bad(err)
                continue
            self._add(ids, labels)

    def _add(self, ids: list[int], labels: list[int]) -> None:
        if len(ids) > self.seq_len:
            self.stats["truncated"] += 1
            self.stats["tokens_dropped"] += len(ids) - self.seq_len
            ids, labels = ids[: self.seq_len], labels[: self.seq_len]
        if all(label == IGNORE_INDEX for label in labels[1:]):  # the first label is never predicted
            self.stats["no_target"] += 1
            return
        self.samples.append({"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)})

    def summary(self) -> str:
        s = self.stats
        parts = [f"{s['records']} {self.kind} records -> {len(self.samples)} samples of <= {self.seq_len} tokens"]
        if s["truncated"]:
            parts.append(f"{s['truncated']} truncated to data.seq_len")
        if s["tokens_dropped"]:
            parts.append(f"{s['tokens_dropped']} tokens dropped")
        if s["no_target"]:
            parts.append(f"{s['no_target']} dropped with no completion token within data.seq_len")
        for key, what in (("empty", "empty documents"), ("skipped", "bad records skipped")):
            if s[key]:
                parts.append(f"{s[key]} {what}")
        return f"{self.path}: " + "; ".join(parts)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.samples[index]


@dataclass
class TextCollator:
    """Right-pads ``input_ids`` (with ``pad_id``) and ``labels`` (with -100); ``attention_mask`` marks real
    tokens. Samples without labels (generated sequences) learn every token."""

    pad_id: int

    def __call__(self, samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        width = max(len(s["input_ids"]) for s in samples)
        ids = torch.full((len(samples), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(samples), width), dtype=torch.long)
        for row, sample in enumerate(samples):
            n = len(sample["input_ids"])
            ids[row, :n] = sample["input_ids"]
            labels[row, :n] = sample.get("labels", sample["input_ids"])
            mask[row, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}
