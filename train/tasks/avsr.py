"""The AVSR task (``task: avsr``): Llama-AVSR / Llama-MTSK recipes under ``configs/avsr/``.

A recipe names the encoders, the LM, the compression rates and the adapters on the LM (usually the
``mtsk`` Matryoshka LoRA whose ``scales`` are the rate-pair names, e.g. ``a4_v2``); the projectors train
with the adapters; encoders and LM stay frozen. With a ``synthetic`` section whose ``splits`` are
non-empty, the recipe first generates the synthetic set under ``data.root`` (data/fake_av.py).

``evaluate`` decodes the eval split at every configured rate pair and reports ``wer_<pair>`` and
``cer_<pair>``; ``mmtune eval`` prints them as a table, clean and at given SNRs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import torch

import mm
from data.avsr import AVSRDataConfig, AVSRDataset, collate_avsr
from data.fake_av import FakeAVConfig
from train.engine.task import TASKS, AdapterTask
from train.tasks.avsr_model import (
    AVSRModel,
    AVSRModelConfig,
    HFTokenizer,
    VocabTokenizer,
    build_lm,
    rate_pairs,
    vocabulary_texts,
)
from train.tasks.metrics_text import char_error_rate, utterance_wer, word_error_rate

WHISPER_WINDOW_SECONDS = 30.0  # a named Whisper encoder's input window (1500 frames of 20 ms)


@TASKS.register("avsr")
class AVSRTask(AdapterTask):
    """Audio-visual speech recognition with an adapted causal LM, trained over every rate pair."""

    sections: ClassVar[dict[str, type]] = {"model": AVSRModelConfig, "data": AVSRDataConfig,
                                           "synthetic": FakeAVConfig}

    def __init__(self, recipe: Any) -> None:
        super().__init__(recipe)
        from encoders.audio import build_audio_encoder
        from encoders.video import build_video_encoder

        cfg = recipe.model
        if recipe.synthetic.splits:
            from data.fake_av import make_fake_avsr

            make_fake_avsr(recipe.data.root, recipe.synthetic, fps=recipe.data.fps)
        self._train = self._dataset(recipe.data.train_split)
        texts = [u.text for u in self._train.utterances]
        tokenizer = HFTokenizer(cfg.llm.path) if cfg.llm.tokenizer == "hf" else VocabTokenizer.from_texts(
            vocabulary_texts(texts, cfg), cfg.llm.tokenizer)
        audio = build_audio_encoder(cfg.audio) if cfg.audio_rates else None
        video = build_video_encoder(cfg.video) if cfg.video_rates else None
        lm = self.adapt(build_lm(cfg.llm, getattr(tokenizer, "vocab_size", None)))
        self.model = AVSRModel(cfg, lm, tokenizer, audio, video)

    @classmethod
    def validate(cls, recipe: Any) -> None:
        cfg, source = recipe.model, recipe.source
        if not cfg.audio_rates and not cfg.video_rates:
            raise mm.ConfigError(f"{source}: keys 'model.audio_rates' and 'model.video_rates' are both empty")
        if cfg.llm.tokenizer == "hf" and not cfg.llm.path:
            raise mm.ConfigError(f"{source}: key 'model.llm.tokenizer' is 'hf' but 'model.llm.path' is empty")
        if cfg.llm.path and cfg.llm.tokenizer != "hf":
            raise mm.ConfigError(f"{source}: a pretrained LM (model.llm.path) needs model.llm.tokenizer: hf")
        if cfg.audio.name and cfg.audio.checkpoint:
            raise mm.ConfigError(f"{source}: give 'model.audio.name' (a Whisper model) or 'model.audio.checkpoint' "
                                 "(a tiny encoder's state dict), not both")
        if not recipe.data.root:
            raise mm.ConfigError(f"{source}: key 'data.root' is empty")
        if not recipe.adapters:
            raise mm.ConfigError(f"{source}: give 'adapters' for the LM (e.g. method: mtsk)")
        pairs = list(rate_pairs(cfg))
        for name, adapter in recipe.adapters.items():
            scales = getattr(adapter, "scales", None)
            if adapter.method == "mtsk" and adapter.strategy != "ms" and sorted(scales) != sorted(pairs):
                raise mm.ConfigError(f"{source}: adapters.{name}.scales {scales} must be the rate pairs {pairs} "
                                     "(model.audio_rates x model.video_rates)")

    def _dataset(self, split: str) -> AVSRDataset:
        """A split that reads only the modalities the model uses; with ``data.max_seconds: 0`` and audio, the
        longest utterance is the audio encoder's window (longer ones follow ``data.long_utterances``)."""
        import dataclasses

        cfg, data = self.recipe.model, self.recipe.data
        if cfg.audio_rates:
            window = WHISPER_WINDOW_SECONDS if cfg.audio.name else cfg.audio.window_seconds
            if data.max_seconds > window:
                raise mm.ConfigError(f"{self.recipe.source}: data.max_seconds={data.max_seconds:g} is longer than "
                                     f"the audio encoder's window model.audio.window_seconds={window:g}")
            if not data.max_seconds:
                data = dataclasses.replace(data, max_seconds=window)
        return AVSRDataset(data, split, need_audio=bool(cfg.audio_rates), need_video=bool(cfg.video_rates))

    def training_step(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        total, losses = self.model.loss(self.model.encode(batch), batch["text"])
        return total, {f"loss_{pair}": float(loss.detach()) for pair, loss in losses.items()}

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict]) -> dict[str, float]:
        refs, ids, hyps = [], [], {pair: [] for pair in self.model.pairs}
        loss_sum, count = 0.0, 0
        for batch in batches:
            encoded = self.model.encode(batch)
            total, _ = self.model.loss(encoded, batch["text"])
            loss_sum, count = loss_sum + float(total) * len(batch["text"]), count + len(batch["text"])
            refs += batch["text"]
            ids += batch["id"]
            for pair in self.model.pairs:
                hyps[pair] += self.model.transcribe(encoded, pair)
        metrics = {"loss": loss_sum / max(count, 1)}
        # Per utterance and rate pair, for ``mmtune eval --transcripts``.
        self.transcripts = [{"id": uid, "pair": pair, "reference": ref, "hypothesis": hyp,
                             "wer": utterance_wer(ref, hyp)}
                            for pair, pair_hyps in hyps.items() for uid, ref, hyp in zip(ids, refs, pair_hyps, strict=True)]
        for pair, pair_hyps in hyps.items():
            metrics[f"wer_{pair}"] = word_error_rate(refs, pair_hyps)
            metrics[f"cer_{pair}"] = char_error_rate(refs, pair_hyps)
        return metrics

    def train_dataset(self) -> Sequence[dict]:
        return self._train

    def eval_dataset(self) -> Sequence[dict]:
        """Built on each call from ``recipe.data`` (so ``mmtune eval`` can change ``data.snr_db``)."""
        return self._dataset(self.recipe.data.eval_split)

    def collate(self, samples: list[dict]) -> dict:
        return collate_avsr(samples)
