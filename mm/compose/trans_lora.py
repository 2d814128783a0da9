"""Trans-LoRA's pieces (Wang et al., 2024): move a trained LoRA to another base model without the task's data.

1. ``sample_sequences``: the source base with its LoRA synthesises task samples (ancestral sampling from prompts
   the caller draws; the paper prompts with the few seed examples).
2. ``Discriminator``: trained on the seed examples (real) against synthesised ones, on features of the source
   model (``sequence_features``: its mean last hidden state), it keeps the synthetic samples it takes for real.
3. ``distill``: the target base's fresh adapter (LoRA, DoRA, PiSSA ... any attached trainable adapter) learns the
   kept samples by next-token cross-entropy: the teacher's own generations are the labels (sequence-level
   distillation, which needs no shared vocabulary between source and target).

The models are transformers causal LMs (``model(input_ids=...).logits``); nothing here knows about recipes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mm.config import ConfigError


class TransferError(ConfigError):
    """Transfer inputs that cannot work: no seed examples, a discriminator with nothing to learn, bad sizes."""


@torch.no_grad()
def sample_sequences(lm: nn.Module, prompts: torch.Tensor, length: int, temperature: float = 1.0,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """(N, length) token ids: each prompt row continued by sampling from ``lm`` at ``temperature`` (0: greedy)."""
    if prompts.dim() != 2 or prompts.shape[1] < 1 or prompts.shape[1] > length:
        raise TransferError(f"prompts of shape {tuple(prompts.shape)}: expected (N, P) with 1 <= P <= {length}")
    if temperature < 0:
        raise TransferError(f"temperature {temperature}: expected >= 0")
    was_training = lm.training
    lm.eval()
    ids = prompts.long()
    while ids.shape[1] < length:  # tiny models and sequences: a full forward per token is cheap enough
        logits = lm(input_ids=ids).logits[:, -1].float()
        if temperature == 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            nxt = torch.multinomial((logits / temperature).softmax(-1), 1, generator=generator)
        ids = torch.cat([ids, nxt], 1)
    lm.train(was_training)
    return ids


@torch.no_grad()
def sequence_features(lm: nn.Module, ids: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(N, hidden) mean over positions of ``lm``'s last hidden state: what the discriminator sees."""
    rows = [lm(input_ids=chunk, output_hidden_states=True).hidden_states[-1].float().mean(1)
            for chunk in ids.split(batch_size)]
    return torch.cat(rows)


class Discriminator(nn.Module):
    """Logistic regression on standardised features: P(real | sample)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(features, 1)
        self.register_buffer("mean", torch.zeros(features))
        self.register_buffer("std", torch.ones(features))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.linear((features - self.mean) / self.std)).squeeze(-1)

    @classmethod
    def fit(cls, real: torch.Tensor, synthetic: torch.Tensor, steps: int = 300, lr: float = 0.05,
            weight_decay: float = 1e-2) -> Discriminator:
        """Real vs synthetic, classes weighted equally (there are few real samples and many synthetic ones)."""
        if len(real) < 1 or len(synthetic) < 1:
            raise TransferError(f"discriminator: {len(real)} real and {len(synthetic)} synthetic samples; "
                                "it needs at least one of each")
        if real.shape[1:] != synthetic.shape[1:]:
            raise TransferError(f"discriminator: real features {tuple(real.shape[1:])} vs synthetic "
                                f"{tuple(synthetic.shape[1:])}")
        both = torch.cat([real, synthetic]).float()
        model = cls(both.shape[1])
        model.mean.copy_(both.mean(0))
        model.std.copy_(both.std(0).nan_to_num(1.0).clamp_min(1e-6))
        target = torch.cat([torch.ones(len(real)), torch.zeros(len(synthetic))])
        weight = torch.cat([torch.full((len(real),), 0.5 / len(real)), torch.full((len(synthetic),),
                                                                                   0.5 / len(synthetic))])
        optimizer = torch.optim.Adam(model.linear.parameters(), lr=lr, weight_decay=weight_decay)
        for _ in range(steps):
            logits = model.linear((both - model.mean) / model.std).squeeze(-1)
            loss = (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * weight).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return model.eval()


def distill(lm: nn.Module, sequences: torch.Tensor, steps: int, lr: float = 3e-3, batch_size: int = 32,
            seed: int = 0) -> list[float]:
    """Train ``lm``'s trainable parameters (its attached adapter) on ``sequences`` by next-token cross-entropy;
    returns the loss of each step."""
    if len(sequences) == 0:
        raise TransferError("distill: no sequences to learn (did the discriminator reject every synthetic sample?)")
    params = [p for p in lm.parameters() if p.requires_grad]
    if not params:
        raise TransferError("distill: the target model has no trainable parameters; attach an adapter first")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    lm.train()
    for _ in range(steps):
        idx = torch.randint(0, len(sequences), (min(batch_size, len(sequences)),), generator=generator)
        batch = sequences[idx]
        logits = lm(input_ids=batch).logits[:, :-1].float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    lm.eval()
    return losses


def transfer_lora(source: nn.Module, target: nn.Module, seeds: torch.Tensor, *, synthetic: int = 512,
                  prompt_len: int = 1, temperature: float = 1.0, threshold: float | None = 0.5, steps: int = 300,
                  lr: float = 3e-3, batch_size: int = 32, seed: int = 0, prompts: torch.Tensor | None = None) -> dict:
    """The whole transfer: ``source`` (base + its LoRA, active) synthesises ``synthetic`` sequences of the seeds'
    length from prompts = the first ``prompt_len`` tokens of random seed examples; a discriminator trained on
    the seeds against them (classes weighted equally, weight decay: it cannot just memorise) keeps those it
    scores >= ``threshold`` (None: keep all, no filter); ``target`` (its new adapter attached, trainable) is distilled on
    what passes. ``prompts`` (N, P), if given, replace the cut seed prefixes. Returns counts, the discriminator's scores and the distillation losses."""
    if seeds.dim() != 2 or len(seeds) < 2:
        raise TransferError(f"seed examples of shape {tuple(seeds.shape)}: expected (N >= 2, length) token ids")
    if synthetic < 2 or not 1 <= prompt_len < seeds.shape[1]:
        raise TransferError(f"synthetic={synthetic}, prompt_len={prompt_len}: expected synthetic >= 2 and "
                            f"1 <= prompt_len < {seeds.shape[1]} (the seeds' length)")
    generator = torch.Generator().manual_seed(seed)
    if prompts is None:
        prompts = seeds[torch.randint(0, len(seeds), (synthetic,), generator=generator), :prompt_len]
    made = sample_sequences(source, prompts, seeds.shape[1], temperature, generator)
    kept, scores = made, None
    if threshold is not None:
        features = sequence_features(source, made)
        discriminator = Discriminator.fit(sequence_features(source, seeds), features)
        with torch.no_grad():
            scores = discriminator(features)
        kept = made[scores >= threshold]
    losses = distill(target, kept, steps, lr, batch_size, seed)
    return {"generated": len(made), "kept": len(kept), "scores": scores, "losses": losses, "sequences": kept}
