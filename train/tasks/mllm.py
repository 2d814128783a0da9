"""The ``mllm`` task: LLaVA-style visual instruction tuning in stages (recipes in configs/mllm/).

- ``stage: text``: a miniature stand-in for a pretrained LLM: the whole (tiny) LLM trains on text-only
  records. Real users skip it and pass a pretrained ``model.llm``.
- ``stage: projector``: feature alignment: only the projector (and a QLadder, if any) trains; the vision
  tower and the LLM are frozen, no adapters.
- ``stage: instruct``: the recipe's adapters on the LLM (LoRA, MM-LoRA, MoLE...) train together with the
  projector (``train_projector``) and the QLadder.

Each stage starts from the tensors an earlier run saved (``model.init_from``: its trainable.safetensors),
and shares the earlier run's tokenizer (``model.tokenizer``). With no tokenizer and no ``model.llm``, a
word-level tokenizer is built from the data and saved as ``<out_dir>/tokenizer.json``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn

import mm
from data.instruct import (
    InstructCollator,
    InstructDataConfig,
    InstructDataset,
    normalize_answer,
    read_records,
)
from encoders.llm import TinyLLMConfig
from train.engine.task import TASKS, AdapterTask
from train.tasks.mllm_model import LlavaModel


@dataclass
class MLLMModelConfig:
    stage: Literal["text", "projector", "instruct"] = field(
        default="instruct", metadata={"help": "What trains: the whole tiny LLM on text ('text'), the projector "
                                              "alone ('projector'), or adapters + projector ('instruct')."})
    llm: str | None = field(default=None, metadata={
        "help": "Local folder (or hub name) of a transformers causal LM; null: a tiny Llama of model.tiny sizes."})
    tiny: TinyLLMConfig = field(default_factory=TinyLLMConfig, metadata={"help": "Sizes of the tiny LLM."})
    tokenizer: str | None = field(default=None, metadata={
        "help": "Tokenizer folder or tokenizer.json (null: model.llm's own, else a word-level one from the data)."})
    vision: str = field(default="tiny-test", metadata={"help": "open_clip model name or encoders.clip tiny config."})
    vision_pretrained: str | None = field(default=None, metadata={
        "help": "Local CLIP checkpoint (or an open_clip tag, which needs the network); null: random init."})
    vision_seed: int = field(default=0, metadata={"help": "Seed of a random-init tower (the same in every stage)."})
    vision_layer: int = field(default=-1, metadata={
        "help": "Which vision block's input gives the patch tokens (-1: the last block's, LLaVA's penultimate layer)."})
    qladder: dict[str, Any] | None = field(default=None, metadata={
        "help": "Arcana's QLadder beside the tower (mm.qladder.QLadderConfig keys); null: none."})
    projector: str = field(default="mlp2x_gelu", metadata={"help": "'linear' or 'mlp<N>x_gelu'."})
    train_projector: bool = field(default=True, metadata={"help": "Stage instruct: train the projector too."})
    init_from: list[str] = field(default_factory=list, metadata={
        "help": "safetensors files of earlier stages (trainable.safetensors) loaded before adapters attach."})
    max_new_tokens: int = field(default=16, metadata={"help": "Longest generated answer in evaluation."})


def load_tensors(module: nn.Module, paths: Sequence[str], source: str) -> None:
    """Copy every tensor of each file into ``module`` by name; names or shapes it lacks are errors."""
    from safetensors.torch import load_file

    state = module.state_dict()
    for path in paths:
        if not Path(path).is_file():
            raise mm.ConfigError(f"{source}: key 'model.init_from': no such file {path} (run the earlier stage)")
        tensors = load_file(path)
        unknown = sorted(set(tensors) - set(state))
        wrong = sorted(k for k in set(tensors) & set(state) if tensors[k].shape != state[k].shape)
        if unknown or wrong:
            raise mm.ConfigError(f"{source}: key 'model.init_from': {path} does not fit this model: "
                                 f"unknown tensors {unknown[:4]}, wrong shapes {wrong[:4]}")
        module.load_state_dict(tensors, strict=False)


@TASKS.register("mllm")
class MLLMTask(AdapterTask):
    """Vision tower (+ QLadder) -> projector -> ``<image>`` splice -> adapted LLM; loss on answers only."""

    sections: ClassVar[dict[str, type]] = {"model": MLLMModelConfig, "data": InstructDataConfig}

    def __init__(self, recipe: Any) -> None:
        super().__init__(recipe)
        from encoders.llm import ensure_image_token, hidden_size, load_llm, tiny_llm

        cfg, data = recipe.model, recipe.data
        if data.fake_images > 0 and not Path(data.train).is_file():
            from data.fake_instruct import make_fake_instruct

            make_fake_instruct(Path(data.train).parent, data.fake_images, seed=data.fake_seed)
        self.tokenizer = self._tokenizer()
        llm = load_llm(cfg.llm) if cfg.llm else tiny_llm(len(self.tokenizer), cfg.tiny,
                                                          pad_token_id=self.tokenizer.pad_token_id)
        image_id = ensure_image_token(self.tokenizer, llm)
        vision = ladder = projector = None
        self.image_transform = None
        if cfg.stage != "text":
            vision, ladder, self.image_transform = self._vision_tower()
            from heads.mllm_projector import MLLMProjector

            projector = MLLMProjector(cfg.projector, vision.visual.transformer.width, hidden_size(llm))
        self.model = LlavaModel(vision, projector, llm, image_id=image_id, pad_id=self.tokenizer.pad_token_id,
                                eos_id=self.tokenizer.eos_token_id, ladder=ladder, vision_layer=cfg.vision_layer)
        load_tensors(self, cfg.init_from, recipe.source)
        self._set_trainable()
        self._datasets: dict[str, InstructDataset] = {}

    def _vision_tower(self) -> tuple[nn.Module, nn.Module | None, Any]:
        from encoders.clip import create_clip
        from mm.qladder import QLadder, QLadderConfig

        cfg = self.recipe.model
        with torch.random.fork_rng():  # the tower's own seed must not reset the recipe's RNG stream
            bundle = create_clip(cfg.vision, cfg.vision_pretrained, seed=cfg.vision_seed)
        blocks = bundle.model.visual.transformer.resblocks
        if not -len(blocks) <= cfg.vision_layer < len(blocks):
            raise mm.ConfigError(f"{self.recipe.source}: key 'model.vision_layer' is {cfg.vision_layer}; the "
                                 f"tower {cfg.vision!r} has {len(blocks)} blocks")
        ladder = None
        if cfg.qladder is not None:
            ladder_cfg = QLadderConfig.from_dict(cfg.qladder, source=f"{self.recipe.source}: model.qladder")
            ladder = QLadder(ladder_cfg, width=bundle.model.visual.transformer.width, depth=len(blocks),
                             heads=blocks[0].attn.num_heads)
        return bundle.model, ladder, bundle.preprocess

    def _tokenizer(self) -> Any:
        from encoders.llm import load_tokenizer, word_tokenizer
        from mm.state import atomic_write

        cfg, data = self.recipe.model, self.recipe.data
        if cfg.tokenizer or cfg.llm:
            return load_tokenizer(cfg.tokenizer or cfg.llm)
        saved = self.recipe.out_dir / "tokenizer.json"
        if saved.is_file():  # a resumed run, or `mmtune generate` on a finished one
            return load_tokenizer(str(saved))
        texts = list(data.template.texts())
        for path in [data.train, *([data.eval] if data.eval else [])]:
            for record in read_records(path):
                turns = record.get("conversations", []) if isinstance(record, dict) else []
                texts += [t["value"] for t in turns if isinstance(t, dict) and isinstance(t.get("value"), str)]
        tokenizer = word_tokenizer(texts)
        atomic_write(saved, lambda tmp: tokenizer.backend_tokenizer.save(tmp))
        return tokenizer

    def _set_trainable(self) -> None:
        cfg, model = self.recipe.model, self.model
        if cfg.stage == "text":
            model.llm.requires_grad_(True)
            return
        model.llm.requires_grad_(False)
        if cfg.stage == "instruct" and self.recipe.adapters:
            self.adapt(model.llm)
        model.projector.requires_grad_(cfg.stage == "projector" or cfg.train_projector)
        if model.ladder is not None:
            model.ladder.requires_grad_(True)

    @classmethod
    def validate(cls, recipe: Any) -> None:
        from heads.mllm_projector import build_projector
        from mm.qladder import QLadderConfig

        cfg, source = recipe.model, recipe.source
        if cfg.stage != "instruct" and recipe.adapters:
            raise mm.ConfigError(f"{source}: stage {cfg.stage!r} trains no adapters; remove 'adapters' "
                                 "(they belong to stage 'instruct')")
        if cfg.qladder is not None:
            QLadderConfig.from_dict(cfg.qladder, source=f"{source}: model.qladder")
        try:
            build_projector(cfg.projector, 1, 1)
        except ValueError as err:
            raise mm.ConfigError(f"{source}: key 'model.projector': {err}") from None
        if recipe.data.fake_images <= 0 and not Path(recipe.data.train).is_file():
            raise mm.ConfigError(f"{source}: key 'data.train': no such file {recipe.data.train!r} "
                                 "(or set data.fake_images to write the demo set)")
        if cfg.max_new_tokens < 1 or recipe.data.max_length < 2:
            raise mm.ConfigError(f"{source}: keys 'model.max_new_tokens' (>= 1) and 'data.max_length' (>= 2) "
                                 "are out of range")

    # ------------------------------------------------------------------------------------- data

    def dataset(self, path: str) -> InstructDataset:
        if path not in self._datasets:
            d = self.recipe.data
            dataset = InstructDataset(path, self.tokenizer, image_root=d.image_root, template=d.template,
                                      image_transform=self.image_transform, on_bad=d.on_bad, max_length=d.max_length)
            if dataset.skipped or dataset.truncated:  # skips and cuts are said, never silent
                print(dataset.summary())
            self._datasets[path] = dataset
        return self._datasets[path]

    def train_dataset(self) -> Sequence[dict]:
        return self.dataset(self.recipe.data.train)

    def eval_dataset(self) -> Sequence[dict] | None:
        return self.dataset(self.recipe.data.eval) if self.recipe.data.eval else None

    def collate(self, samples: list[dict]) -> dict[str, Any]:
        return InstructCollator(self.tokenizer.pad_token_id)(samples)

    # ------------------------------------------------------------------------------------- steps

    def training_step(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        loss, answer_loss, tokens = self.model.loss(batch)
        return loss, {"answer_loss": float(answer_loss), "answer_tokens": float(tokens)}

    def answer(self, batch: dict) -> list[str]:
        """Greedy answers (decoded text) to the batch's prompts."""
        ids = self.model.generate(batch["prompt_ids"], batch["prompt_mask"], batch["images"], batch["has_image"],
                                  self.recipe.model.max_new_tokens)
        return [self.tokenizer.decode(row, skip_special_tokens=True) for row in ids]

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict]) -> dict[str, float]:
        """Answer-token loss, and exact match of greedy answers overall, by question type and by style."""
        loss_sum, tokens, hits, seen = 0.0, 0, Counter(), Counter()
        for batch in batches:
            _, answer_loss, count = self.model.loss(batch)
            loss_sum, tokens = loss_sum + float(answer_loss) * count, tokens + count
            for got, want, qtype, style in zip(self.answer(batch), batch["answer"], batch["type"], batch["style"],
                                               strict=True):
                ok = normalize_answer(got) == normalize_answer(want)
                for key in ["em", *([f"em_{qtype}"] if qtype else []), *([f"em_{style}"] if style else [])]:
                    hits[key] += ok
                    seen[key] += 1
        return {"loss": loss_sum / max(tokens, 1), **{key: hits[key] / seen[key] for key in sorted(seen)}}
