"""The LLaVA-style MLLM: <image> splicing, the modality route, answer-only loss, cached generation, and
the staged `mllm` task (text -> projector -> instruct) through the training loop and `mmtune generate`."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from contract_cases import perturb

import mm
from data.fake_instruct import demo_texts, make_fake_instruct
from data.instruct import IGNORE_INDEX, ChatTemplate
from encoders.clip import create_clip
from encoders.llm import IMAGE_TOKEN, TinyLLMConfig, tiny_llm, word_tokenizer
from heads.mllm_projector import MLLMProjector
from mm.qladder import QLadder, QLadderConfig
from mm.route import current_route
from train.engine.config import recipe_from_dict
from train.tasks.mllm_model import LlavaModel

TINY = {"hidden_size": 32, "intermediate_size": 64, "layers": 2, "heads": 4, "kv_heads": 2}


def build(ladder: bool = False) -> tuple[LlavaModel, object]:
    tok = word_tokenizer([*demo_texts(), *ChatTemplate().texts()])
    llm = tiny_llm(len(tok), TinyLLMConfig(**TINY), seed=0).eval()
    clip = create_clip("tiny-test", seed=0).model
    qladder = QLadder(QLadderConfig(num_queries=3, mlp_ratio=1.0), width=32, depth=2, heads=2) if ladder else None
    model = LlavaModel(clip, MLLMProjector("mlp2x_gelu", 32, 32), llm, image_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
                       pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, ladder=qladder)
    return model.eval(), tok


def ids_of(tok, text: str) -> torch.Tensor:
    return torch.tensor(tok(text, add_special_tokens=False)["input_ids"])


def batch_of(tok, texts: list[str], *, side: str = "right", answer_from: int | None = None) -> dict:
    rows = [ids_of(tok, t) for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, row in enumerate(rows):
        span = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        ids[b, span], mask[b, span] = row, 1
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    if answer_from is not None:
        labels[:, :answer_from] = IGNORE_INDEX
    has_image = torch.tensor([IMAGE_TOKEN in t for t in texts])
    images = torch.randn(int(has_image.sum()), 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "images": images, "has_image": has_image}


@pytest.mark.parametrize("ladder", [False, True])
def test_image_tokens_replace_the_placeholder(ladder):
    model, tok = build(ladder)
    batch = batch_of(tok, ["what digit <image> is shown ?", "what color ?"])
    out = model.splice(batch["input_ids"], batch["attention_mask"], batch["images"], batch["has_image"],
                       labels=batch["labels"])
    image = model.image_tokens(batch["images"])[0]
    n = 16 + (3 if ladder else 0)  # 4x4 patches of the 32px tiny tower (+ ladder queries)
    assert image.shape == (n, 32)
    text = model.llm.get_input_embeddings()(batch["input_ids"][0])
    p = 2  # "what digit" before the placeholder
    row = out["inputs_embeds"][0]
    torch.testing.assert_close(row[:p], text[:p])
    torch.testing.assert_close(row[p:p + n], image)
    torch.testing.assert_close(row[p + n:p + n + 3], text[p + 1:])
    assert out["vision_mask"][0].nonzero().flatten().tolist() == list(range(p, p + n))
    assert (out["labels"][0, p:p + n] == IGNORE_INDEX).all()
    assert out["labels"][0, p + n:p + n + 3].tolist() == batch["input_ids"][0, p + 1:].tolist()
    assert out["attention_mask"].sum(1).tolist() == [6 - 1 + n, 3]
    assert not out["vision_mask"][1].any()
    torch.testing.assert_close(out["inputs_embeds"][1, :3], model.llm.get_input_embeddings()(batch["input_ids"][1, :3]))
    left = model.splice(batch["input_ids"], batch["attention_mask"], batch["images"], batch["has_image"], side="left")
    assert left["attention_mask"][1].tolist() == [0] * (n + 2) + [1] * 3
    assert left["position_ids"][1, -3:].tolist() == [0, 1, 2]


def test_placeholder_and_image_must_agree():
    model, tok = build()
    batch = batch_of(tok, ["what color ?"])
    with pytest.raises(ValueError, match="row 0 has an image but 0 <image> tokens"):
        model.splice(batch["input_ids"], batch["attention_mask"], torch.zeros(1, 3, 32, 32), torch.tensor([True]))
    batch = batch_of(tok, ["what <image> color ?"])
    with pytest.raises(ValueError, match="row 0 has an <image> token but no image"):
        model.splice(batch["input_ids"], batch["attention_mask"], None, torch.tensor([False]))


def test_llm_layers_see_the_vision_mask_and_loss_covers_answers_only():
    model, tok = build()
    mm.attach(model.llm, mm.AdapterConfig.from_dict({"method": "mm_lora", "targets": ["q_proj", "down_proj"], "r": 2}))
    perturb(model.llm, seed=1)
    seen = []
    layer = model.llm.get_submodule("model.layers.1.mlp.down_proj")
    layer.register_forward_pre_hook(lambda *_: seen.append(current_route().token_masks["vision"].clone()))
    batch = batch_of(tok, ["what digit <image> is shown ? seven", "what color ? red"], answer_from=4)
    loss, answer_loss, count = model.loss(batch)
    inputs = model.splice(batch["input_ids"], batch["attention_mask"], batch["images"], batch["has_image"],
                          labels=batch["labels"])
    assert torch.equal(seen[0], inputs["vision_mask"])
    logits = model.forward_llm(inputs).logits[:, :-1]
    target = inputs["labels"][:, 1:]
    keep = target != IGNORE_INDEX
    assert count == int(keep.sum()) == 3  # "shown ? seven": the unmasked labels of row 0; row 1 has none
    torch.testing.assert_close(answer_loss, F.cross_entropy(logits[keep], target[keep]))
    torch.testing.assert_close(loss, answer_loss)  # no mixture adapters: no balance loss


def test_cached_generation_equals_full_recomputation():
    model, tok = build(ladder=True)
    mm.attach(model.llm, mm.AdapterConfig.from_dict({"method": "mm_lora", "targets": ["q_proj", "v_proj", "up_proj"],
                                                     "r": 2, "vision_r": 3}))
    perturb(model.llm, seed=2, scale=0.5)
    batch = batch_of(tok, ["<image> what digit is shown ?", "how many shapes ?"], side="left")
    got = model.generate(batch["input_ids"], batch["attention_mask"], batch["images"], batch["has_image"],
                         max_new_tokens=5)
    for b in range(2):  # reference: re-run the whole sequence for every new token, no cache
        keep = batch["attention_mask"][b].bool()
        ids = batch["input_ids"][b][keep][None]
        images = batch["images"][:1] if batch["has_image"][b] else None
        want = []
        for _ in range(5):
            inputs = model.splice(ids, torch.ones_like(ids), images, batch["has_image"][b:b + 1])
            token = int(model.forward_llm(inputs).logits[0, -1].argmax())
            if token == tok.eos_token_id:
                break
            want.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        assert got[b] == want


# ---------------------------------------------------------------------------------------------- the task


def recipe(tmp_path, stage: str, out: str, **model):
    data = {"text": "text", "projector": "captions", "instruct": "instruct"}[stage]
    raw = {
        "task": "mllm", "seed": 0,
        "model": {"stage": stage, "tiny": TINY, "vision": "tiny-test", "max_new_tokens": 6, **model},
        "data": {"train": str(tmp_path / "data" / f"{data}_train.json"),
                 "eval": str(tmp_path / "data" / f"{data}_eval.json"), "fake_images": 12},
        "optim": {"lr": 3e-3}, "train": {"max_steps": 4, "batch_size": 8, "out_dir": str(tmp_path / out),
                                         "progress": False},
    }
    if stage == "instruct":
        raw["adapters"] = model.pop("adapters")
        raw["model"].pop("adapters")
    return recipe_from_dict(raw, name=out, source=f"{out}.yaml")


def test_stage_checks_are_config_errors(tmp_path):
    with pytest.raises(mm.ConfigError, match="stage 'projector' trains no adapters"):
        recipe_from_dict({"task": "mllm", "model": {"stage": "projector"}, "data": {"fake_images": 2},
                          "adapters": {"a": {"method": "lora", "targets": ["q_proj"]}}}, name="x", source="x.yaml")
    with pytest.raises(mm.ConfigError, match="x.yaml: key 'data.train': no such file"):
        recipe_from_dict({"task": "mllm", "data": {"train": str(tmp_path / "none.json")}}, name="x", source="x.yaml")
    with pytest.raises(mm.ConfigError, match="key 'model.projector'"):
        recipe_from_dict({"task": "mllm", "model": {"projector": "mlp0x_relu"}, "data": {"fake_images": 2}},
                         name="x", source="x.yaml")
    with pytest.raises(mm.ConfigError, match="model.qladder: unknown key"):
        recipe_from_dict({"task": "mllm", "model": {"qladder": {"queries": 2}}, "data": {"fake_images": 2}},
                         name="x", source="x.yaml")


@pytest.mark.slow
def test_three_stages_train_and_generate(tmp_path, capsys):
    from safetensors.torch import load_file

    from train.cli import main
    from train.engine.loop import train

    text = train(recipe(tmp_path, "text", "text"))
    assert text.losses[4] < text.losses[1]
    tokenizer = str(tmp_path / "text" / "tokenizer.json")
    llm_weights = str(tmp_path / "text" / "trainable.safetensors")
    assert all(k.startswith("model.llm.") for k in load_file(llm_weights))
    train(recipe(tmp_path, "projector", "projector", tokenizer=tokenizer, init_from=[llm_weights]))
    projector = str(tmp_path / "projector" / "trainable.safetensors")
    assert {k.split(".")[1] for k in load_file(projector)} == {"projector"}  # the LLM stayed frozen
    adapters = {"default": {"method": "mm_lora", "targets": ["q_proj", "v_proj", "down_proj"], "r": 2}}
    result = train(recipe(tmp_path, "instruct", "arcana", tokenizer=tokenizer, init_from=[llm_weights, projector],
                          qladder={"num_queries": 2, "mlp_ratio": 1.0}, adapters=adapters))
    assert {"em", "em_count", "em_color", "em_shape", "em_brief", "em_sentence", "loss"} <= set(result.eval_metrics)
    assert {k.split(".")[1] for k in load_file(tmp_path / "arcana" / "trainable.safetensors")} == {"projector", "ladder"}
    record = json.loads((tmp_path / "data" / "instruct_eval.json").read_text())[0]
    question = record["conversations"][0]["value"].removeprefix("<image>\n")
    capsys.readouterr()
    code = main(["generate", "--config", str(tmp_path / "arcana" / "config.yaml"), "--image",
                 str(tmp_path / "data" / record["image"]), "--prompt", question])
    printed = capsys.readouterr().out.rstrip("\n")
    # The same answer as the trained task gives its own eval sample of that image and question:
    from train.engine.checkpoint import load_trainable
    from train.engine.config import load_recipe
    from train.tasks.mllm import MLLMTask

    task = MLLMTask(load_recipe(tmp_path / "arcana" / "config.yaml"))
    load_trainable(task, tmp_path / "arcana")
    task.eval()
    assert code == 0 and printed == task.answer(task.collate([task.eval_dataset()[0]]))[0]


@pytest.mark.slow
def test_mole_stage_adds_the_balance_loss(tmp_path):
    from train.tasks.mllm import MLLMTask

    make_fake_instruct(tmp_path / "data", 6, seed=0)
    adapters = {"attn": {"method": "lora", "targets": ["q_proj"], "r": 2},
                "mlp": {"method": "mole", "targets": ["gate_proj", "up_proj", "down_proj"], "num_experts": 3, "r": 2}}
    task = MLLMTask(recipe(tmp_path, "instruct", "mole", adapters=adapters))
    trainable = {n.split(".adapters.")[-1].split(".")[0] for n, p in task.named_parameters() if p.requires_grad}
    assert trainable >= {"attn", "mlp"}
    batch = task.collate([task.train_dataset()[i] for i in range(4)])
    loss, logs = task(batch)  # what the loop calls
    assert loss.item() > logs["answer_loss"]  # answer cross-entropy + the routers' balance loss
    assert loss.item() == pytest.approx(logs["answer_loss"] + logs["moe_aux_loss"], rel=1e-5)
    assert 0 < logs["moe_router_entropy"] <= math.log(3) + 1e-6 and 1 / 3 <= logs["moe_max_expert_share"] <= 1
    loss.backward()
    router = next(p for n, p in task.named_parameters() if "router" in n)
    assert router.grad is not None and router.grad.abs().sum() > 0


def test_missing_earlier_stage_and_bad_vision_layer_are_named(tmp_path):
    from train.tasks.mllm import MLLMTask

    make_fake_instruct(tmp_path / "data", 2, seed=0)
    with pytest.raises(mm.ConfigError, match=r"key 'model.vision_layer' is 5; the tower 'tiny-test' has 2 blocks"):
        MLLMTask(recipe(tmp_path, "projector", "p", vision_layer=5))
    with pytest.raises(mm.ConfigError, match=r"key 'model.init_from': no such file .*nope.safetensors"):
        MLLMTask(recipe(tmp_path, "projector", "p", init_from=[str(tmp_path / "nope.safetensors")]))
