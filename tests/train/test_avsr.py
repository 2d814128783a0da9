"""The AVSR task: Matryoshka training over rate pairs, sequence layout, decoding, validation, the recipes."""

from __future__ import annotations

import pytest
import torch

import mm
from mm.route import route
from train.engine.config import load_recipe, recipe_from_dict
from train.engine.task import get_task
from train.tasks.avsr_model import VocabTokenizer, pair_name, rate_pairs

PAIRS = ["a4_v2", "a4_v5", "a16_v2", "a16_v5"]


def raw_recipe(root, strategy="mss", **model) -> dict:
    return {
        "task": "avsr", "seed": 0,
        "model": {"audio": {"window_seconds": 2.5, "d_model": 32, "layers": 1, "ffn_dim": 64, "init_std": 0.3},
                  "llm": {"hidden_size": 32, "intermediate_size": 64, "layers": 1}, "projector_hidden": 32, **model},
        "data": {"root": str(root), "crop_size": 32},
        "synthetic": {"splits": {"train": 6, "test": 3}, "engine": "tones"},
        "adapters": {"mtsk": {"method": "mtsk", "strategy": strategy, "targets": ["q_proj", "v_proj"], "r": 4,
                              "scales": [pair_name(a, v) for a, v in rate_pairs(_model_config(model)).values()]}},
        "train": {"batch_size": 3, "max_steps": 2, "progress": False},
    }


def _model_config(model: dict):
    from train.tasks.avsr_model import AVSRModelConfig

    return AVSRModelConfig(**{k: v for k, v in model.items() if k in ("audio_rates", "video_rates")})


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("avsr")


def build(root, **options):
    recipe = recipe_from_dict(raw_recipe(root, **options), name="t", source="test")
    torch.manual_seed(0)
    task = get_task("avsr")(recipe)
    batch = task.collate([task.train_dataset()[i] for i in range(3)])
    return task, batch


def test_training_step_averages_every_pair_and_trains_all_scales(root):
    task, batch = build(root)
    assert list(task.model.pairs) == PAIRS
    loss, logs = task.training_step(batch)
    assert set(logs) == {f"loss_{p}" for p in PAIRS}
    assert float(loss.detach()) == pytest.approx(sum(logs.values()) / 4, rel=1e-5)
    for name, param in task.named_parameters():  # B = 0 at init: give A a gradient path first
        if param.requires_grad and name.endswith("lora_B"):
            param.data.normal_(0, 0.1)
    loss, _ = task.training_step(batch)
    loss.backward()
    trained = {n for n, p in task.named_parameters() if p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0}
    for pair in PAIRS:
        assert any(f"scale_loras.{pair}." in n for n in trained), f"scale LoRA {pair} got no gradient"
    assert any(".global_lora." in n for n in trained)
    for rate in ("4", "16"):
        assert any(f"audio_proj.projectors.{rate}." in n for n in trained)
    for rate in ("2", "5"):
        assert any(f"video_proj.projectors.{rate}." in n for n in trained)
    frozen = [n for n, p in task.named_parameters() if p.requires_grad and ("encoder" in n or "embed" in n)]
    assert not frozen, f"encoders / LM weights must stay frozen: {frozen[:3]}"


def test_sum_reduction_and_single_modality_pairs(root):
    task, batch = build(root, matryoshka_loss="sum")
    loss, logs = task.training_step(batch)
    assert float(loss.detach()) == pytest.approx(sum(logs.values()), rel=1e-5)
    audio_only, batch = build(root, video_rates=[])
    assert list(audio_only.model.pairs) == ["a4", "a16"] and audio_only.model.video_encoder is None
    _, logs = audio_only.training_step(batch)
    assert set(logs) == {"loss_a4", "loss_a16"}
    video_only, batch = build(root, audio_rates=[])
    assert list(video_only.model.pairs) == ["v2", "v5"] and video_only.model.audio_encoder is None


@pytest.mark.parametrize("layout", ["reference", "compact"])
def test_layout_left_pads_and_labels_text_only(root, layout):
    task, batch = build(root, layout=layout)
    model = task.model.eval()
    encoded = model.encode(batch)
    prefixes = model.av_tokens(encoded, "a16_v5")
    texts = [[9, 10], [11], [12, 13, 14]]
    embeds, mask, positions, labels = model.layout(prefixes, texts)
    for i, (prefix, text) in enumerate(zip(prefixes, texts, strict=True)):
        length = len(prefix) + len(text) + (2 if layout == "compact" else 1)  # BOS is in the reference prefix
        assert mask[i].sum() == length and mask[i, -length:].all()
        assert positions[i, -length:].tolist() == list(range(length))
        assert labels[i][labels[i] != -100].tolist() == [*text, VocabTokenizer.EOS]
    with torch.no_grad(), route(scale="a16_v5"):  # a padded row gives the logits it gives alone
        logits = model.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
        alone = model.layout(prefixes[:1], texts[:1])
        single = model.lm(inputs_embeds=alone[0], attention_mask=alone[1], position_ids=alone[2]).logits
    n = single.shape[1]
    torch.testing.assert_close(logits[0, -n:], single[0], rtol=1e-4, atol=1e-4)


def test_reference_layout_order_on_a_built_batch(root):
    """BOS, <audio> audio </audio>, <video> video </video>, the authors' prompt, text, EOS (Omni-AVSR's
    modeling_AVSRLLM.py), read back from the embeddings of a built batch."""
    task, batch = build(root)
    model = task.model.eval()
    assert model.config.layout == "reference"  # the default
    encoded = model.encode(batch)
    tok = model.tokenizer
    prompt = tok.encode("Transcribe speech and video to text.")
    assert VocabTokenizer.UNK not in prompt  # the prompt's words are in the vocabulary
    text = tok.encode(batch["text"][1])
    with torch.no_grad():
        audio, audio_len = model.audio_proj(encoded.audio, encoded.audio_lengths, 16)
        video, video_len = model.video_proj(encoded.video, encoded.video_lengths, 5)
        embeds, mask, _, labels = model.layout(model.av_tokens(encoded, "a16_v5"), [[], text, []])
        row = embeds[1][mask[1].bool()]
        ids = model.embed_ids
        expected = torch.cat([ids([tok.BOS, tok.tags["<audio>"]]), audio[1, : int(audio_len[1])],
                              ids([tok.tags["</audio>"], tok.tags["<video>"]]), video[1, : int(video_len[1])],
                              ids([tok.tags["</video>"], *prompt, *text, tok.EOS])])
    torch.testing.assert_close(row, expected, rtol=0, atol=0)
    assert len(set(tok.tags.values()) | {tok.BOS, tok.EOS, tok.PAD, tok.UNK}) == 8
    assert labels[1][mask[1].bool()][-len(text) - 1:].tolist() == [*text, tok.EOS]
    assert (labels[1][mask[1].bool()][: -len(text) - 1] == -100).all()


def test_cached_decoding_equals_full_recomputation(root):
    task, batch = build(root)
    model = task.model.eval()
    for param in model.parameters():  # a non-trivial model: perturb what trains
        if param.requires_grad:
            param.data.add_(torch.randn_like(param) * 0.3)
    encoded = model.encode(batch)
    fast = model.transcribe(encoded, "a4_v5", max_new_tokens=5)
    slow = []
    with torch.no_grad(), route(scale="a4_v5"):
        prefixes = model.av_tokens(encoded, "a4_v5")
        for prefix in prefixes:
            ids: list[int] = []
            for _ in range(5):
                embeds, mask, positions, _ = model.layout([prefix], None)
                extra = model.lm.get_input_embeddings()(torch.tensor([ids], dtype=torch.long))
                embeds = torch.cat([embeds, extra], 1)
                mask = torch.ones(1, embeds.shape[1], dtype=torch.long)
                logits = model.lm(inputs_embeds=embeds, attention_mask=mask,
                                  position_ids=torch.arange(embeds.shape[1])[None]).logits
                ids.append(int(logits[0, -1].argmax()))
                if ids[-1] == VocabTokenizer.EOS:
                    break
            slow.append(model.tokenizer.decode(ids))
    assert fast == slow


def test_evaluate_reports_wer_per_pair(root, monkeypatch):
    task, batch = build(root)
    monkeypatch.setattr(task.model, "transcribe", lambda encoded, pair, max_new_tokens=None: (
        batch["text"] if pair == "a4_v2" else ["wrong"] * len(batch["text"])))
    metrics = task.evaluate([batch])
    assert metrics["wer_a4_v2"] == 0.0 and metrics["cer_a4_v2"] == 0.0
    assert metrics["wer_a16_v5"] > 0.5
    assert {f"wer_{p}" for p in PAIRS} <= set(metrics) and metrics["loss"] > 0


def test_vocab_tokenizer():
    tok = VocabTokenizer.from_texts(["one two", "Turn left!"], "words")
    assert tok.symbols == ["left", "one", "turn", "two"] and tok.vocab_size == 4 + 4 + 4
    ids = tok.encode("turn two three")
    first = VocabTokenizer.FIRST_SYMBOL  # after pad, BOS, EOS, unknown and the four modality tags
    assert ids == [first + 2, first + 3, VocabTokenizer.UNK]
    assert tok.decode([first + 2, first + 3, VocabTokenizer.EOS, first]) == "turn two"
    chars = VocabTokenizer.from_texts(["ab"], "chars")
    assert chars.decode(chars.encode("ba")) == "ba"


@pytest.mark.parametrize("change, message", [
    ({"model": {"audio_rates": [], "video_rates": []}}, "both empty"),
    ({"model": {"llm": {"tokenizer": "hf"}}}, "'model.llm.tokenizer' is 'hf'"),
    ({"model": {"llm": {"path": "/x"}}}, "needs model.llm.tokenizer: hf"),
    ({"adapters": {"mtsk": {"method": "mtsk", "strategy": "ss", "targets": ["q_proj"], "scales": ["a4_v2"]}}},
     r"adapters.mtsk.scales \['a4_v2'\] must be the rate pairs"),
    ({"adapters": {}}, "give 'adapters'"),
])
def test_recipe_validation_names_the_key(tmp_path, change, message):
    raw = raw_recipe(tmp_path)
    for section, values in change.items():
        raw[section] = {**raw[section], **values} if values else {}
    with pytest.raises(mm.ConfigError, match=message):
        recipe_from_dict(raw, name="bad", source="bad.yaml")


def test_recipes_load_with_their_pairs():
    from pathlib import Path

    configs = Path(__file__).resolve().parents[2] / "configs" / "avsr"
    found = {p.stem: load_recipe(p) for p in sorted(configs.glob("*.yaml"))}
    assert {"mtsk_ms", "mtsk_ss", "mtsk_mss", "audio_only", "video_only"} <= set(found)
    for strategy in ("ms", "ss", "mss"):
        assert found[f"mtsk_{strategy}"].adapters["mtsk"].strategy == strategy
        assert list(rate_pairs(found[f"mtsk_{strategy}"].model)) == PAIRS
    assert list(rate_pairs(found["audio_only"].model)) == ["a4", "a16"]
    assert list(rate_pairs(found["video_only"].model)) == ["v2", "v5"]
    for name, recipe in found.items():  # every recipe: the authors' layout and parametrisation, q and v only
        adapter = recipe.adapters["mtsk"]
        assert recipe.model.layout == "reference", name
        assert adapter.parametrisation == "reference" and adapter.targets == ["q_proj", "v_proj"], name


def test_recipe_adapts_only_q_and_v_with_width_over_r_bottlenecks(root):
    task, _ = build(root)  # the tiny recipe of this file: mtsk on q_proj and v_proj, r=4, LM width 32
    layers = dict(mm.adapted_layers(task.model.lm))
    assert layers and {name.rsplit(".", 1)[-1] for name in layers} == {"q_proj", "v_proj"}
    for layer in layers.values():
        assert layer.adapters["mtsk"].global_lora.lora_A.shape == (32 // 4, 32)


@pytest.mark.slow
def test_learns_to_use_the_audio_visual_tokens(root):
    """MSS trained on three tone utterances: the loss falls, and the true audio-visual tokens explain the
    transcripts better than the same tokens shuffled between utterances (the LM reads them)."""
    from train.tasks.avsr_model import EncodedAV

    raw = raw_recipe(root)
    raw["model"]["llm"], raw["model"]["projector_hidden"] = {}, 64  # the default tiny LM: 2 layers, width 64
    raw["adapters"]["mtsk"]["targets"] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    torch.manual_seed(0)
    task = get_task("avsr")(recipe_from_dict(raw, name="t", source="test"))
    batch = task.collate([task.train_dataset()[i] for i in range(3)])
    params = [p for p in task.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    first = None
    for _ in range(60):
        loss, _ = task.training_step(batch)
        first = first if first is not None else float(loss.detach())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(loss.detach()) < 0.8 * first
    task.eval()
    with torch.no_grad():
        encoded = task.model.encode(batch)
        right, _ = task.model.loss(encoded, batch["text"])
        perm = [1, 2, 0]
        shuffled = EncodedAV(encoded.audio[perm], encoded.audio_lengths[perm], encoded.video[perm],
                             encoded.video_lengths[perm])
        wrong, _ = task.model.loss(shuffled, batch["text"])
    assert float(wrong) > float(right) + 0.1


@pytest.mark.slow
def test_train_then_eval_command(root, tmp_path, capsys):
    """`mmtune train` on a tiny recipe, then `mmtune eval` prints WER per rate pair, clean and noisy."""
    import yaml

    from train.cli import main

    raw = raw_recipe(root)
    raw["train"]["out_dir"] = str(tmp_path / "run")
    path = tmp_path / "tiny_mtsk.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["train", "--config", str(path)]) == 0
    assert (tmp_path / "run" / "adapters.safetensors").is_file()
    capsys.readouterr()
    assert main(["eval", "--config", str(path), "--snr", "0"]) == 0
    out = capsys.readouterr().out
    assert "| rate pair | WER clean | WER 0 dB |" in out
    for pair in PAIRS:
        assert f"| {pair} |" in out


def test_eval_command_table_and_errors(tmp_path):
    from train.commands.eval import evaluate_run, format_results

    results = {"clean": {"loss": 1.0, "wer_a4_v2": 0.25, "cer_a4_v2": 0.1},
               "0 dB": {"loss": 1.2, "wer_a4_v2": 0.5, "cer_a4_v2": 0.2}}
    assert format_results(results).splitlines() == [
        "| rate pair | WER clean | WER 0 dB | CER clean | CER 0 dB |", "|---|---|---|---|---|",
        "| a4_v2 | 25.0 | 50.0 | 10.0 | 20.0 |"]
    assert format_results({"clean": {"accuracy": 0.5}}) == "clean: accuracy=0.5000"
    recipe = recipe_from_dict(raw_recipe(tmp_path), name="t", source="test")
    with pytest.raises(FileNotFoundError, match="not a finished run"):
        evaluate_run(recipe, tmp_path / "nothing", [], 4)
