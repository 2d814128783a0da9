"""The causal_lm task on the user's text: a saved model folder with its tokenizer (chat template) on chat
jsonl, a tiny model on a parquet corpus with a word-level tokenizer, and bad data through mmtune train."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import mm
from data.fake_text import make_tokenizer_folder, write_records
from data.text import IGNORE_INDEX

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "configs/tiny/text_lora.yaml"
TINY = ["model.hidden_size=32", "model.intermediate_size=64", "model.layers=1", "train.progress=false"]
COLOURS = ["red", "green", "blue", "yellow"]
CHATS = [{"messages": [{"role": "user", "content": f"name colour {i}"},
                       {"role": "assistant", "content": COLOURS[i % 4]}]} for i in range(16)]


def saved_model_folder(folder: Path) -> Path:
    """A tiny Llama and its tokenizer (with a chat template) saved together, as a user's model folder is."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    make_tokenizer_folder(folder, [f"name colour {i}" for i in range(16)] + COLOURS)
    vocab = len(AutoTokenizer.from_pretrained(folder))
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(folder)
    return folder


def chat_recipe(tmp_path: Path, *overrides: str):
    from train.engine.config import load_recipe

    folder = saved_model_folder(tmp_path / "model")
    data = write_records(tmp_path / "chat.jsonl", CHATS)
    return load_recipe(RECIPE, [*TINY, f"model.path={folder}", f"data.train={data}", f"data.eval={data}",
                                "data.seq_len=16", "train.batch_size=8", "optim.lr=5e-2",
                                f"train.out_dir={tmp_path / 'run'}", *overrides])


def test_chat_data_with_the_model_folders_tokenizer_learns_the_assistant_tokens(tmp_path):
    from train.tasks.lm import CausalLM

    task = CausalLM(chat_recipe(tmp_path))
    sample = task.train_dataset()[0]
    learned = [t for t, label in zip(sample["input_ids"].tolist(), sample["labels"].tolist(), strict=True)
               if label != IGNORE_INDEX]
    assert task.tokenizer.convert_ids_to_tokens(learned) == ["red", "</s>"]
    assert not (tmp_path / "run" / "tokenizer.json").exists()  # the folder's own tokenizer is used
    batch = task.collate(list(task.train_dataset()))
    before = task.evaluate([batch])
    optimizer = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=5e-2)
    for _ in range(8):
        loss, _ = task.training_step(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = task.evaluate([batch])
    assert after["loss"] < 0.5 * before["loss"] and after["next_token_accuracy"] > before["next_token_accuracy"]


@pytest.mark.slow
def test_chat_run_through_the_training_loop(tmp_path):
    import csv

    from train.engine.loop import train

    recipe = chat_recipe(tmp_path, "train.max_steps=12", "train.eval_every=0", "train.save_every=0")
    from train.tasks.lm import CausalLM

    task = CausalLM(recipe)
    before = task.evaluate([task.collate(list(task.eval_dataset()))])["loss"]
    train(recipe)
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    final = [float(r["value"]) for r in rows if r["split"] == "eval" and r["metric"] == "loss"][-1]
    assert final < 0.7 * before, (before, final)


def test_tiny_model_on_a_parquet_corpus_builds_and_keeps_its_word_tokenizer(tmp_path):
    from train.engine.config import load_recipe
    from train.tasks.lm import CausalLM

    corpus = write_records(tmp_path / "corpus.parquet",
                           [{"text": f"the {c} fox jumps over the lazy dog {i}"} for i, c in enumerate(COLOURS * 4)])
    out = tmp_path / "run"
    recipe = load_recipe(RECIPE, [*TINY, f"data.train={corpus}", "data.eval=null", "data.seq_len=8",
                                  f"train.out_dir={out}"])
    task = CausalLM(recipe)
    assert (out / "tokenizer.json").is_file()
    assert task.lm.config.vocab_size == len(task.tokenizer) and task.eval_dataset() is None
    data = task.train_dataset()
    eos = task.tokenizer.eos_token_id
    stream = [t for s in data.samples for t in s["input_ids"].tolist()]
    assert stream.count(eos) >= len(stream) // 10 and all(len(s["input_ids"]) == 8 for s in data.samples)
    batch = task.collate([data[0], data[1]])
    loss, _ = task.training_step(batch)
    loss.backward()
    ids = task.tokenizer("the lazy dog")["input_ids"]
    again = CausalLM(recipe)  # a resumed run: same ids from the saved tokenizer
    assert again.tokenizer("the lazy dog")["input_ids"] == ids and torch.isfinite(loss)


def test_text_recipe_keys_are_checked(tmp_path):
    from train.engine.config import load_recipe

    with pytest.raises(mm.ConfigError, match=r"key 'data.train': no such file .*missing.jsonl"):
        load_recipe(RECIPE, [f"data.train={tmp_path / 'missing.jsonl'}"])
    (tmp_path / "data.tsv").write_text("a\tb\n")
    with pytest.raises(mm.ConfigError, match=r"key 'data.train': .*data.tsv is not one of .jsonl"):
        load_recipe(RECIPE, [f"data.train={tmp_path / 'data.tsv'}"])


def test_bad_chat_record_through_mmtune_train_is_one_line(tmp_path, capsys):
    from train.cli import main

    folder = saved_model_folder(tmp_path / "model")
    data = tmp_path / "chat.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}\n', encoding="utf-8")
    capsys.readouterr()  # save_pretrained's progress bar above is not the command's output
    code = main(["train", "--config", str(RECIPE), *TINY, f"model.path={folder}", f"data.train={data}",
                 "data.eval=null", f"train.out_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("mmtune train: ") and "chat.jsonl: line 1: key 'messages[1]' needs string 'role' and 'content'" in err[0]


def test_a_tokenizer_larger_than_the_model_is_a_recipe_error(tmp_path):
    from train.engine.config import load_recipe
    from train.tasks.lm import CausalLM

    folder = saved_model_folder(tmp_path / "model")
    bigger = make_tokenizer_folder(tmp_path / "big", [f"word{i}" for i in range(100)])
    data = write_records(tmp_path / "corpus.jsonl", [{"text": "word1 word2 word3"}] * 4)
    recipe = load_recipe(RECIPE, [*TINY, f"model.path={folder}", f"model.tokenizer={bigger}", f"data.train={data}",
                                  "data.eval=null", "data.seq_len=4", f"train.out_dir={tmp_path / 'run'}"])
    with pytest.raises(mm.ConfigError, match=r"key 'model.tokenizer': the tokenizer has \d+ tokens but the model's "
                                             r"embedding has \d+ rows"):
        CausalLM(recipe)
