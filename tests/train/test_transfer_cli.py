"""``mmtune transfer``: a trained causal_lm run (tiny Llama) and a few seed examples (jsonl) in, a run folder of
another base (a wider, deeper tiny Llama) out, whose transferred adapter ``mmtune eval`` reads; bad input is one
line, exit 2, naming the file (and line)."""

from __future__ import annotations

import json

import pytest
import yaml
from train_helpers import FAST, LLAMA

import mm
from train.cli import main
from train.engine.config import load_recipe
from train.engine.loop import train

SMALL = ["data.seq_len=8", "data.train_size=32", "data.eval_size=8", "data.strides=[-1,-2]", "train.batch_size=8"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("transfer")
    train(load_recipe(LLAMA, [*FAST, *SMALL, "train.max_steps=3", f"train.out_dir={root / 'src'}"]))
    target = yaml.safe_load(LLAMA.read_text())
    target["seed"] = 1
    target["model"].update(hidden_size=48, intermediate_size=96, layers=3)
    target["data"].update(seq_len=8, train_size=32, eval_size=8, strides=[-1, -2])
    target["train"] = {"threads": 1, "progress": False}
    (root / "target.yaml").write_text(yaml.safe_dump(target))
    seeds = [[(s - 2 * i) % 64 for i in range(8)] for s in range(0, 60, 10)]
    (root / "seeds.jsonl").write_text("".join(json.dumps({"input_ids": row}) + "\n" for row in seeds))
    return root


def _transfer(root, out, *extra):
    return main(["transfer", "--source", str(root / "src"), "--target", str(root / "target.yaml"), "--seeds",
                 str(root / "seeds.jsonl"), "--out", str(out), "--synthetic", "12", "--steps", "2", *extra])


def test_transfer_writes_a_run_folder_of_the_target_with_its_metrics(setup, tmp_path, capsys):
    out = tmp_path / "moved"
    assert _transfer(setup, out, "--no-filter") == 0
    printed = capsys.readouterr().out
    assert "6 seeds, 12 synthetic, 12 kept (no filter)" in printed
    assert "| target base alone |" in printed and "| target, transferred adapter |" in printed
    summary = json.loads((out / "transfer.json").read_text())
    assert summary["generated"] == 12 and summary["kept"] == 12 and summary["seeds"] == 6
    configs, tensors = mm.state.read_adapter_file(out / "adapters.safetensors")
    assert list(configs) == ["default"]
    assert tensors["default/lm.model.layers.2.self_attn.q_proj.lora_B"].shape == (48, 8)  # the target's shape
    assert tensors["default/lm.model.layers.2.self_attn.q_proj.lora_B"].abs().sum() > 0  # it trained
    assert main(["eval", "--run", str(out), "--batch-size", "8"]) == 0
    assert "next_token_accuracy" in capsys.readouterr().out
    assert _transfer(setup, tmp_path / "filtered", "--threshold", "0.0") == 0
    assert "12 kept (threshold 0)" in capsys.readouterr().out


@pytest.mark.parametrize(("seeds", "expected"), [
    ('{"input_ids": [1, 2, 3]}\n', "seeds.jsonl: 1 seed example(s); Trans-LoRA needs at least 2"),
    ('{"input_ids": [1, 2, 3]}\n{"ids": [1]}\n', "seeds.jsonl line 2: expected {'input_ids': [token ids >= 0]}"),
    ('{"input_ids": [1, 2, 3]}\nnope\n', "seeds.jsonl line 2: not valid JSON"),
    ('{"input_ids": [1, 2, 3]}\n{"input_ids": [1, 2]}\n', "seeds.jsonl line 2: 2 tokens; the first seed has 3"),
    ('{"input_ids": [1, 2, 3]}\n{"input_ids": [1, 2, 99]}\n', "seeds.jsonl: token id 99 is outside"),
])
def test_bad_seeds_are_one_line_naming_file_and_line(setup, tmp_path, capsys, seeds, expected):
    (tmp_path / "seeds.jsonl").write_text(seeds)
    code = main(["transfer", "--source", str(setup / "src"), "--target", str(setup / "target.yaml"), "--seeds",
                 str(tmp_path / "seeds.jsonl"), "--out", str(tmp_path / "out"), "--steps", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("mmtune transfer: ") and expected in err and "\n" not in err
    assert not (tmp_path / "out" / "adapters.safetensors").exists()


def test_a_source_that_is_not_a_finished_run_is_named(setup, tmp_path, capsys):
    assert main(["transfer", "--source", str(tmp_path), "--target", str(setup / "target.yaml"), "--seeds",
                 str(setup / "seeds.jsonl"), "--out", str(tmp_path / "out")]) == 2
    assert f"{tmp_path}: not a run folder (no config.yaml)" in capsys.readouterr().err
