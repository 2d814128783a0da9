"""Visual instruction data in LLaVA's JSON format: a list of records

    {"id": "000123", "image": "images/000123.png",
     "conversations": [{"from": "human", "value": "<image>\\nHow many shapes are there?"},
                       {"from": "gpt", "value": "3"}, ...more human/gpt turns...]}

rendered with a chat template (system line, then ``USER: question ASSISTANT: answer</s>`` per turn) and
tokenised piece by piece so the labels are exact: -100 on the system line and every prompt, the token ids
on every answer and its end-of-sequence token, so the loss covers answers only. The ``<image>`` placeholder
stays one token; the model puts the image's tokens there. Records without "image" are text-only.

Records come from a JSON list, a JSON-lines file or a parquet table (read through ``datasets``, columns
"id", "image", "conversations"). A record longer than ``max_length`` tokens is cut; such records are
counted (``dataset.truncated``, ``dataset.truncated_ids``, ``dataset.summary()``), never cut silently.

A bad record (missing image file, an image without exactly one ``<image>`` placeholder, a placeholder
without an image, an empty answer, malformed turns) is an error naming the file and the record id, or,
with ``on_bad="skip"``, left out and counted by reason (``dataset.skipped``, ``dataset.skipped_ids``).
Optional record keys "type" and "style" pass through to the samples (evaluation by question type).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from mm.errors import MMTuneError

IMAGE_TOKEN = "<image>"
IGNORE_INDEX = -100
HUMAN_ROLES, GPT_ROLES = ("human", "user"), ("gpt", "assistant")
META_KEYS = ("type", "style")


class InstructDataError(MMTuneError, ValueError):
    """A data file or record is unusable; the message names the file, the record id and the problem."""


@dataclass
class ChatTemplate:
    system: str = field(default="A chat between a curious user and an assistant.",
                        metadata={"help": "System line before the first turn ('' for none)."})
    user: str = field(default="USER:", metadata={"help": "Tag before each question."})
    assistant: str = field(default="ASSISTANT:", metadata={"help": "Tag before each answer."})
    use_tokenizer: bool = field(default=False, metadata={
        "help": "Render the turns with the tokenizer's own chat template (a real model's; human -> user, "
                "gpt -> assistant, the system line first) instead of the tags above."})

    def prompt(self, question: str) -> str:
        return f" {self.user} {question.strip()} {self.assistant}"

    def texts(self) -> list[str]:
        return [self.system, self.user, self.assistant]


@dataclass
class InstructDataConfig:
    train: str = field(default="data/mllm_demo/instruct_train.json",
                       metadata={"help": "Training records (LLaVA JSON list, or JSON lines)."})
    eval: str | None = field(default="data/mllm_demo/instruct_eval.json",
                             metadata={"help": "Held-out records (null: none)."})
    image_root: str | None = field(default=None, metadata={"help": "Folder image paths are relative to "
                                                                   "(null: the JSON file's folder)."})
    on_bad: Literal["error", "skip"] = field(default="error", metadata={
        "help": "A bad record is an error naming its id, or skipped and counted."})
    max_length: int = field(default=256, metadata={"help": "Text tokens kept per sample (image tokens extra)."})
    template: ChatTemplate = field(default_factory=ChatTemplate, metadata={"help": "Chat template."})
    fake_images: int = field(default=0, metadata={
        "help": "If > 0 and the train file is missing, first write a demo set of this many images per split "
                "(data/fake_instruct.py) into the train file's folder."})
    fake_seed: int = field(default=0, metadata={"help": "Seed of the demo set."})


def read_records(path: str | Path) -> list[Any]:
    """The records of a LLaVA JSON list, JSON-lines file or parquet table; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise InstructDataError(f"{path}: no such instruction data file")
    if path.suffix == ".parquet":
        from data.text_files import TextDataError, load_table

        try:
            rows = load_table(path).to_list()
        except TextDataError as err:
            raise InstructDataError(str(err)) from None
        # a column missing from a row reads back as None: drop those keys, as a JSON record would lack them
        return [{key: value for key, value in row.items() if value is not None} for row in rows]
    text = path.read_text()
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        records = json.loads(text)
    except json.JSONDecodeError as err:
        raise InstructDataError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(records, list):
        raise InstructDataError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    return records


def record_id(record: Any, index: int) -> str:
    return str(record.get("id", f"#{index}")) if isinstance(record, dict) else f"#{index}"


def record_problem(record: Any, image_root: Path) -> tuple[str, str] | None:
    """(reason key, message) of what makes ``record`` unusable, or None."""
    if not isinstance(record, dict):
        return "malformed", f"expected an object, got {type(record).__name__}"
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        return "malformed", "no 'conversations' list"
    for k, turn in enumerate(turns):
        if not (isinstance(turn, dict) and isinstance(turn.get("value"), str) and isinstance(turn.get("from"), str)):
            return "malformed", f"turn {k} needs string 'from' and 'value'"
        if turn["from"] not in (HUMAN_ROLES if k % 2 == 0 else GPT_ROLES) or len(turns) % 2:
            return "malformed", "turns must alternate human/gpt, starting with human and ending with gpt"
        if k % 2 and not turn["value"].strip():
            return "empty answer", f"empty answer in turn {k}"
        if k % 2 and IMAGE_TOKEN in turn["value"]:
            return "malformed", f"{IMAGE_TOKEN} placeholder in an answer (turn {k})"
    placeholders = sum(t["value"].count(IMAGE_TOKEN) for t in turns[::2])
    image = record.get("image")
    if image is None:
        if placeholders:
            return "placeholder without image", f"{IMAGE_TOKEN} placeholder but no 'image'"
        return None
    if not isinstance(image, str):
        return "malformed", f"'image' must be a path string, got {image!r}"
    if placeholders != 1:
        return ("no placeholder" if placeholders == 0 else "several placeholders",
                f"has an image but {placeholders} {IMAGE_TOKEN} placeholders in its questions (need exactly 1)")
    if not (image_root / image).is_file():
        return "missing image", f"missing image file {image_root / image}"
    return None


def normalize_answer(text: str) -> str:
    """Lower case, punctuation as spaces, single spaces: what exact-match compares."""
    return " ".join(re.sub(r"[^0-9a-z]+", " ", text.lower()).split())


def pil_to_tensor(image: Any) -> torch.Tensor:
    """RGB PIL image -> float (3, H, W) in [0, 1] (the default when no model transform is given)."""
    import numpy as np

    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def as_messages(template: ChatTemplate, turns: list[dict]) -> list[dict[str, str]]:
    """LLaVA turns as chat messages (system line first) for a tokenizer's chat template."""
    system = [{"role": "system", "content": template.system}] if template.system else []
    return system + [{"role": "user" if k % 2 == 0 else "assistant", "content": turn["value"].strip()}
                     for k, turn in enumerate(turns)]


def encode_prompt(tokenizer: Any, template: ChatTemplate, question: str | None = None, *, start: bool = True) -> list[int]:
    """Token ids of the conversation start (bos, system line) if ``start``, then ``question``'s prompt
    ending with the assistant tag: what generation continues from."""
    if template.use_tokenizer and start and question is not None:
        messages = as_messages(template, [{"value": question}])
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = []
    if start:
        ids += [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        ids += _ids(tokenizer, template.system) if template.system else []
    return ids + (_ids(tokenizer, template.prompt(question)) if question is not None else [])


class InstructDataset:
    """Samples ``{"id", "input_ids", "labels", "prompt_ids", "answer", "image", "type", "style"}``.

    ``prompt_ids`` is everything before the last answer (what generation starts from) and ``answer`` the
    last answer's text. ``image`` is ``image_transform(PIL RGB image)`` or None for text-only records.
    """

    def __init__(self, path: str | Path, tokenizer: Any, *, image_root: str | Path | None = None,
                 template: ChatTemplate | None = None, image_transform: Callable[[Any], torch.Tensor] | None = None,
                 on_bad: str = "error", max_length: int = 256) -> None:
        if on_bad not in ("error", "skip"):
            raise InstructDataError(f"key 'on_bad' must be 'error' or 'skip', got {on_bad!r}")
        self.path = Path(path)
        self.image_root = Path(image_root) if image_root is not None else self.path.parent
        self.tokenizer, self.template = tokenizer, template or ChatTemplate()
        self.image_transform = image_transform or pil_to_tensor
        self.max_length = max_length
        if self.template.use_tokenizer and not getattr(tokenizer, "chat_template", None):
            raise InstructDataError(f"{self.path}: key 'data.template.use_tokenizer' is true but the tokenizer "
                                    "has no chat template (a real model folder's tokenizer_config.json has one)")
        self.image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if self.image_id is None or self.image_id == tokenizer.unk_token_id:
            raise InstructDataError(f"the tokenizer has no {IMAGE_TOKEN!r} token; add it "
                                    "(encoders.llm.ensure_image_token)")
        self.records: list[dict] = []
        self.skipped: Counter[str] = Counter()
        self.skipped_ids: list[str] = []
        for index, record in enumerate(read_records(self.path)):
            problem = record_problem(record, self.image_root)
            if problem is None:
                self.records.append(record)
                continue
            if on_bad == "error":
                raise InstructDataError(f"{self.path}: record {record_id(record, index)!r}: {problem[1]} "
                                        "(set on_bad: skip to leave such records out)")
            self.skipped[problem[0]] += 1
            self.skipped_ids.append(record_id(record, index))
        if not self.records:
            raise InstructDataError(f"{self.path}: no usable records ({sum(self.skipped.values())} skipped: "
                                    f"{dict(self.skipped)})")
        self.truncated_ids: list[str] = []
        self.answerless = 0  # cut so short that no answer token is left
        for index, record in enumerate(self.records):
            full, labels = self.full_length(record)
            if full > max_length:
                self.truncated_ids.append(record_id(record, index))
                self.answerless += all(label == IGNORE_INDEX for label in labels[1:max_length])

    @property
    def truncated(self) -> int:
        return len(self.truncated_ids)

    def full_length(self, record: dict) -> tuple[int, list[int]]:
        """(token count before truncation, labels before truncation)."""
        saved, self.max_length = self.max_length, 1 << 30
        try:
            ids, labels, _ = self.encode(record)
        finally:
            self.max_length = saved
        return len(ids), labels

    def summary(self) -> str:
        """One line: records kept, skipped by reason, cut to max_length."""
        parts = [f"{len(self.records)} records"]
        if self.skipped:
            parts.append(f"skipped {sum(self.skipped.values())} bad records {dict(self.skipped)}")
        if self.truncated:
            parts.append(f"{self.truncated} longer than data.max_length={self.max_length} tokens were cut "
                         f"(e.g. {', '.join(self.truncated_ids[:3])}); {self.answerless} of them kept no answer token")
        return f"{self.path}: " + "; ".join(parts)

    def __len__(self) -> int:
        return len(self.records)

    def encode(self, record: dict) -> tuple[list[int], list[int], int]:
        """(input_ids, labels, length of the prompt before the last answer), truncated to max_length."""
        if self.template.use_tokenizer:
            return self.encode_with_chat_template(record)
        tok = self.tokenizer
        ids = encode_prompt(tok, self.template)
        labels = [IGNORE_INDEX] * len(ids)
        turns = record["conversations"]
        prompt_length = 0
        for k in range(0, len(turns), 2):
            question = encode_prompt(tok, self.template, turns[k]["value"], start=False)
            answer = _ids(tok, " " + turns[k + 1]["value"].strip()) + [tok.eos_token_id]
            ids += question
            labels += [IGNORE_INDEX] * len(question)
            prompt_length = len(ids)
            ids += answer
            labels += answer
        wanted = sum(t["value"].count(IMAGE_TOKEN) for t in turns)
        if ids.count(self.image_id) != wanted:
            raise InstructDataError(f"{self.path}: record {record.get('id')!r}: the tokenizer does not keep "
                                    f"{IMAGE_TOKEN!r} as one token; add it as a special token")
        return ids[: self.max_length], labels[: self.max_length], min(prompt_length, self.max_length)

    def encode_with_chat_template(self, record: dict) -> tuple[list[int], list[int], int]:
        """As ``encode``, rendered by the tokenizer's chat template; labels on the assistant turns' tokens."""
        from data.text import TextDataError, tokenize_chat

        place = f"{self.path}: record {record.get('id')!r}"
        turns = record["conversations"]
        try:
            ids, labels, prompt_length = tokenize_chat(self.tokenizer, as_messages(self.template, turns), place)
        except TextDataError as err:
            raise InstructDataError(str(err)) from None
        if ids.count(self.image_id) != sum(t["value"].count(IMAGE_TOKEN) for t in turns):
            raise InstructDataError(f"{place}: the chat template or tokenizer does not keep {IMAGE_TOKEN!r} as "
                                    "one token")
        return ids[: self.max_length], labels[: self.max_length], min(prompt_length, self.max_length)

    def load_image(self, record: dict) -> torch.Tensor | None:
        if record.get("image") is None:
            return None
        from data.images import ImageReadError, read_image

        path = self.image_root / record["image"]
        try:
            return self.image_transform(read_image(path))
        except ImageReadError as err:  # its message starts with the image's path
            raise InstructDataError(f"{self.path}: record {record.get('id')!r}: {err}") from None

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        ids, labels, prompt_length = self.encode(record)
        sample = {"id": record_id(record, index), "input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
                  "prompt_ids": torch.tensor(ids[:prompt_length]),
                  "answer": record["conversations"][-1]["value"].strip(), "image": self.load_image(record)}
        sample.update({key: str(record.get(key, "")) for key in META_KEYS})
        return sample

    def texts(self) -> list[str]:
        """Every question and answer (for building a word-level vocabulary)."""
        return [turn["value"] for record in self.records for turn in record["conversations"]]


def pad(sequences: list[torch.Tensor], value: int, side: str = "right") -> torch.Tensor:
    width = max(len(s) for s in sequences)
    out = torch.full((len(sequences), width), value, dtype=torch.long)
    for row, seq in enumerate(sequences):
        if side == "right":
            out[row, : len(seq)] = seq
        else:
            out[row, width - len(seq):] = seq
    return out


@dataclass
class InstructCollator:
    """Pads a list of samples: answers right-padded for training, prompts left-padded for generation.

    ``images`` stacks the images of the rows that have one, in row order (``has_image`` marks them).
    """

    pad_id: int

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        ids = [s["input_ids"] for s in samples]
        prompts = [s["prompt_ids"] for s in samples]
        images = [s["image"] for s in samples if s["image"] is not None]
        batch = {
            "input_ids": pad(ids, self.pad_id), "labels": pad([s["labels"] for s in samples], IGNORE_INDEX),
            "attention_mask": pad([torch.ones_like(i) for i in ids], 0),
            "prompt_ids": pad(prompts, self.pad_id, side="left"),
            "prompt_mask": pad([torch.ones_like(p) for p in prompts], 0, side="left"),
            "images": torch.stack(images) if images else None,
            "has_image": torch.tensor([s["image"] is not None for s in samples]),
        }
        batch.update({key: [s[key] for s in samples] for key in ("id", "answer", *META_KEYS)})
        return batch
