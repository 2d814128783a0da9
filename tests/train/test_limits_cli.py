"""``mmtune limits --config recipe.yaml``: one batch of a real recipe through its adapted attention layers,
a Markdown row and a JSON record per layer; bad input is one line, exit 2."""

from __future__ import annotations

import json
import math

from train_helpers import FAST, ROOT

from train.cli import main

LLAMA = str(ROOT / "configs" / "tiny" / "llama_lora.yaml")


def _rows(out: str) -> dict[str, list[str]]:
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| lm.") and len(cells) == 15:
            rows[cells[0]] = cells
    return rows


def test_limits_of_the_tiny_llama_recipe(tmp_path, capsys):
    target = tmp_path / "out" / "limits.json"
    code = main(["limits", "--config", LLAMA, "--batch-size", "4", "--json", str(target), "data.seq_len=48"])
    out = capsys.readouterr().out
    assert code == 0
    rows = _rows(out)
    assert sorted(rows) == ["lm.model.layers.0.self_attn", "lm.model.layers.1.self_attn"]
    record = json.loads(target.read_text())
    assert record["tolerance"] == 1e-3 and len(record["layers"]) == 2
    for layer in record["layers"]:
        assert layer["adapted"] == "q,k,v" and layer["seq_len"] == 48 and layer["head_dim"] == 16
        assert layer["threshold"] == math.sqrt(math.log(48))
        assert layer["gamma"] == math.sqrt(layer["scale"] * 16) * max(layer["q_max"], layer["k_max"])
        assert layer["side"] == ("below" if layer["gamma"] < layer["threshold"] else "above")
        assert layer["delta_max"] == 0.0  # LoRA's B starts at zero: the untrained adapter adds nothing yet
        assert rows[layer["layer"]][10] == layer["side"]


def test_a_tighter_threshold_scale_moves_layers_above(capsys):
    assert main(["limits", "--config", LLAMA, "--batch-size", "2", "--threshold-scale", "0.01"]) == 0
    out = capsys.readouterr().out
    record = json.loads(out[out.index("{"):])
    assert {layer["side"] for layer in record["layers"]} == {"above"}


def test_a_recipe_without_adapted_attention_is_one_line(capsys):
    digits = str(ROOT / "configs" / "tiny" / "digits_lora.yaml")
    assert main(["limits", "--config", digits]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith("mmtune limits: ") and "digits_lora.yaml" in err and "no adapted attention layer" in err


def test_bad_settings_are_one_line(tmp_path, capsys):
    assert main(["limits", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    assert main(["limits", "--config", LLAMA, "--tolerance", "0"]) == 2
    assert "--tolerance" in capsys.readouterr().err


def test_a_trained_run_is_measured_with_its_adapters(tmp_path, capsys):
    from train.engine.config import load_recipe
    from train.engine.loop import train

    run = tmp_path / "run"
    train(load_recipe(LLAMA, [*FAST, f"train.out_dir={run}", "train.max_steps=3", "train.batch_size=4"]),
          say=lambda *a: None)
    capsys.readouterr()
    assert main(["limits", "--run", str(run), "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    record = json.loads(out[out.index("{"):])
    assert all(layer["delta_max"] > 0 for layer in record["layers"])  # trained B is no longer zero
    assert main(["limits", "--run", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err
