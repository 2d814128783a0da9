"""The Llama-AVSR / Llama-MTSK model: frozen audio and video encoders -> tokens compressed at a rate pair
-> per-rate projectors -> a causal LM (adapted, e.g. with the ``mtsk`` Matryoshka LoRA) that writes the
transcript after the audio-visual tokens.

Sequence layout (``layout``), left-padded so every row's prompt ends at the same position for batched
decoding; the loss covers ``text EOS``; position ids count real tokens only, in training and decoding alike:

- ``reference`` (default; the authors' ``modeling_AVSRLLM.py``, umbertocappellazzo/Omni-AVSR):
  ``[pad ...] BOS <audio> [audio tokens] </audio> <video> [video tokens] </video> [prompt] text EOS``. The
  four tags are special tokens of the tokenizer (new embedding rows for a pretrained LM, as the authors add
  them); the prompt is theirs for the modalities present (``prompt`` overrides it).
- ``compact``: ``[pad ...] [audio tokens] [video tokens] BOS text EOS`` (no tags, no prompt).

Matryoshka training (Llama-MTSK): every step runs the LM once per configured (audio rate, video rate)
pair, inside ``mm.route(scale=<pair name>)`` so scale-specific LoRAs pick themselves, and averages the
pairs' losses (``matryoshka_loss: mean``, as the authors' released training code averages its per-input
losses; ``sum`` adds them, MRL's unit weights). The encoders run once per step: only
compression, projection and the LM differ between pairs. Inference runs at any one configured pair.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from encoders.audio import AudioEncoderConfig
from encoders.video import VideoEncoderConfig, tiny_video_config
from heads.projector import MultiRateProjector
from mm.route import route
from train.tasks.metrics_text import normalize_text

IGNORE = -100


@dataclass
class LLMConfig:
    path: str | None = field(default=None, metadata={"help": "Local folder (or hub name) of a transformers causal "
                                                             "LM; null: a tiny random Llama sized below."})
    tokenizer: Literal["words", "chars", "hf"] = field(
        default="words", metadata={"help": "'words'/'chars': a vocabulary built from the training transcripts "
                                           "(tiny LM only); 'hf': the LM's own tokenizer (needs path)."})
    hidden_size: int = field(default=64, metadata={"help": "Tiny LM: width."})
    intermediate_size: int = field(default=128, metadata={"help": "Tiny LM: MLP width."})
    layers: int = field(default=2, metadata={"help": "Tiny LM: decoder layers."})
    heads: int = field(default=4, metadata={"help": "Tiny LM: attention heads."})
    kv_heads: int = field(default=2, metadata={"help": "Tiny LM: key/value heads."})
    checkpoint: str | None = field(default=None, metadata={
        "help": "Tiny LM: local safetensors state dict to start from (e.g. pretrained on text by the repro)."})


@dataclass
class AVSRModelConfig:
    audio: AudioEncoderConfig = field(default_factory=AudioEncoderConfig, metadata={"help": "Whisper encoder."})
    video: VideoEncoderConfig = field(default_factory=tiny_video_config, metadata={"help": "Lip front end."})
    llm: LLMConfig = field(default_factory=LLMConfig, metadata={"help": "The causal LM."})
    audio_rates: list[int] = field(default_factory=lambda: [4, 16],
                                   metadata={"help": "Audio compression rates (empty: no audio)."})
    video_rates: list[int] = field(default_factory=lambda: [2, 5],
                                   metadata={"help": "Video compression rates (empty: no video)."})
    compression: Literal["avg", "stack"] = field(default="avg", metadata={"help": "Average pooling or stacking."})
    projector_hidden: int = field(default=256, metadata={"help": "Hidden width of the projectors."})
    shared_projector: bool = field(default=False, metadata={"help": "One projector for all rates of a "
                                                                    "modality (avg only) instead of one per rate."})
    matryoshka_loss: Literal["mean", "sum"] = field(
        default="mean", metadata={"help": "How the per-pair losses of a step combine (Llama-MTSK: mean)."})
    max_new_tokens: int = field(default=24, metadata={"help": "Decoding limit per utterance."})
    layout: Literal["reference", "compact"] = field(
        default="reference", metadata={"help": "'reference': BOS, tagged audio, tagged video, prompt, text (the "
                                               "authors' code); 'compact': audio, video, BOS, text."})
    prompt: str | None = field(default=None, metadata={
        "help": "Reference layout: the instruction before the text (null: the authors' prompt for the modalities "
                "present, e.g. 'Transcribe speech and video to text.')."})


#: The authors' default prompts (train_LLM.py), by the modalities present.
REFERENCE_PROMPTS = {(True, True): "Transcribe speech and video to text.",
                     (True, False): "Transcribe speech to text.", (False, True): "Transcribe video to text."}
#: The modality tags of the reference layout, special tokens of the tokenizer.
TAGS = ("<audio>", "</audio>", "<video>", "</video>")


def layout_prompt(config: AVSRModelConfig) -> str:
    """The prompt text of the reference layout ('' for the compact one)."""
    if config.layout != "reference":
        return ""
    if config.prompt is not None:
        return config.prompt
    return REFERENCE_PROMPTS[(bool(config.audio_rates), bool(config.video_rates))]


def pair_name(audio_rate: int | None, video_rate: int | None) -> str:
    """'a4_v2', or 'a4' / 'v2' for a single modality: the ``mm.route`` scale of that pair."""
    return "_".join(p for p in (audio_rate and f"a{audio_rate}", video_rate and f"v{video_rate}") if p)


def rate_pairs(config: AVSRModelConfig) -> dict[str, tuple[int | None, int | None]]:
    audio = config.audio_rates or [None]
    video = config.video_rates or [None]
    return {pair_name(a, v): (a, v) for a, v in itertools.product(audio, video)}


def vocabulary_texts(texts: list[str], config: AVSRModelConfig) -> list[str]:
    """What a tiny word/char vocabulary is built from: the transcripts and every prompt (the authors' three
    and the recipe's), so that recipes of any modality share one vocabulary (and one pretrained tiny LM)."""
    return [*texts, *REFERENCE_PROMPTS.values(), *([config.prompt] if config.prompt else [])]


class VocabTokenizer:
    """Word- or character-level ids for the tiny LM: 0 pad, 1 BOS, 2 EOS, 3 unknown, 4-7 the modality tags
    (``TAGS``), then the symbols."""

    PAD, BOS, EOS, UNK = 0, 1, 2, 3
    FIRST_SYMBOL = 4 + len(TAGS)

    def __init__(self, symbols: list[str], level: Literal["words", "chars"]) -> None:
        self.level, self.symbols = level, list(symbols)
        self.index = {s: i + self.FIRST_SYMBOL for i, s in enumerate(self.symbols)}
        self.tags = {tag: 4 + i for i, tag in enumerate(TAGS)}

    @classmethod
    def from_texts(cls, texts: list[str], level: Literal["words", "chars"]) -> VocabTokenizer:
        pieces = {p for t in texts for p in cls._split(normalize_text(t), level)}
        return cls(sorted(pieces), level)

    @staticmethod
    def _split(text: str, level: str) -> list[str]:
        return text.split() if level == "words" else list(text)

    @property
    def vocab_size(self) -> int:
        return len(self.symbols) + self.FIRST_SYMBOL

    def encode(self, text: str) -> list[int]:
        return [self.index.get(p, self.UNK) for p in self._split(normalize_text(text), self.level)]

    def decode(self, ids: list[int]) -> str:
        pieces = []
        for i in ids:
            if i == self.EOS:
                break
            if i >= self.FIRST_SYMBOL:
                pieces.append(self.symbols[i - self.FIRST_SYMBOL])
        return (" " if self.level == "words" else "").join(pieces)


class HFTokenizer:
    """A pretrained LM's own tokenizer, with the BOS/EOS/pad ids this model needs."""

    def __init__(self, path: str) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise ValueError(f"{path}: the tokenizer has no EOS token, which ends a transcript")
        self.EOS, self.BOS = eos, self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else eos
        self.PAD = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        self.tokenizer.add_special_tokens({"additional_special_tokens": list(TAGS)})  # as the authors do
        self.tags = {tag: self.tokenizer.convert_tokens_to_ids(tag) for tag in TAGS}

    @property
    def vocab_size(self) -> int:
        """Including the added tags: the LM's embeddings are resized to it."""
        return len(self.tokenizer)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(normalize_text(text), add_special_tokens=False).input_ids

    def decode(self, ids: list[int]) -> str:
        ids = ids[: ids.index(self.EOS)] if self.EOS in ids else ids
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()


@dataclass
class EncodedAV:
    """Frozen-encoder outputs of a batch (cacheable: they do not depend on the rate pair)."""

    audio: torch.Tensor | None = None
    audio_lengths: torch.Tensor | None = None
    video: torch.Tensor | None = None
    video_lengths: torch.Tensor | None = None


class AVSRModel(nn.Module):
    def __init__(self, config: AVSRModelConfig, lm: nn.Module, tokenizer, audio_encoder: nn.Module | None,
                 video_encoder: nn.Module | None) -> None:
        super().__init__()
        self.config, self.lm, self.tokenizer = config, lm, tokenizer
        self.pairs = rate_pairs(config)
        width = lm.get_input_embeddings().embedding_dim
        options = {"hidden": config.projector_hidden, "mode": config.compression, "shared": config.shared_projector}
        self.audio_encoder, self.video_encoder = audio_encoder, video_encoder
        self.audio_proj = (MultiRateProjector(audio_encoder.feature_size, width, config.audio_rates, **options)
                           if config.audio_rates else None)
        self.video_proj = (MultiRateProjector(video_encoder.feature_size, width, config.video_rates, **options)
                           if config.video_rates else None)
        for encoder in (audio_encoder, video_encoder):
            if encoder is not None:
                encoder.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> AVSRModel:
        super().train(mode)
        for encoder in (self.audio_encoder, self.video_encoder):  # frozen: BatchNorm statistics stay fixed
            if encoder is not None:
                encoder.eval()
        return self

    @torch.no_grad()
    def encode(self, batch: dict) -> EncodedAV:
        out = EncodedAV()
        if self.audio_encoder is not None:
            out.audio, out.audio_lengths = self.audio_encoder(batch["audio"], batch["audio_lengths"])
        if self.video_encoder is not None:
            out.video, out.video_lengths = self.video_encoder(batch["video"], batch["video_lengths"])
        return out

    def av_tokens(self, encoded: EncodedAV, pair: str) -> list[torch.Tensor]:
        """Per utterance, its embedded sequence before the text at ``pair``'s rates (``layout``): compact: audio
        then video tokens; reference: BOS, <audio> audio </audio>, <video> video </video>, the prompt."""
        audio_rate, video_rate = self.pairs[pair]
        parts = []  # (tokens (B, T, W), lengths (B,), the modality's tag prefix)
        if audio_rate is not None:
            parts.append((*self.audio_proj(encoded.audio, encoded.audio_lengths, audio_rate), "audio"))
        if video_rate is not None:
            parts.append((*self.video_proj(encoded.video, encoded.video_lengths, video_rate), "video"))
        rows = len(parts[0][0])
        if self.config.layout == "compact":
            return [torch.cat([tokens[i, : int(lengths[i])] for tokens, lengths, _ in parts]) for i in range(rows)]
        tok, prompt = self.tokenizer, self.tokenizer.encode(layout_prompt(self.config))
        specials = [tok.BOS, *(tok.tags[t] for t in TAGS), *prompt]  # embedded once for the whole batch
        embedded = self.embed_ids(specials).to(parts[0][0].dtype)
        bos, tags, prompt_embeds = embedded[:1], dict(zip(TAGS, embedded[1:5].split(1), strict=True)), embedded[5:]
        out = []
        for i in range(rows):
            pieces = [bos]
            for tokens, lengths, kind in parts:
                pieces += [tags[f"<{kind}>"], tokens[i, : int(lengths[i])], tags[f"</{kind}>"]]
            out.append(torch.cat([*pieces, prompt_embeds]))
        return out

    def embed_ids(self, ids: list[int]) -> torch.Tensor:
        embed = self.lm.get_input_embeddings()
        return embed(torch.tensor(ids, dtype=torch.long, device=embed.weight.device))

    def layout(self, prefixes: list[torch.Tensor], texts: list[list[int]] | None):
        """Left-padded ``inputs_embeds``, attention mask, position ids and labels (None without texts)."""
        embed = self.lm.get_input_embeddings()
        tok = self.tokenizer
        lead = [tok.BOS] if self.config.layout == "compact" else []  # the reference puts BOS first (av_tokens)
        suffixes = [lead + ids + [tok.EOS] for ids in texts] if texts is not None else [lead] * len(prefixes)
        lengths = [len(p) + len(s) for p, s in zip(prefixes, suffixes, strict=True)]
        total, width = max(lengths), embed.embedding_dim
        dtype = embed.weight.dtype
        embeds = torch.zeros(len(prefixes), total, width, dtype=dtype, device=embed.weight.device)
        mask = torch.zeros(len(prefixes), total, dtype=torch.long, device=embed.weight.device)
        labels = torch.full_like(mask, IGNORE)
        for i, (prefix, suffix) in enumerate(zip(prefixes, suffixes, strict=True)):
            start = total - lengths[i]
            ids = torch.tensor(suffix, dtype=torch.long, device=mask.device)
            embeds[i, start: start + len(prefix)] = prefix.to(dtype)
            embeds[i, start + len(prefix):] = embed(ids)
            mask[i, start:] = 1
            text_at = start + len(prefix) + len(lead)
            labels[i, text_at:] = ids[len(lead):]  # text and EOS; BOS, tags, AV tokens and prompt are inputs only
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        return embeds, mask, positions, (labels if texts is not None else None)

    def pair_loss(self, encoded: EncodedAV, texts: list[list[int]], pair: str) -> torch.Tensor:
        with route(scale=pair):
            embeds, mask, positions, labels = self.layout(self.av_tokens(encoded, pair), texts)
            return self.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, labels=labels).loss

    def loss(self, encoded: EncodedAV, texts: list[str], pairs: list[str] | None = None):
        """The Matryoshka objective over ``pairs`` (default: all configured) and each pair's loss."""
        ids = [self.tokenizer.encode(t) for t in texts]
        losses = {pair: self.pair_loss(encoded, ids, pair) for pair in (pairs or list(self.pairs))}
        total = torch.stack(list(losses.values())).sum()
        if self.config.matryoshka_loss == "mean":
            total = total / len(losses)
        return total, losses

    @torch.no_grad()
    def transcribe(self, encoded: EncodedAV, pair: str, max_new_tokens: int | None = None) -> list[str]:
        """Greedy decoding at ``pair`` (with a KV cache), one transcript per utterance."""
        limit = max_new_tokens or self.config.max_new_tokens
        with route(scale=pair):
            embeds, mask, positions, _ = self.layout(self.av_tokens(encoded, pair), None)
            out = self.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True)
            generated = []
            done = torch.zeros(len(embeds), dtype=torch.bool, device=embeds.device)
            last = positions[:, -1:]
            for _ in range(limit):
                token = out.logits[:, -1].argmax(-1)
                token = torch.where(done, torch.full_like(token, self.tokenizer.EOS), token)
                generated.append(token)
                done |= token == self.tokenizer.EOS
                if bool(done.all()):
                    break
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                last = last + 1
                out = self.lm(input_ids=token[:, None], attention_mask=mask, position_ids=last, cache=out.cache,
                              use_cache=True)
        rows = torch.stack(generated, dim=1).tolist() if generated else [[] for _ in range(len(embeds))]
        return [self.tokenizer.decode(row) for row in rows]


def build_lm(config: LLMConfig, vocab_size: int | None) -> nn.Module:
    """The causal LM: loaded from ``config.path`` or a tiny random Llama of ``vocab_size`` tokens."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if config.path:
        try:
            lm = AutoModelForCausalLM.from_pretrained(config.path, dtype=torch.float32)
        except OSError as err:
            raise OSError(f"llm {config.path!r}: cannot load a causal LM from it ({err}); give a local folder "
                          "with config.json and weights") from None
        if vocab_size and vocab_size > lm.get_input_embeddings().num_embeddings:  # the added modality tags
            lm.resize_token_embeddings(vocab_size)
        return lm
    lm = LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.layers, num_attention_heads=config.heads, num_key_value_heads=config.kv_heads,
        max_position_embeddings=1024, pad_token_id=VocabTokenizer.PAD, bos_token_id=VocabTokenizer.BOS,
        eos_token_id=VocabTokenizer.EOS))
    if config.checkpoint:
        from safetensors.torch import load_file

        try:
            lm.load_state_dict(load_file(config.checkpoint))
        except RuntimeError as err:
            raise ValueError(f"{config.checkpoint}: does not fit the tiny LM (sizes, or a vocabulary of "
                             f"{vocab_size} built from other transcripts): {err}") from None
    return lm
