"""EVA, Explained Variance Adaptation (Paischer et al., 2024): A from the layer inputs' principal directions.

For every adapted layer the inputs seen on calibration batches are fed, minibatch by minibatch, to an
incremental PCA (the incremental SVD of Ross et al. 2008, with the running mean: the right-singular
vectors of the centred activation matrix). After each minibatch the new components are compared with
the previous ones; a layer is done when the components it needs have |cosine similarity| >= ``tau``.
Ranks are then redistributed: each layer offers its first ``round(rho * r)`` components, all layers'
components compete by explained-variance ratio, and the ``r * n_layers`` best win, so the total rank
(the budget of a uniform rank-r LoRA) is kept. Layer l gets A = its top r_l components (rows, unit norm;
divided by sqrt(singular value) with ``whiten``) and B = 0, so the model starts at the base. The scale
stays alpha / r on every layer whatever its new rank (PEFT's ``adjust_scaling_factors=True`` gives the
same). A layer may end with rank 0: it keeps an empty adapter.

Padding: when a batch is a mapping with an ``attention_mask`` (B, S), only the inputs at its real
positions enter the statistics of layers whose inputs are (B, S, features), and with ``use_label_mask``
(default, as PEFT) positions whose ``labels`` equal ``label_mask_value`` are left out too (PEFT's
``prepare_model_inputs_fn_language_modeling``). ``initialize(token_mask=...)`` replaces that rule.

Use:  ``mm.attach(model, EVAConfig(targets=...))`` then ``mm.adapters.eva.initialize(model, batches)``,
and only then build the optimizer (initialising replaces the adapter modules). The ranks are recorded
in the config (``rank_pattern``), so a saved EVA adapter loads onto a fresh base without data.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from mm.adapters.base import ADAPTERS
from mm.adapters.lora import LoRA, LoRAConfig, _param_dtype
from mm.config import ConfigError
from mm.layer import AdaptedLinear
from mm.wrap import adapted_layers, adapter_names

NEEDS = ("activations: call mm.adapters.eva.initialize(model, batches, name=<adapter>) with an iterable of "
         "input batches before running the model")


@ADAPTERS.register("eva")
@dataclass
class EVAConfig(LoRAConfig):
    """EVA: A from the principal directions of each layer's inputs, ranks by explained variance, B = 0."""

    method: ClassVar[str] = "eva"

    rho: float = field(default=2.0, metadata={"help": "Rank redistribution: a layer gets at most round(rho*r)."})
    tau: float = field(default=0.99, metadata={"help": "Components have converged at |cos| >= tau between steps."})
    whiten: bool = field(default=False, metadata={"help": "Divide each row of A by sqrt(its singular value)."})
    use_label_mask: bool = field(default=True, metadata={
        "help": "Also leave out of the statistics the positions whose batch 'labels' equal label_mask_value "
                "(PEFT's default); padding ('attention_mask' 0) is always left out."})
    label_mask_value: int = field(default=-100, metadata={"help": "The label of positions to leave out."})
    rank_pattern: dict[str, int] | None = field(
        default=None,
        metadata={"help": "Layer name -> rank, written by initialize(); a config carrying it builds adapters "
                  "of those ranks that are ready to receive saved weights."},
    )

    def validate(self) -> None:
        super().validate()
        if self.rho < 1.0:
            raise ConfigError(f"eva: key 'rho' must be >= 1, got {self.rho}")
        if not 0.0 < self.tau <= 1.0:
            raise ConfigError(f"eva: key 'tau' must be in (0, 1], got {self.tau}")
        if self.init != "kaiming":
            raise ConfigError("eva: key 'init' does not apply (A comes from the activations, B = 0)")
        for layer, rank in (self.rank_pattern or {}).items():
            if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
                raise ConfigError(f"eva: key 'rank_pattern' entry {layer!r} must be an int >= 0, got {rank!r}")

    def build_for(self, layer_name: str, in_features: int, out_features: int, base_weight: torch.Tensor):
        rank, ready = self.r, False
        if self.rank_pattern is not None:
            if layer_name not in self.rank_pattern:
                raise ConfigError(
                    f"eva: key 'rank_pattern' has no rank for layer {layer_name!r}; it names "
                    f"{sorted(self.rank_pattern)[:6]}"
                )
            rank, ready = self.rank_pattern[layer_name], True
        return EVALoRA(self, in_features, out_features, rank, ready=ready,
                       dtype=_param_dtype(base_weight), device=base_weight.device)

    def build(self, in_features: int, out_features: int, base_weight: torch.Tensor) -> EVALoRA:
        return self.build_for("layer", in_features, out_features, base_weight)


class EVALoRA(LoRA):
    """A LoRA of a given rank (EVA's per-layer rank, possibly 0) that refuses to run before initialisation."""

    def __init__(self, config: EVAConfig, in_features: int, out_features: int, rank: int, *, ready: bool,
                 dtype: torch.dtype, device: torch.device) -> None:
        super(LoRA, self).__init__()  # LoRA.__init__ would size A, B by config.r
        self.scaling = config.scaling
        self.lora_A = nn.Parameter(torch.zeros(rank, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype, device=device))
        if rank:  # only matters for a hand-written rank_pattern; initialize() and loading overwrite A
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        self.lora_A.requires_grad_(rank > 0 and not config.freeze_a)
        self.lora_B.requires_grad_(rank > 0)
        self.ready, self.calibrating = ready, False

    def _check(self) -> None:
        if not self.ready:
            raise RuntimeError(f"eva adapter is not initialised: it needs {NEEDS}")

    def forward(self, x: torch.Tensor, out: torch.Tensor, base: nn.Module) -> torch.Tensor:
        if self.calibrating:
            return out
        self._check()
        if self.lora_A.shape[0] == 0:  # EVA gave this layer no rank
            return out
        return super().forward(x, out, base)

    def delta(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        self._check()
        return super().delta(x, base)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        self._check()
        return super().delta_weight(base)


class IncrementalPCA:
    """Top-k principal directions of a stream of row batches, updated batch by batch (Ross et al., 2008).

    Keeps the running mean, the sum of squared deviations per feature, and the top-k components with their
    singular values; each update takes the SVD of [S V^T; new rows - their mean; mean-shift row].
    """

    def __init__(self, n_components: int) -> None:
        self.k = n_components
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.sq_dev: torch.Tensor | None = None  # per-feature sum of squared deviations from the mean
        self.components: torch.Tensor | None = None  # (k, d), unit rows
        self.singular: torch.Tensor | None = None  # (k,)
        self.similarity: torch.Tensor | None = None  # |cos| of each component with its previous estimate

    @torch.no_grad()
    def update(self, rows: torch.Tensor) -> None:
        rows = rows.double()
        m = rows.shape[0]
        batch_mean = rows.mean(dim=0)
        centred = rows - batch_mean
        if self.count == 0:
            stacked, self.mean, self.sq_dev = centred, batch_mean, centred.pow(2).sum(dim=0)
        else:
            n = self.count
            shift = self.mean - batch_mean
            correction = math.sqrt(n * m / (n + m)) * shift
            stacked = torch.cat([self.singular[:, None] * self.components, centred, correction[None]])
            self.sq_dev = self.sq_dev + centred.pow(2).sum(dim=0) + shift.pow(2) * (n * m / (n + m))
            self.mean = self.mean - shift * (m / (n + m))
        self.count += m
        _, s, vh = torch.linalg.svd(stacked, full_matrices=False)
        vh, s = vh[: self.k], s[: self.k]
        # Fix each component's sign (largest entry positive) so that estimates are comparable and reproducible.
        signs = torch.sign(vh.gather(1, vh.abs().argmax(dim=1, keepdim=True)))
        vh = vh * torch.where(signs == 0, 1.0, signs)
        if self.components is not None and self.components.shape == vh.shape:
            self.similarity = (self.components * vh).sum(dim=1).abs()
        self.components, self.singular = vh, s

    def explained_variance_ratio(self) -> torch.Tensor:
        total = self.sq_dev.sum()
        return self.singular.pow(2) / total if total > 0 else torch.zeros_like(self.singular)

    def converged(self, n: int, tau: float) -> bool:
        if n == 0:
            return True
        return self.similarity is not None and bool((self.similarity[:n] >= tau).all())


def redistribute_ranks(ratios: Mapping[str, torch.Tensor], budget: int, caps: Mapping[str, int]) -> dict[str, int]:
    """Per-layer ranks: the ``budget`` components with the highest explained-variance ratio over all layers,
    at most ``caps[layer]`` from one layer (EVA's rank redistribution)."""
    entries = [(float(value), layer) for layer, values in ratios.items() for value in values[: caps[layer]]]
    entries.sort(key=lambda entry: -entry[0])  # stable: ties keep layer order
    ranks = dict.fromkeys(ratios, 0)
    for _, layer in entries[:budget]:
        ranks[layer] += 1
    return ranks


def default_forward(model: nn.Module, batch: Any) -> Any:
    """``model(**batch)`` for a mapping, ``model(*batch)`` for a tuple or list, else ``model(batch)``."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, tuple | list):
        return model(*batch)
    return model(batch)


def _eva_layers(model: nn.Module, name: str) -> list[tuple[str, AdaptedLinear]]:
    if name not in adapter_names(model):
        raise KeyError(f"model has no adapter {name!r}; it has {adapter_names(model)}")
    layers = []
    for layer_name, layer in adapted_layers(model):
        if name in layer.adapters:
            if not isinstance(layer.adapters[name], EVALoRA):
                raise TypeError(f"adapter {name!r} at {layer_name} is not an eva adapter")
            layers.append((layer_name, layer))
    return layers


def default_token_mask(batch: Any, config: EVAConfig) -> torch.Tensor | None:
    """The (B, S) bool mask of the positions whose inputs count (PEFT's rule for language modelling): a
    mapping batch's ``attention_mask``, and'ed with ``labels != label_mask_value`` under ``use_label_mask``;
    None (every position counts) for other batches."""
    if not isinstance(batch, Mapping) or batch.get("attention_mask") is None:
        return None
    mask = torch.as_tensor(batch["attention_mask"]).bool()
    labels = batch.get("labels")
    if config.use_label_mask and labels is not None:
        mask = mask & (torch.as_tensor(labels) != config.label_mask_value)
    return mask


class _Collector:
    """Forward pre-hook feeding a layer's inputs to its PCA; rows are pooled until there are k of them.

    ``masks["batch"]``, set before each forward, keeps only the real positions of inputs shaped like it."""

    def __init__(self, pca: IncrementalPCA, masks: dict[str, torch.Tensor | None]) -> None:
        self.pca, self.active, self.pending, self.masks = pca, True, [], masks

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if not self.active:
            return
        x = args[0].detach()
        mask = self.masks.get("batch")
        if mask is not None and tuple(x.shape[:-1]) == tuple(mask.shape):
            self.pending.append(x[mask.to(x.device)])
        else:
            self.pending.append(x.reshape(-1, x.shape[-1]))
        if sum(rows.shape[0] for rows in self.pending) >= self.pca.k:
            self.pca.update(torch.cat(self.pending))
            self.pending = []


def _calibrate(
    model: nn.Module, layers: list[tuple[str, AdaptedLinear]], config: EVAConfig, batches: Iterable[Any],
    forward_fn: Callable[[nn.Module, Any], Any], max_passes: int,
    token_mask: Callable[[Any, EVAConfig], torch.Tensor | None],
) -> tuple[dict[str, IncrementalPCA], dict[str, int]]:
    """Run batches (re-iterating up to ``max_passes`` times) until every layer's needed components converge."""
    caps = {n: min(round(config.rho * config.r), layer.in_features) for n, layer in layers}
    masks: dict[str, torch.Tensor | None] = {}
    collectors = {n: _Collector(IncrementalPCA(caps[n]), masks) for n, _ in layers}
    handles = [layer.register_forward_pre_hook(collectors[n]) for n, layer in layers]
    ranks = {n: min(config.r, caps[n]) for n, _ in layers}
    done, passes = False, 0
    try:
        with torch.no_grad():
            while passes < max_passes:
                passes += 1
                for batch in batches:
                    masks["batch"] = token_mask(batch, config)
                    forward_fn(model, batch)
                    pcas = {n: c.pca for n, c in collectors.items()}
                    if all(p.components is not None for p in pcas.values()):
                        ratios = {n: p.explained_variance_ratio() for n, p in pcas.items()}
                        ranks = redistribute_ranks(ratios, config.r * len(layers), caps)
                    for n, collector in collectors.items():  # converged layers stop collecting (and may resume)
                        collector.active = not collector.pca.converged(ranks[n], config.tau)
                    if not any(c.active for c in collectors.values()):
                        done = True
                        break
                if done or iter(batches) is batches:  # a one-shot iterator cannot be re-read
                    break
    finally:
        for handle in handles:
            handle.remove()
    if not done:
        waiting = [n for n, c in collectors.items() if c.active]
        raise RuntimeError(
            f"eva: components of {waiting} did not converge (|cos| >= tau={config.tau}) within {passes} "
            "pass(es) over the batches; pass more or larger batches, a re-iterable (list), or a lower tau"
        )
    return {n: c.pca for n, c in collectors.items()}, ranks


def initialize(
    model: nn.Module, batches: Iterable[Any], name: str = "default",
    forward_fn: Callable[[nn.Module, Any], Any] = default_forward, max_passes: int = 10,
    token_mask: Callable[[Any, EVAConfig], torch.Tensor | None] = default_token_mask,
) -> dict[str, int]:
    """Initialise EVA adapter ``name`` from the inputs its layers see on ``batches``; returns the ranks.

    ``forward_fn(model, batch)`` runs one batch (default: ``default_forward``); ``token_mask(batch, config)``
    gives the positions that count (default: ``default_token_mask``: padding and -100 labels out). The
    adapter adds nothing while the activations are collected; other active adapters take part as they are.
    Layers' adapter modules are replaced by ones of the redistributed ranks, so make the optimizer afterwards.
    """
    layers = _eva_layers(model, name)
    config = layers[0][1].adapters[name].config
    for _, layer in layers:
        layer.adapters[name].calibrating = True
    try:
        pcas, ranks = _calibrate(model, layers, config, batches, forward_fn, max_passes, token_mask)
    finally:
        for _, layer in layers:
            layer.adapters[name].calibrating = False
    final = dataclasses.replace(config, rank_pattern=dict(ranks))
    for layer_name, layer in layers:
        old, rank, pca = layer.adapters[name], ranks[layer_name], pcas[layer_name]
        module = EVALoRA(final, layer.in_features, layer.out_features, rank, ready=True,
                         dtype=old.lora_A.dtype, device=old.lora_A.device)
        init_A = pca.components[:rank]
        if config.whiten:
            init_A = init_A / pca.singular[:rank].sqrt()[:, None]
        with torch.no_grad():
            module.lora_A.copy_(init_A)
        module.config = final
        module.train(old.training)
        layer.adapters[name] = module
    return dict(ranks)
