"""data.instruct (LLaVA JSON, template, label masking, padding, bad records) and data.fake_instruct."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from data.fake_instruct import COLORS, NUMBERS, demo_texts, make_fake_instruct
from data.instruct import (
    IGNORE_INDEX,
    ChatTemplate,
    InstructCollator,
    InstructDataError,
    InstructDataset,
    encode_prompt,
    normalize_answer,
)
from encoders.llm import word_tokenizer

TEMPLATE = ChatTemplate(system="a chat.", user="USER:", assistant="ASSISTANT:")


@pytest.fixture
def tokenizer():
    return word_tokenizer([*demo_texts(), *TEMPLATE.texts(), "what is this? a red dot. and now? gone."])


def write(tmp_path, records, images=("a.png",)):
    for name in images:
        Image.new("RGB", (4, 4), (255, 0, 0)).save(tmp_path / name)
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    return path


def record(rid="r1", image="a.png", question="<image>\nwhat is this?", answer="a red dot."):
    rec = {"id": rid, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    if image is not None:
        rec["image"] = image
    return rec


def test_labels_cover_answers_and_eos_only(tmp_path, tokenizer):
    multi = record("m")
    multi["conversations"] += [{"from": "human", "value": "and now?"}, {"from": "gpt", "value": "gone."}]
    data = InstructDataset(write(tmp_path, [multi]), tokenizer, template=TEMPLATE)
    sample = data[0]
    ids, labels = sample["input_ids"].tolist(), sample["labels"].tolist()
    answered = [i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]
    assert [lab for lab in labels if lab != IGNORE_INDEX] == answered
    assert tokenizer.decode(answered) == "a red dot . </s> gone . </s>"
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=False).startswith("<s> a chat . user : <image> what is this ?")
    # generation starts from everything before the last answer
    assert sample["prompt_ids"].tolist() == ids[: len(sample["prompt_ids"])]
    assert tokenizer.decode(sample["prompt_ids"][-4:]) == "now ? assistant :"
    assert sample["answer"] == "gone."
    assert sample["prompt_ids"].tolist() == encode_prompt(tokenizer, TEMPLATE, "<image>\nwhat is this?") + \
        ids[len(encode_prompt(tokenizer, TEMPLATE, "<image>\nwhat is this?")):len(sample["prompt_ids"])]


def test_images_load_through_the_transform_and_text_only_records_have_none(tmp_path, tokenizer):
    path = write(tmp_path, [record("img"), record("txt", image=None, question="what is this?")])
    data = InstructDataset(path, tokenizer, template=TEMPLATE, image_transform=lambda im: torch.tensor(im.size))
    assert data[0]["image"].tolist() == [4, 4] and data[1]["image"] is None
    default = InstructDataset(path, tokenizer, template=TEMPLATE)[0]["image"]
    assert default.shape == (3, 4, 4) and default[0].min() == 1.0 and default[1].max() == 0.0


def test_images_of_any_depth_read_scaled_and_a_broken_one_names_record_and_file(tmp_path, tokenizer):
    from data.fake_images import write_png

    write_png(tmp_path / "deep.png", np.full((4, 4), 128 * 257, np.uint16))  # 16-bit grey: mid grey, not white
    (tmp_path / "cut.png").write_bytes((tmp_path / "deep.png").read_bytes()[:30])
    path = write(tmp_path, [record("deep", image="deep.png"), record("cut", image="cut.png")], images=())
    data = InstructDataset(path, tokenizer, template=TEMPLATE)
    torch.testing.assert_close(data[0]["image"], torch.full((3, 4, 4), 128 / 255))
    with pytest.raises(InstructDataError, match=r"data.json: record 'cut': .*cut.png: cannot read image"):
        data[1]


BAD = {
    "missing image": record("gone", image="nope.png"),
    "no placeholder": record("noph", question="what is this?"),
    "empty answer": record("empty", answer="   "),
    "placeholder without image": record("orphan", image=None),
    "several placeholders": record("two", question="<image> <image> what is this?"),
    "malformed": {"id": "turns", "conversations": [{"from": "gpt", "value": "hi"}]},
}


@pytest.mark.parametrize("reason", sorted(BAD))
def test_bad_record_is_an_error_naming_file_and_id(tmp_path, tokenizer, reason):
    path = write(tmp_path, [record("ok"), BAD[reason]])
    rid = BAD[reason]["id"]
    with pytest.raises(InstructDataError, match=rf"data.json: record '{rid}': .*on_bad: skip"):
        InstructDataset(path, tokenizer, template=TEMPLATE)


def test_bad_records_skipped_and_counted(tmp_path, tokenizer):
    path = write(tmp_path, [record("ok"), *BAD.values(), record("ok2")])
    data = InstructDataset(path, tokenizer, template=TEMPLATE, on_bad="skip")
    assert len(data) == 2 and [data[i]["id"] for i in range(2)] == ["ok", "ok2"]
    assert data.skipped == dict.fromkeys(BAD, 1)
    assert sorted(data.skipped_ids) == sorted(r["id"] for r in BAD.values())
    with pytest.raises(InstructDataError, match="no usable records"):
        InstructDataset(write(tmp_path, [BAD["empty answer"]]), tokenizer, template=TEMPLATE, on_bad="skip")


def test_a_tokenizer_without_image_token_is_refused(tmp_path):
    plain = word_tokenizer(["what is this"], specials=["<pad>", "<unk>", "<s>", "</s>"])
    with pytest.raises(InstructDataError, match="no '<image>' token"):
        InstructDataset(write(tmp_path, [record()]), plain)


def test_collator_pads_answers_right_and_prompts_left(tmp_path, tokenizer):
    path = write(tmp_path, [record("a", answer="a red dot."), record("b", image=None, question="what is this?",
                                                                    answer="gone.")])
    data = InstructDataset(path, tokenizer, template=TEMPLATE, max_length=64)
    batch = InstructCollator(tokenizer.pad_token_id)([data[0], data[1]])
    lengths = [len(data[i]["input_ids"]) for i in range(2)]
    assert batch["input_ids"].shape == (2, max(lengths))
    short = int(np.argmin(lengths))
    assert (batch["input_ids"][short, lengths[short]:] == tokenizer.pad_token_id).all()
    assert (batch["labels"][short, lengths[short]:] == IGNORE_INDEX).all()
    assert batch["attention_mask"].sum(1).tolist() == lengths
    prompt_lengths = [len(data[i]["prompt_ids"]) for i in range(2)]
    assert batch["prompt_mask"].sum(1).tolist() == prompt_lengths
    assert (batch["prompt_mask"][:, -1] == 1).all()  # left-padded: every prompt ends at the last column
    assert batch["images"].shape == (1, 3, 4, 4) and batch["has_image"].tolist() == [True, False]
    assert batch["answer"] == ["a red dot.", "gone."] and batch["id"] == ["a", "b"]


def test_truncation_keeps_max_length(tmp_path, tokenizer):
    data = InstructDataset(write(tmp_path, [record()]), tokenizer, template=TEMPLATE, max_length=6)
    sample = data[0]
    assert len(sample["input_ids"]) == len(sample["labels"]) == 6 and len(sample["prompt_ids"]) <= 6


def test_normalize_answer():
    assert normalize_answer("  There are THREE shapes. ") == normalize_answer("there are three shapes") == \
        "there are three shapes"


def test_fake_set_is_real_png_and_json_with_known_content(tmp_path):
    files = make_fake_instruct(tmp_path, {"train": 12, "eval": 4}, seed=3)
    again = make_fake_instruct(tmp_path / "again", {"train": 12, "eval": 4}, seed=3)
    assert files["instruct_train"].read_bytes() == again["instruct_train"].read_bytes()
    records = json.loads(files["instruct_train"].read_text())
    captions = json.loads(files["captions_train"].read_text())
    assert len(captions) == 12
    assert len(records) == 2 * sum(1 if c["conversations"][1]["value"].startswith("the digit") else 3 for c in captions)
    assert len(json.loads(files["instruct_train_brief"].read_text())) == len(records) // 2
    for caption in captions:
        words = caption["conversations"][1]["value"].rstrip(".").split()
        pixels = np.asarray(Image.open(tmp_path / caption["image"]))
        assert pixels.shape == (32, 32, 3)
        if words[0] == "the":  # a digit: grey levels only
            assert (pixels[..., 0] == pixels[..., 2]).all() and pixels.max() > 100
        else:  # shapes: every lit pixel has the caption's colour
            lit = pixels.reshape(-1, 3)[pixels.reshape(-1, 3).sum(1) > 0]
            assert (lit == COLORS[words[1]]).all(axis=1).mean() > 0.95
            assert ndimage.label(pixels.sum(-1) > 0)[1] == NUMBERS.index(words[0])  # one blob per shape
    text = json.loads(files["text_train"].read_text())
    assert not any("image" in r for r in text) and all("<image>" not in r["conversations"][0]["value"] for r in text)


def test_truncated_records_are_counted_and_said(tmp_path, tokenizer):
    long = record("long", question="<image>\n" + "what is this? " * 6)
    data = InstructDataset(write(tmp_path, [record("short"), long]), tokenizer, template=TEMPLATE, max_length=24)
    assert len(data[0]["input_ids"]) < 24 and len(data[1]["input_ids"]) == 24
    assert data.truncated == 1 and data.truncated_ids == ["long"] and data.answerless == 1
    assert "1 longer than data.max_length=24 tokens were cut (e.g. long); 1 of them kept no answer token" \
        in data.summary()


def test_parquet_records_read_through_datasets(tmp_path, tokenizer):
    from data.fake_text import write_records

    text_only = record("t", image=None, question="what is this?")
    path = write_records(tmp_path / "data.parquet", [record("p"), text_only])
    write(tmp_path, [], images=("a.png",))
    data = InstructDataset(path, tokenizer, template=TEMPLATE)
    assert [data[i]["id"] for i in range(2)] == ["p", "t"]
    assert data[0]["image"].shape == (3, 4, 4) and data[1]["image"] is None
    json_data = InstructDataset(write(tmp_path, [record("p"), text_only]), tokenizer, template=TEMPLATE)
    assert torch.equal(data[0]["input_ids"], json_data[0]["input_ids"])
    assert torch.equal(data[1]["labels"], json_data[1]["labels"])
    (tmp_path / "empty.parquet").write_bytes(b"")
    with pytest.raises(InstructDataError, match="empty.parquet: the file is empty"):
        InstructDataset(tmp_path / "empty.parquet", tokenizer, template=TEMPLATE)


def test_the_tokenizers_own_chat_template(tmp_path):
    from data.fake_text import CHAT_TEMPLATE
    from encoders.llm import WORD_SPECIALS

    roles = ["<|system|>", "<|user|>", "<|assistant|>"]
    tok = word_tokenizer([*TEMPLATE.texts(), "what is this? a red dot. and now? gone."],
                         specials=[*WORD_SPECIALS, *roles])
    template = ChatTemplate(system="a chat.", use_tokenizer=True)
    multi = record("m")
    multi["conversations"] += [{"from": "human", "value": "and now?"}, {"from": "gpt", "value": "gone."}]
    with pytest.raises(InstructDataError, match="use_tokenizer' is true but the tokenizer has no chat template"):
        InstructDataset(write(tmp_path, [multi]), tok, template=template)
    tok.chat_template = CHAT_TEMPLATE
    sample = InstructDataset(write(tmp_path, [multi]), tok, template=template)[0]
    ids, labels = sample["input_ids"].tolist(), sample["labels"].tolist()
    assert tok.decode(ids, skip_special_tokens=False) == ("<|system|> a chat . </s> <|user|> <image> what is this ? "
                                                          "</s> <|assistant|> a red dot . </s> <|user|> and now ? </s> "
                                                          "<|assistant|> gone . </s>")
    assert tok.decode([t for t in labels if t != IGNORE_INDEX]) == "a red dot . </s> gone . </s>"
    prompt = tok.decode(sample["prompt_ids"].tolist(), skip_special_tokens=False)
    assert prompt.endswith("<|user|> and now ? </s> <|assistant|>")
    first = encode_prompt(tok, template, "<image>\nwhat is this?")  # what `mmtune generate` sends
    assert tok.decode(first, skip_special_tokens=False) == "<|system|> a chat . </s> <|user|> <image> what is this ? " \
                                                         "</s> <|assistant|>"
