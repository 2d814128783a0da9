"""data/text.py: corpora, instruction and chat data from real jsonl/json/csv/parquet/txt files, read
through ``datasets``, with a tokenizer loaded from a saved folder (chat template included)."""

from __future__ import annotations

import json

import pytest

from data.fake_text import make_tokenizer_folder, write_records
from data.text import IGNORE_INDEX, TextCollator, TextDataError, TextDataset

WORDS = ["be brief", "what is two plus two", "four", "and three", "five", "the cat sat on the mat",
         "a dog ran home", "say hi", "hi there", "name a colour", "red"]
CHAT = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is two plus two"},
                     {"role": "assistant", "content": "four"}, {"role": "user", "content": "and three"},
                     {"role": "assistant", "content": "five"}]}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(make_tokenizer_folder(tmp_path_factory.mktemp("tok"), WORDS))


def tokens(tokenizer, ids) -> list[str]:
    return tokenizer.convert_ids_to_tokens([int(i) for i in ids])


def targets(tokenizer, sample) -> list[str]:
    return tokens(tokenizer, [i for i in sample["labels"] if i != IGNORE_INDEX])


def test_chat_loss_only_on_assistant_turns(tokenizer, tmp_path):
    path = write_records(tmp_path / "chat.jsonl", [CHAT, {"messages": CHAT["messages"][1:3]}])
    data = TextDataset(path, tokenizer, seq_len=64)
    assert data.kind == "chat" and len(data) == 2
    rendered = tokenizer.apply_chat_template(CHAT["messages"], tokenize=False)
    assert tokens(tokenizer, data[0]["input_ids"]) == tokens(tokenizer, tokenizer(rendered)["input_ids"])
    assert targets(tokenizer, data[0]) == ["four", "</s>", "five", "</s>"]
    assert targets(tokenizer, data[1]) == ["four", "</s>"]
    assert (data[0]["labels"] != IGNORE_INDEX).sum() == 4


def test_corpus_packs_documents_with_eos_between(tokenizer, tmp_path):
    docs = ["the cat sat on the mat", "a dog ran home", "say hi"] * 3
    path = write_records(tmp_path / "corpus.parquet", [{"text": d} for d in docs])
    data = TextDataset(path, tokenizer, seq_len=6)
    stream = [t for d in docs for t in [*tokenizer(d, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]]
    assert len(stream) == 45 and len(data) == 7 and data.stats["tokens_dropped"] == 3
    assert [int(t) for s in data.samples for t in s["input_ids"]] == stream[:42]
    assert all((s["labels"] == s["input_ids"]).all() for s in data.samples)
    assert "3 tokens dropped" in data.summary()


def test_txt_corpus_is_one_document_per_paragraph(tokenizer, tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("the cat sat\non the mat\n\na dog ran home\n", encoding="utf-8")
    data = TextDataset(path, tokenizer, seq_len=4)
    assert data.stats["records"] == 2
    joined = [t for sample in data.samples for t in tokens(tokenizer, sample["input_ids"])]
    assert joined == "the cat sat on the mat </s> a dog ran home </s>".split()


def test_prompt_completion_and_alpaca(tokenizer, tmp_path):
    csv = write_records(tmp_path / "pc.csv", [{"prompt": "what is two plus two", "completion": "four"}])
    sample = TextDataset(csv, tokenizer, seq_len=32)[0]
    assert tokens(tokenizer, sample["input_ids"]) == ["what", "is", "two", "plus", "two", "four", "</s>"]
    assert targets(tokenizer, sample) == ["four", "</s>"]
    alpaca = write_records(tmp_path / "alpaca.json", [
        {"instruction": "name a colour", "input": "", "output": "red"},
        {"instruction": "what is two plus two", "input": "be brief", "output": "four"}])
    data = TextDataset(alpaca, tokenizer, seq_len=128)
    assert data.kind == "instruct"
    words = tokens(tokenizer, data[1]["input_ids"])
    assert "input" in words and "input" not in tokens(tokenizer, data[0]["input_ids"])
    assert targets(tokenizer, data[0]) == ["red", "</s>"]


def test_truncation_is_counted_and_targetless_samples_dropped(tokenizer, tmp_path):
    late = {"messages": [{"role": "user", "content": "the cat sat on the mat " * 3}, {"role": "assistant", "content": "red"}]}
    path = write_records(tmp_path / "chat.jsonl", [CHAT, late])
    data = TextDataset(path, tokenizer, seq_len=14)
    assert len(data) == 1 and data.stats["truncated"] == 2 and data.stats["no_target"] == 1
    assert targets(tokenizer, data[0]) == ["four", "</s>"] and len(data[0]["input_ids"]) == 14
    assert "2 truncated" in data.summary() and "1 dropped with no completion token" in data.summary()


def test_collator_pads_labels_with_ignore_index(tokenizer, tmp_path):
    path = write_records(tmp_path / "pc.jsonl", [{"prompt": "say hi", "completion": "hi there"},
                                                 {"prompt": "name a colour please", "completion": "red"}])
    data = TextDataset(path, tokenizer, seq_len=32)
    batch = TextCollator(pad_id=tokenizer.pad_token_id)([data[0], data[1]])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["attention_mask"][0].sum() == len(data[0]["input_ids"])
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


@pytest.mark.parametrize(("name", "content", "message"), [
    ("empty.jsonl", b"", "the file is empty"),
    ("latin1.jsonl", '{"text": "caf\u00e9"}\n'.encode("latin-1"), "line 1: not UTF-8"),
    ("broken.jsonl", b'{"text": "a dog"}\n\n{"text": oops}\n', "line 3: not valid JSON"),
    ("cols.jsonl", b'{"question": "a", "answer": "b"}\n', "cannot tell the data kind from columns ['question', 'answer']"),
    ("bad.tsv", b"a\tb\n", "unknown text data format '.tsv'"),
])
def test_unreadable_files_name_the_file(tokenizer, tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(TextDataError) as info:
        TextDataset(path, tokenizer, seq_len=8)
    assert str(path) in str(info.value) and message in str(info.value)


def test_bad_records_name_line_and_key_or_are_skipped(tokenizer, tmp_path):
    path = tmp_path / "chat.jsonl"
    lines = [json.dumps(CHAT), "", json.dumps({"messages": [{"role": "user", "content": "say hi"},
                                                          {"role": "bot", "content": "hi"}]}),
             json.dumps({"messages": [{"role": "user", "content": "say hi"}]})]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(TextDataError, match=r"chat.jsonl: line 3: key 'messages\[1\].role' is 'bot'"):
        TextDataset(path, tokenizer, seq_len=32)
    data = TextDataset(path, tokenizer, seq_len=32, on_bad="skip")
    assert len(data) == 1 and data.stats["skipped"] == 2 and "2 bad records skipped" in data.summary()
    missing = write_records(tmp_path / "pc.jsonl", [{"prompt": "say hi", "completion": "hi"}, {"prompt": "say hi"}])
    with pytest.raises(TextDataError, match=r"pc.jsonl: line 2: key 'completion' must be a string"):
        TextDataset(missing, tokenizer, seq_len=32)
    with pytest.raises(TextDataError, match="kind 'chat' needs column"):
        TextDataset(missing, tokenizer, seq_len=32, kind="chat")


def test_chat_needs_a_template(tmp_path):
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(make_tokenizer_folder(tmp_path / "tok", WORDS, chat_template=None))
    path = write_records(tmp_path / "chat.jsonl", [CHAT])
    with pytest.raises(TextDataError, match="chat data needs a tokenizer with a chat template"):
        TextDataset(path, plain, seq_len=32)
