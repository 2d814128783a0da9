"""Llama-MTSK's claim in miniature: one Matryoshka model, evaluated at each audio-video compression pair,
matches or beats separate models trained at each pair (Cappellazzo et al., 2025, Table 1).

On the synthetic espeak-ng set (data/fake_av.py: digit strings and commands, varied voices, mouth crops
whose opening follows the loudness), in one run:

1. frozen "pretrained" parts, shared by every model and seed (the paper freezes Whisper, AV-HuBERT and
   Llama): a tiny Whisper encoder and lip front end pretrained for a few hundred steps to classify the
   word under each frame (from the LRS3-style word timings), clean and 0 dB audio mixed; a tiny Llama
   pretrained on the training transcripts alone. Their features are computed once, clean and noisy.
2. per seed: MTSK MS, SS and MSS (the ``mtsk`` adapter over the rate pairs (4,2), (4,5), (16,2), (16,5),
   all pairs each step, losses averaged) and one separate LoRA model per pair (Llama-AVSR), each trained
   ``--steps`` steps with the same optimiser, batch, LoRA and per-rate projectors; half the training
   audio is noisy. By default in the authors' parametrisation and layout (``--parametrisation reference
   --layout reference``): LoRA on q and v only, ``--rank`` their RANK (bottleneck = LM width / RANK, scale
   alpha / RANK with alpha = 2 RANK), A = 0 at init; BOS, tagged audio, tagged video, prompt, text. The
   separate models are the same LoRA, one per pair (the authors' Llama-AVSR LoRA has the same form).
3. greedy decoding of the test split at each pair, clean and at ``--snr`` dB: WER (%).

Prints the WER table (mean +- std over seeds) and each strategy's mean WER difference to the separate
models. The frozen parts are cached beside the data (``pretrained_{audio,video,lm}_<steps>.safetensors``;
the configs/avsr recipes can load them); ``--quick`` is a smoke test.

    .venv/bin/python scripts/repro_avsr.py
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import mm
from data.avsr import AVSRDataConfig, AVSRDataset, collate_avsr
from data.fake_av import FakeAVConfig, make_fake_avsr
from encoders.audio import AudioEncoderConfig, build_audio_encoder
from encoders.video import build_video_encoder, tiny_video_config
from mm.adapters.mtsk import MatryoshkaLoRAConfig
from train.tasks.avsr_model import (
    AVSRModel,
    AVSRModelConfig,
    EncodedAV,
    LLMConfig,
    VocabTokenizer,
    build_lm,
    vocabulary_texts,
)
from train.tasks.metrics_text import word_error_rate

AUDIO_RATES, VIDEO_RATES = [4, 16], [2, 5]
PAIRS = [f"a{a}_v{v}" for a in AUDIO_RATES for v in VIDEO_RATES]
#: Per parametrisation: the authors adapt q and v only; our plain-LoRA variant adapted every projection.
TARGETS = {"reference": ["q_proj", "v_proj"],
           "lora": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
FRAME_RATES = {"audio": 50.0, "video": 25.0}
CROP = 32


@dataclass
class Cached:
    """Per-utterance frozen-encoder features (audio (Ta, D), video (Tv, D)) and the transcripts."""

    audio: list[torch.Tensor]
    video: list[torch.Tensor]
    texts: list[str]


def load_split(root: str, split: str, snr: float | None) -> list[dict]:
    data = AVSRDataset(AVSRDataConfig(root=root, crop_size=CROP, snr_db=snr, max_seconds=3.0), split)
    return [data[i] for i in range(len(data))]


def frame_labels(words: list[list], frames: int, rate: float, tokenizer: VocabTokenizer) -> torch.Tensor:
    """The word id under each frame's centre (0 between words), from the LRS3 word timings."""
    labels = torch.zeros(len(words), frames, dtype=torch.long)
    centres = (torch.arange(frames) + 0.5) / rate
    for row, spans in enumerate(words):
        for word, start, end in spans:
            labels[row, (centres >= start) & (centres < end)] = tokenizer.encode(word)[0]
    return labels


def pretrain_encoder(encoder, key: str, samples: list[dict], noisy: list[dict], tokenizer, steps: int) -> None:
    """Frame-level word classification (clean and noisy audio mixed): the stand-in for a pretrained encoder."""
    head = torch.nn.Linear(encoder.feature_size, tokenizer.vocab_size)
    encoder.requires_grad_(True).train()
    params = [*encoder.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(7)
    for _ in range(steps):
        index = torch.randint(len(samples), (16,), generator=gen).tolist()
        use_noisy = (torch.rand(16, generator=gen) < 0.5).tolist()
        batch = collate_avsr([(noisy if n else samples)[i] for i, n in zip(index, use_noisy, strict=True)])
        features, lengths = encoder(batch[key], batch[f"{key}_lengths"])
        labels = frame_labels(batch["words"], features.shape[1], FRAME_RATES[key], tokenizer)
        valid = torch.arange(features.shape[1])[None] < lengths[:, None]
        loss = F.cross_entropy(head(features)[valid], labels[valid])
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
    encoder.requires_grad_(False).eval()


def pretrained_encoders(root: str, train: list[dict], noisy: list[dict], tokenizer, args):
    """The frozen encoders, pretrained once and cached beside the data (safetensors)."""
    from safetensors.torch import load_file, save_file

    from mm.state import atomic_write

    torch.manual_seed(1234)
    audio = build_audio_encoder(AudioEncoderConfig(window_seconds=3.0))
    video = build_video_encoder(tiny_video_config())
    for name, encoder, steps in (("audio", audio, args.audio_steps), ("video", video, args.video_steps)):
        path = Path(root) / f"pretrained_{name}_{steps}.safetensors"
        if path.is_file():
            encoder.load_state_dict(load_file(str(path)))
        else:
            pretrain_encoder(encoder, name, train, noisy, tokenizer, steps)
            atomic_write(path, lambda tmp, e=encoder: save_file(e.state_dict(), tmp))
    return audio.eval(), video.eval()


@torch.no_grad()
def encode(samples: list[dict], audio_enc, video_enc) -> Cached:
    out = Cached([], [], [])
    for start in range(0, len(samples), 16):
        batch = collate_avsr(samples[start: start + 16])
        a, la = audio_enc(batch["audio"], batch["audio_lengths"])
        v, lv = video_enc(batch["video"], batch["video_lengths"])
        out.audio += [a[i, : int(la[i])] for i in range(len(la))]
        out.video += [v[i, : int(lv[i])] for i in range(len(lv))]
        out.texts += batch["text"]
    return out


def pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(r) for r in rows])
    out = torch.zeros(len(rows), int(lengths.max()), rows[0].shape[-1])
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out, lengths


def batch_of(cached: Cached, index: list[int], noisy: Cached | None = None, use_noisy=None) -> EncodedAV:
    audio = [(noisy if noisy is not None and use_noisy[k] else cached).audio[i] for k, i in enumerate(index)]
    return EncodedAV(*pad(audio), *pad([cached.video[i] for i in index]))


def pretrained_lm(root: str, texts: list[str], tokenizer: VocabTokenizer, steps: int):
    """A tiny Llama trained on the transcripts alone (the stand-in for a pretrained LLM), then frozen;
    cached beside the data (a recipe's ``model.llm.checkpoint`` can point at the file)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from mm.state import atomic_write

    path = Path(root) / f"pretrained_lm_{steps}.safetensors"
    if path.is_file():  # a cache from another vocabulary (e.g. before the modality tags) is rebuilt
        with safe_open(str(path), "pt") as cached:
            rows = cached.get_slice("model.embed_tokens.weight").get_shape()[0]
        if rows == tokenizer.vocab_size:
            return build_lm(LLMConfig(checkpoint=str(path)), tokenizer.vocab_size).eval().requires_grad_(False), None
    torch.manual_seed(99)
    lm = build_lm(LLMConfig(), tokenizer.vocab_size)
    optimizer = torch.optim.AdamW(lm.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(99)
    rows = [[tokenizer.BOS] + tokenizer.encode(t) + [tokenizer.EOS] for t in texts]
    for _ in range(steps):
        pick = [rows[int(i)] for i in torch.randint(len(rows), (32,), generator=gen)]
        ids = torch.full((32, max(map(len, pick))), tokenizer.PAD)
        for i, row in enumerate(pick):
            ids[i, : len(row)] = torch.tensor(row)
        loss = lm(input_ids=ids, attention_mask=(ids != tokenizer.PAD).long(),
                  labels=ids.masked_fill(ids == tokenizer.PAD, -100)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    atomic_write(path, lambda tmp: save_file(lm.state_dict(), tmp))
    return lm.eval().requires_grad_(False), float(loss.detach())


def build_model(kind: str, pretrained_lm, tokenizer, audio_enc, video_enc, args, seed: int) -> AVSRModel:
    """kind: 'ms' / 'ss' / 'mss' (one MTSK model over all pairs) or a pair name (a separate LoRA model)."""
    torch.manual_seed(seed)
    lm = copy.deepcopy(pretrained_lm)
    lora = {"targets": TARGETS[args.parametrisation], "r": args.rank, "alpha": 2.0 * args.rank,
            "parametrisation": args.parametrisation}
    if kind in ("ms", "ss", "mss"):
        rates = (AUDIO_RATES, VIDEO_RATES)
        adapter = MatryoshkaLoRAConfig(strategy=kind, scales=PAIRS, **lora)
    else:  # one LoRA of the same parametrisation (an MS Matryoshka LoRA with a single scale is exactly that)
        audio_rate, video_rate = (int(p[1:]) for p in kind.split("_"))
        rates = ([audio_rate], [video_rate])
        adapter = MatryoshkaLoRAConfig(strategy="ms", scales=[kind], **lora)
    mm.attach(lm, adapter, "avsr")
    config = AVSRModelConfig(audio_rates=rates[0], video_rates=rates[1], projector_hidden=args.hidden,
                             max_new_tokens=10, layout=args.layout)
    return AVSRModel(config, lm, tokenizer, audio_enc, video_enc)


def train_model(model: AVSRModel, clean: Cached, noisy: Cached, args, seed: int) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(args.steps):
        index = torch.randint(len(clean.texts), (args.batch,), generator=gen).tolist()
        use_noisy = (torch.rand(args.batch, generator=gen) < 0.5).tolist()
        loss, _ = model.loss(batch_of(clean, index, noisy, use_noisy), [clean.texts[i] for i in index])
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
    return float(loss.detach())


@torch.no_grad()
def evaluate(model: AVSRModel, test: dict[str, Cached]) -> dict[tuple[str, str], float]:
    model.eval()
    wer = {}
    for condition, cached in test.items():
        for pair in model.pairs:
            hyps = []
            for start in range(0, len(cached.texts), 32):
                hyps += model.transcribe(batch_of(cached, list(range(start, min(start + 32, len(cached.texts))))), pair)
            wer[(pair, condition)] = 100 * word_error_rate(cached.texts, hyps)
    return wer


def table(results: dict[str, list[dict]], conditions: list[str]) -> str:
    columns = [(p, c) for c in conditions for p in PAIRS]
    lines = ["| method | " + " | ".join(f"({p[1:].replace('_v', ',')}) {c}" for p, c in columns) + " | mean |",
             "|" + "---|" * (len(columns) + 2)]
    for method, runs in results.items():
        cells = [f"{np.mean([r[col] for r in runs]):.1f} ± {np.std([r[col] for r in runs]):.1f}" for col in columns]
        mean = np.mean([r[col] for r in runs for col in columns])
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {mean:.1f} |")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300, help="optimiser steps per AVSR model")
    parser.add_argument("--audio-steps", type=int, default=600, help="audio encoder pretraining steps")
    parser.add_argument("--video-steps", type=int, default=150, help="lip front end pretraining steps")
    parser.add_argument("--lm-steps", type=int, default=300, help="text-only pretraining steps of the tiny LM")
    parser.add_argument("--train", type=int, default=400, help="synthetic training utterances")
    parser.add_argument("--test", type=int, default=60, help="synthetic test utterances")
    parser.add_argument("--snr", type=float, default=0.0, help="SNR (dB) of the noisy audio")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--rank", type=int, default=8, help="LoRA r: with the reference parametrisation the "
                        "authors' RANK, a divisor (bottleneck = LM width 64 / r); with 'lora' the bottleneck")
    parser.add_argument("--parametrisation", choices=["reference", "lora"], default="reference")
    parser.add_argument("--layout", choices=["reference", "compact"], default="reference")
    parser.add_argument("--hidden", type=int, default=128, help="projector hidden width")
    parser.add_argument("--data", default="outputs/avsr_synth", help="where the synthetic set is written")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of the script")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.steps, args.lm_steps, args.train, args.test = [0], 3, 3, 16, 6
        args.audio_steps, args.video_steps = 2, 2
        args.data = args.data.rstrip("/") + "_quick"
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    wall, cpu = time.perf_counter(), time.process_time()
    root = str(make_fake_avsr(args.data, FakeAVConfig(splits={"train": args.train, "test": args.test},
                                                      engine="espeak", seed=0, crop_size=CROP)))
    train, noisy_train = load_split(root, "train", None), load_split(root, "train", args.snr)
    tokenizer = VocabTokenizer.from_texts(vocabulary_texts([s["text"] for s in train], AVSRModelConfig()), "words")
    audio_enc, video_enc = pretrained_encoders(root, train, noisy_train, tokenizer, args)
    clean, noisy = encode(train, audio_enc, video_enc), encode(noisy_train, audio_enc, video_enc)
    test = {"clean": encode(load_split(root, "test", None), audio_enc, video_enc),
            f"{args.snr:g}dB": encode(load_split(root, "test", args.snr), audio_enc, video_enc)}
    lm, lm_loss = pretrained_lm(root, clean.texts, tokenizer, args.lm_steps)
    print(f"{len(train)}/{len(test['clean'].texts)} utterances, vocabulary {tokenizer.vocab_size}, text-LM loss "
          f"{'(cached)' if lm_loss is None else f'{lm_loss:.3f}'}; frozen parts ready after "
          f"{time.perf_counter() - wall:.0f} s", flush=True)
    kinds = {"MTSK MS": "ms", "MTSK SS": "ss", "MTSK MSS": "mss", **{f"separate {p}": p for p in PAIRS}}
    results: dict[str, list[dict]] = {n: [] for n in ("MTSK MS", "MTSK SS", "MTSK MSS", "separate (Llama-AVSR)")}
    for seed in args.seeds:
        separate: dict = {}
        for name, kind in kinds.items():
            started = time.perf_counter()
            model = build_model(kind, lm, tokenizer, audio_enc, video_enc, args, seed)
            loss = train_model(model, clean, noisy, args, seed)
            wer = evaluate(model, test)
            print(f"seed {seed} {name:>16}: loss {loss:.3f}; WER " + ", ".join(
                f"{p} {c} {w:.1f}" for (p, c), w in wer.items()) + f" ({time.perf_counter() - started:.0f} s)",
                flush=True)
            if kind in PAIRS:
                separate.update(wer)
            else:
                results[name].append(wer)
        results["separate (Llama-AVSR)"].append(separate)
    print(f"\nWER (%) on the synthetic test set ({len(test['clean'].texts)} utterances), mean ± std over seeds "
          f"{args.seeds}; {args.steps} steps per model, batch {args.batch}, LoRA r {args.rank} "
          f"({args.parametrisation} parametrisation, {args.layout} layout); columns "
          f"(audio rate, video rate) clean and at {args.snr:g} dB SNR")
    print(table(results, list(test)))
    base = results["separate (Llama-AVSR)"]
    for name in ("MTSK MS", "MTSK SS", "MTSK MSS"):
        diffs = [run[k] - ref[k] for run, ref in zip(results[name], base, strict=True) for k in ref]
        print(f"{name} - separate: mean WER difference {np.mean(diffs):+.1f} points "
              f"({sum(d <= 0 for d in diffs)}/{len(diffs)} seed x pair x condition cells no worse)")
    print(f"total {time.perf_counter() - wall:.0f} s wall, {time.process_time() - cpu:.0f} s CPU")


if __name__ == "__main__":
    main()
