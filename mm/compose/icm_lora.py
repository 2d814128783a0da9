"""ICM-LoRA (In-Context Meta LoRA generation): a conditional VAE that learns the weights of a family of LoRAs
of one model, conditioned on an embedding of each task, and generates a LoRA for an unseen task from its
embedding alone; the result is attached as a plain adapter (no fine-tuning), so ``save_adapters`` takes it.

The CVAE sees each LoRA flattened, every tensor (one layer's A or B) normalised by the family's mean and
standard deviation of that tensor (the paper's per-layer normalisation: layers of very different scales then
weigh alike in the reconstruction loss). Encoder and decoder are small MLPs over [weights, condition] and
[latent, condition]; generation decodes the latent mean (z = 0) or a sample.

The condition is the caller's: ``describe_task`` is a small deterministic sentence encoder (hashed words plus
sine/cosine features of the numbers in the text, so "rotated by 30 degrees" lies between 20 and 40), and the
paper's in-context examples enter as any extra vector the caller concatenates (e.g. frozen-model features of a
few task inputs).
"""

from __future__ import annotations

import json
import math
import os
import re
import zlib
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mm.config import AdapterConfig, ConfigError
from mm.state import adapter_state, atomic_write, read_tagged_safetensors
from mm.wrap import adapter_config, adapter_names, attach

FORMAT = "mmtune-lora-generator"
NUMBER_PERIODS = (256.0, 1024.0, 4096.0)
_WORD = re.compile(r"[a-z]+|-?\d+(?:\.\d+)?")


class GeneratorError(ConfigError):
    """LoRAs that cannot form one generator's family, a condition that does not fit, a bad generator file."""


def describe_task(text: str, dim: int = 32) -> torch.Tensor:
    """A deterministic embedding of a task description: ``dim`` hashed bag-of-words slots (unit norm) then, per
    period P in NUMBER_PERIODS, sin and cos of 2 pi x / P for the mean x of the numbers in the text."""
    if not isinstance(text, str) or not text.strip():
        raise GeneratorError(f"task description {text!r}: expected a non-empty string")
    tokens = _WORD.findall(text.lower())
    words = [t for t in tokens if not t.lstrip("-")[0].isdigit()]
    numbers = [float(t) for t in tokens if t.lstrip("-")[0].isdigit()]
    bag = torch.zeros(dim)
    for word in words:
        bag[zlib.crc32(word.encode()) % dim] += 1.0
    bag = bag / bag.norm().clamp_min(1e-8)
    value = sum(numbers) / len(numbers) if numbers else 0.0
    angles = torch.tensor([2 * math.pi * value / p for p in NUMBER_PERIODS])
    present = 1.0 if numbers else 0.0
    return torch.cat([bag, present * angles.sin(), present * angles.cos()])


def flatten_family(states: dict[str, dict[str, torch.Tensor]]) -> tuple[torch.Tensor, list[tuple[str, tuple]]]:
    """(N, D) rows of the family's flattened weights (one per adapter label) and the layout (key, shape) that
    every member must share; a member of other keys or shapes is named in the error."""
    if not states:
        raise GeneratorError("LoRA family: no adapters given; a generator learns from at least two")
    first_label, first = next(iter(states.items()))
    layout = [(key, tuple(t.shape)) for key, t in sorted(first.items())]
    rows = []
    for label, state in states.items():
        if sorted(state) != [key for key, _ in layout]:
            missing = sorted(set(first) ^ set(state))
            raise GeneratorError(f"LoRA family: adapter {label!r} has other tensors than {first_label!r} "
                                 f"(differing: {missing[:4]}); the family must be LoRAs of one base and targets")
        for key, shape in layout:
            if tuple(state[key].shape) != shape:
                raise GeneratorError(f"LoRA family: adapter {label!r} tensor {key!r} is {tuple(state[key].shape)}, "
                                     f"{first_label!r} has {shape} (other base or rank)")
        rows.append(torch.cat([state[key].detach().float().reshape(-1) for key, _ in layout]))
    return torch.stack(rows), layout


@dataclass
class CVAEConfig:
    latent: int = 16  #: latent size
    hidden: int = 128  #: width of the encoder's and decoder's hidden layer
    kl_weight: float = 0.1  #: weight of the KL term (the reconstruction term is a mean over all weights)
    steps: int = 1000  #: Adam steps over the whole family (it is tiny)
    lr: float = 3e-3
    noise: float = 0.0  #: std of Gaussian noise added to the (normalised) conditions while training
    seed: int = 0


class LoraCVAE(nn.Module):
    """q(z | x, c) and p(x | z, c) as one-hidden-layer MLPs over normalised flattened LoRA weights x."""

    def __init__(self, weights: int, condition: int, config: CVAEConfig) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(weights + condition, config.hidden), nn.GELU(),
                                     nn.Linear(config.hidden, 2 * config.latent))
        self.decoder = nn.Sequential(nn.Linear(config.latent + condition, config.hidden), nn.GELU(),
                                     nn.Linear(config.hidden, weights))
        self.latent = config.latent

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mean, log_var = self.encoder(torch.cat([x, c], -1)).chunk(2, -1)
        z = mean + torch.randn_like(mean) * (0.5 * log_var).exp()
        return self.decoder(torch.cat([z, c], -1)), mean, log_var

    def decode(self, c: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        z = torch.zeros(c.shape[0], self.latent) if z is None else z
        return self.decoder(torch.cat([z, c], -1))


class LoraGenerator:
    """A trained CVAE with everything needed to turn its output back into a LoRA of the family's model."""

    def __init__(self, cvae: LoraCVAE, layout: list[tuple[str, tuple]], stats: dict[str, torch.Tensor],
                 adapter: AdapterConfig, config: CVAEConfig) -> None:
        self.cvae, self.layout, self.stats, self.adapter, self.config = cvae, layout, stats, adapter, config

    @property
    def condition_size(self) -> int:
        return int(self.stats["cond_mean"].numel())

    @classmethod
    def fit(cls, states: dict[str, dict[str, torch.Tensor]], conditions: dict[str, torch.Tensor],
            adapter: AdapterConfig, config: CVAEConfig | None = None) -> LoraGenerator:
        """Train on ``states`` (label -> adapter_state) with ``conditions`` (label -> 1-D condition)."""
        config = config or CVAEConfig()
        weights, layout = flatten_family(states)
        if len(weights) < 2:
            raise GeneratorError(f"LoRA family: {len(weights)} adapter(s); a generator needs at least two")
        missing = [label for label in states if label not in conditions]
        if missing:
            raise GeneratorError(f"LoRA family: adapter(s) {missing[:4]} have no task condition")
        cond = torch.stack([conditions[label].float().reshape(-1) for label in states])
        stats = _family_stats(weights, layout, cond)
        x, c = _normalise(weights, layout, stats), (cond - stats["cond_mean"]) / stats["cond_std"]
        torch.manual_seed(config.seed)
        cvae = LoraCVAE(x.shape[1], c.shape[1], config)
        optimizer = torch.optim.Adam(cvae.parameters(), lr=config.lr)
        for _ in range(config.steps):
            noisy = c + config.noise * torch.randn_like(c) if config.noise else c
            recon, mean, log_var = cvae(x, noisy)
            kl = -0.5 * (1 + log_var - mean.pow(2) - log_var.exp()).sum(-1).mean()
            loss = F.mse_loss(recon, x) + config.kl_weight * kl
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        cvae.eval()
        return cls(cvae, layout, stats, adapter, config)

    @torch.no_grad()
    def generate(self, condition: torch.Tensor, sample: bool = False,
                 generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The adapter state (key -> tensor) the CVAE decodes for ``condition`` (z = 0, or drawn if ``sample``)."""
        condition = condition.float().reshape(-1)
        if condition.numel() != self.condition_size:
            raise GeneratorError(f"task condition has {condition.numel()} values; the generator was trained on "
                                 f"{self.condition_size} (another encoder, dim or in-context size?)")
        c = ((condition - self.stats["cond_mean"]) / self.stats["cond_std"]).unsqueeze(0)
        z = torch.randn(1, self.cvae.latent, generator=generator) if sample else None
        flat = self.cvae.decode(c, z)[0]
        out, start = {}, 0
        for key, shape in self.layout:
            size = math.prod(shape)
            out[key] = flat[start:start + size].reshape(shape) * self.stats[f"std/{key}"] + self.stats[f"mean/{key}"]
            start += size
        return out

    def attach_generated(self, model: nn.Module, condition: torch.Tensor, name: str, *, active: bool = True,
                         sample: bool = False, generator: torch.Generator | None = None) -> str:
        """Attach the LoRA generated for ``condition`` to ``model`` as adapter ``name``; returns ``name``."""
        if name in adapter_names(model):
            raise GeneratorError(f"adapter {name!r} is already attached; pick another name for the generated LoRA")
        attach(model, self.adapter, name, active=active)
        state, generated = adapter_state(model, name), self.generate(condition, sample, generator)
        if sorted(state) != sorted(generated) or any(state[k].shape != generated[k].shape for k in state):
            from mm.wrap import delete_adapter

            delete_adapter(model, name)
            raise GeneratorError(f"adapter {name!r}: the model's LoRA tensors do not match the generator's family "
                                 "(another base model or targets)")
        with torch.no_grad():
            for key, tensor in state.items():
                tensor.copy_(generated[key])
        return name

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.cvae.parameters())

    def save(self, path: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        tensors = {f"cvae/{k}": v.contiguous() for k, v in self.cvae.state_dict().items()}
        tensors.update({f"stats/{k}": v.contiguous() for k, v in self.stats.items()})
        metadata = {"format": FORMAT, "cvae": json.dumps(asdict(self.config)), "adapter": json.dumps(
            self.adapter.to_dict()), "layout": json.dumps([[k, list(s)] for k, s in self.layout])}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))

    @classmethod
    def load(cls, path: str | os.PathLike) -> LoraGenerator:
        metadata, tensors = read_tagged_safetensors(path, FORMAT, what="LoRA generator")
        try:
            config = CVAEConfig(**json.loads(metadata["cvae"]))
            layout = [(key, tuple(shape)) for key, shape in json.loads(metadata["layout"])]
            adapter = AdapterConfig.from_dict(json.loads(metadata["adapter"]), source=f"{path} adapter")
        except (KeyError, TypeError, json.JSONDecodeError) as err:
            raise GeneratorError(f"{path}: generator metadata is incomplete or malformed ({err})") from None
        stats = {k.removeprefix("stats/"): v for k, v in tensors.items() if k.startswith("stats/")}
        weights = sum(math.prod(shape) for _, shape in layout)
        cvae = LoraCVAE(weights, int(stats["cond_mean"].numel()), config)
        cvae.load_state_dict({k.removeprefix("cvae/"): v for k, v in tensors.items() if k.startswith("cvae/")})
        return cls(cvae.eval(), layout, stats, adapter, config)


def family_states(model: nn.Module, names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """``adapter_state`` of each named adapter of ``model`` (they must share one config up to the name)."""
    configs = {name: adapter_config(model, name).to_dict() for name in names}
    for name in names[1:]:
        if configs[name] != configs[names[0]]:
            raise GeneratorError(f"LoRA family: adapter {name!r} has another config than {names[0]!r}")
    return {name: {k: v.detach().clone() for k, v in adapter_state(model, name).items()} for name in names}


def _family_stats(weights: torch.Tensor, layout: list, cond: torch.Tensor) -> dict[str, torch.Tensor]:
    stats, start = {}, 0
    for key, shape in layout:
        block = weights[:, start:start + math.prod(shape)]
        stats[f"mean/{key}"], stats[f"std/{key}"] = block.mean(), block.std().clamp_min(1e-8)
        start += math.prod(shape)
    stats["cond_mean"], stats["cond_std"] = cond.mean(0), cond.std(0).clamp_min(1e-3)
    return stats


def _normalise(weights: torch.Tensor, layout: list, stats: dict[str, torch.Tensor]) -> torch.Tensor:
    blocks, start = [], 0
    for key, shape in layout:
        block = weights[:, start:start + math.prod(shape)]
        blocks.append((block - stats[f"mean/{key}"]) / stats[f"std/{key}"])
        start += math.prod(shape)
    return torch.cat(blocks, 1)


def save_generated(generator: LoraGenerator, path: str | os.PathLike, condition: torch.Tensor,
                   name: str = "generated") -> None:
    """Write the LoRA generated for ``condition`` as an mmtune adapter file (no model needed): ``load_adapters``
    attaches it to the family's base model like any saved adapter."""
    from safetensors.torch import save_file

    from mm.state import CHECKSUM_KEY, FORMAT_VERSION, tensors_checksum
    from mm.state import FORMAT as ADAPTER_FORMAT

    if not name.isidentifier():
        raise GeneratorError(f"adapter name {name!r} must be an identifier (letters, digits, _)")
    tensors = {f"{name}/{key}": t.contiguous() for key, t in generator.generate(condition).items()}
    metadata = {"format": ADAPTER_FORMAT, "format_version": FORMAT_VERSION,
                "adapters": json.dumps({name: generator.adapter.to_dict()}), CHECKSUM_KEY: tensors_checksum(tensors)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
