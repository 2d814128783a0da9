"""Few-shot CLIP evaluation: every method x shot count x seed in one run (``mmtune fewshot``).

Methods: ``zero-shot`` (text prototypes, no training), ``linear-probe`` (logistic regression on frozen,
L2-normalised image features, as in the CLIP paper) and any recipe ``<recipes>/<method>.yaml``: adapters
attached to the CLIP (through the adapter registry: lora, block_lora, ...), a QLadder beside the vision
tower, or both, trained with cross-entropy on the prototype head's logits (CLIP-LoRA's protocol, without its
random-crop/flip augmentation: every image is preprocessed once, as for evaluation). Every method sees the
same K-shot sample for a given (shots, seed). A recipe's schedule follows the shot and class counts
(``optim.epochs`` passes over the shots x classes images, ``steps_per_shot``). With ``select: lr`` each
trained run picks its learning rate on validation images carved from the training split outside the shots
(train/tasks/fewshot_select.py). Reports: ``train.tasks.fewshot_report``.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import mm
from data.fewshot import FewShotData, load_fewshot_data, read_image, sample_k_shot, select_classes
from encoders.clip import ClipBundle, LadderCLIP, create_clip, tower_of
from heads.clip_prototype import DEFAULT_TEMPLATES, ClipPrototypeHead
from mm.qladder import load_qladder, save_qladder
from train.tasks.fewshot_recipe import (  # noqa: F401  (re-exported: the recipes live beside)
    BUILTIN_METHODS,
    DEFAULT_METHODS,
    DEFAULT_RECIPES,
    OPTIM_KEYS,
    RECIPE_KEYS,
    Recipe,
    find_recipe,
    load_recipe,
)


@dataclass
class FewShotSettings:
    model: str
    data: str
    pretrained: str | None = None
    shots: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    classes: str = "all"
    templates: list[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATES))
    recipes: str = str(DEFAULT_RECIPES)
    out_dir: str = "outputs/fewshot"
    save_adapters: bool = False
    linear_probe_c: float | None = None  # None: cross-validated on the shots
    eval_batch_size: int = 256
    device: str = "cpu"
    progress: bool = True
    select: str | None = None  # "lr": choose each trained run's lr on validation images outside the shots
    lrs: list[float] | None = None  # candidate lrs for select (None: the recipe's lr x DEFAULT_LR_FACTORS)
    val_per_class: int = 16  # validation images per class for select


@dataclass
class RunRecord:
    method: str
    shots: int
    seed: int | None
    accuracy: float
    trainable_params: int
    train_seconds: float
    files: list[str] = field(default_factory=list)
    lr: float | None = None  # the learning rate used (chosen on validation with select: lr)
    validation: dict[str, float] | None = None  # lr -> validation accuracy, with select: lr


class ImageCache:
    """Each image decoded and preprocessed once, kept as a tensor for every later run."""

    def __init__(self, preprocess: Callable[[Any], torch.Tensor]) -> None:
        self.preprocess, self._tensors = preprocess, {}

    def stack(self, samples: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
        for s in samples:
            if s.path not in self._tensors:
                self._tensors[s.path] = self.preprocess(read_image(s.path))
        images = torch.stack([self._tensors[s.path] for s in samples])
        return images, torch.tensor([s.label for s in samples])


@torch.no_grad()
def encode_images(encoder: nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    encoder.eval()
    return torch.cat([encoder.encode_image(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


@torch.no_grad()
def accuracy(encoder: nn.Module, head: ClipPrototypeHead, images: torch.Tensor, labels: torch.Tensor,
             batch_size: int = 256) -> float:
    logits = head(encode_images(encoder, images, batch_size))
    return (logits.argmax(-1) == labels.to(logits.device)).float().mean().item()


def trainable_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in module.parameters() if p.requires_grad}.values())


def build_adapted(base: nn.Module, recipe: Recipe, seed: int) -> nn.Module:
    """A fresh copy of ``base`` with the recipe's adapters and QLadder; only those train."""
    torch.manual_seed(seed)
    model = copy.deepcopy(base)
    model.requires_grad_(False)
    names = [c.method if [a.method for a in recipe.adapters].count(c.method) == 1 else f"{c.method}{i}"
             for i, c in enumerate(recipe.adapters)]
    for name, config in zip(names, recipe.adapters, strict=True):
        mm.attach(model, config, name=name)
    return LadderCLIP.build(model, recipe.qladder) if recipe.qladder is not None else model


def adapts_text(encoder: nn.Module) -> bool:
    clip = encoder.clip if isinstance(encoder, LadderCLIP) else encoder
    return any(tower_of(name) == "text" for name, _ in mm.adapted_layers(clip))


def make_head(bundle: ClipBundle, encoder: nn.Module, classes: list[str], templates: list[str]) -> ClipPrototypeHead:
    head = ClipPrototypeHead(classes, bundle.tokenizer, encoder.encode_text, bundle.logit_scale, templates,
                             adapt_text=adapts_text(encoder))
    return head.to(next(encoder.parameters()).device)


def train_recipe(encoder: nn.Module, head: ClipPrototypeHead, recipe: Recipe, images: torch.Tensor,
                 labels: torch.Tensor, shots: int, seed: int) -> float:
    """Cross-entropy on the head's logits with AdamW and a cosine schedule; returns the seconds spent."""
    params = [p for p in encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps = recipe.total_steps(shots, len(set(labels.tolist())))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    generator = torch.Generator().manual_seed(seed)
    order, position = torch.randperm(len(labels), generator=generator), 0
    start = time.perf_counter()
    encoder.train()
    for _ in range(steps):
        if position >= len(order):  # a new epoch: reshuffle
            order, position = torch.randperm(len(labels), generator=generator), 0
        index = order[position : position + recipe.batch_size]
        position += recipe.batch_size
        loss = F.cross_entropy(head(encoder.encode_image(images[index])), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    encoder.eval()
    return time.perf_counter() - start


def save_trained(encoder: nn.Module, stem: Path) -> list[str]:
    """The adapters (mm format) and the QLadder of ``encoder`` beside ``stem``; returns the files."""
    files = []
    clip = encoder.clip if isinstance(encoder, LadderCLIP) else encoder
    if mm.adapter_names(clip):
        files.append(str(mm.save_adapters(clip, stem.with_name(stem.name + ".adapters.safetensors"))))
    if isinstance(encoder, LadderCLIP):
        files.append(str(save_qladder(encoder.ladder, stem.with_name(stem.name + ".qladder.safetensors"))))
    return files


def load_trained(base: nn.Module, files: Sequence[str | Path]) -> nn.Module:
    """A copy of ``base`` with the adapters / QLadder that ``save_trained`` wrote."""
    model = copy.deepcopy(base)
    ladder = None
    for file in map(Path, files):
        if file.name.endswith(".qladder.safetensors"):
            ladder = load_qladder(file)
        else:
            mm.load_adapters(model, file)
    model.requires_grad_(False)
    return LadderCLIP(model, ladder) if ladder is not None else model


LINEAR_PROBE_CS = (0.1, 1.0, 10.0, 100.0, 1000.0)


def linear_probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                          test_y: torch.Tensor, seed: int, c: float | None = None) -> tuple[float, int]:
    """Logistic regression (L-BFGS, L2 penalty 1/C) on unit-norm features: accuracy, parameter count.

    ``c`` None picks C from ``LINEAR_PROBE_CS`` by stratified cross-validation on the training shots (the
    CLIP paper sweeps C on held-out data; few-shot runs have only the shots), or uses 10 at 1 shot.
    """
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold

    x, y = F.normalize(train_x, dim=-1).cpu().numpy(), train_y.cpu().numpy()
    folds = min(5, int(torch.bincount(train_y.cpu()).min()))
    if c is None and folds >= 2:
        cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        classifier = LogisticRegressionCV(Cs=list(LINEAR_PROBE_CS), cv=cv, max_iter=2000, random_state=seed,
                                          scoring="accuracy")
    else:
        classifier = LogisticRegression(C=10.0 if c is None else c, max_iter=2000, random_state=seed)
    with warnings.catch_warnings():  # scikit-learn 1.9 announces default changes that do not affect L2 here
        warnings.simplefilter("ignore", FutureWarning)
        classifier.fit(x, y)
    predicted = classifier.predict(F.normalize(test_x, dim=-1).cpu().numpy())
    params = classifier.coef_.size + classifier.intercept_.size
    return float((torch.from_numpy(predicted) == test_y.cpu()).float().mean()), int(params)


def check_methods(settings: FewShotSettings) -> dict[str, Recipe]:
    recipes = {}
    for method in settings.methods:
        if method not in BUILTIN_METHODS:
            recipes[method] = find_recipe(method, settings.recipes)
    return recipes


def preflight(settings: FewShotSettings, data: FewShotData) -> dict[tuple[int, int], list]:
    """Everything a run needs, checked before any model is built so that no result is lost to a late error:
    shot counts and seeds, the train and test splits, enough training images in every class for the largest
    shot count, every image file used present, and a writable output folder. Returns the K-shot sample of
    every (shots, seed)."""
    import tempfile
    from collections import Counter

    from data.fewshot import FewShotDataError, ImageReadError

    if not settings.shots or min(settings.shots) < 1:
        raise mm.ConfigError(f"--shots: expected shot counts >= 1, got {settings.shots}")
    if not settings.seeds or not settings.methods:
        raise mm.ConfigError(f"--seeds / --methods: expected at least one each, got {settings.seeds}, "
                             f"{settings.methods}")
    if str(settings.device).startswith("cuda") and not torch.cuda.is_available():
        raise mm.ConfigError(f"--device {settings.device}: no CUDA device is available here; use --device cpu")
    if settings.select not in (None, "lr"):
        raise mm.ConfigError(f"--select: expected 'lr', got {settings.select!r}")
    if settings.select and (settings.val_per_class < 1 or any(lr <= 0 for lr in settings.lrs or [])):
        raise mm.ConfigError(f"--val-per-class / --lrs: expected >= 1 and lrs > 0, got {settings.val_per_class}, "
                             f"{settings.lrs}")
    repeated = sorted({m for m in settings.methods if settings.methods.count(m) > 1})
    if repeated:
        raise mm.ConfigError(f"--methods: {repeated} given more than once")
    train, test = data.split("train"), data.split("test")
    counts, need = Counter(s.label for s in train), max(settings.shots) + (1 if settings.select else 0)
    short = [f"{name!r} has {counts.get(i, 0)}" for i, name in enumerate(data.classes) if counts.get(i, 0) < need]
    if short:
        why = f"--shots {max(settings.shots)}" + (" with --select lr (validation images outside the shots)"
                                                   if settings.select else "")
        raise FewShotDataError(f"{data.source}: {why} needs {need} training images in every class; "
                               f"class {'; class '.join(short)}")
    shot_sets = {(k, seed): sample_k_shot(train, k, seed, data.classes)
                 for k in settings.shots for seed in settings.seeds}
    used = {s.path for s in test} | {s.path for samples in shot_sets.values() for s in samples}
    if settings.select:
        used |= {s.path for s in train}  # validation images come from the rest of the training split
    missing = sorted(str(p) for p in used if not Path(p).is_file())
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ImageReadError(f"{missing[0]}: image file not found{more}; listed by {data.source}")
    for folder in [Path(settings.out_dir)] + ([Path(settings.out_dir) / "adapters"] if settings.save_adapters else []):
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass  # an unwritable folder fails here (an OSError naming it), not after the first results
    return shot_sets


def run_fewshot(settings: FewShotSettings, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs every method, shot count and seed; returns ``{"settings", "classes", "records"}``. The JSON and
    table of the finished runs are rewritten after each one (``fewshot_report.write_progress``)."""
    from train.engine.progress import progress_bar
    from train.tasks.fewshot_report import write_progress

    recipes = check_methods(settings)  # fail on a bad recipe before any heavy work
    data = select_classes(load_fewshot_data(settings.data), settings.classes)
    shot_sets = preflight(settings, data)
    bundle = create_clip(settings.model, settings.pretrained, device=settings.device)
    cache = ImageCache(bundle.preprocess)
    test_x, test_y = cache.stack(data.split("test"))
    for samples in shot_sets.values():
        cache.stack(samples)  # decode every training image now: a broken file fails before any result
    test_x = test_x.to(settings.device)
    log(f"{settings.model} ({settings.pretrained or 'random init'}) on {data.source} [{data.layout}]: "
        f"{len(data.classes)} classes ({settings.classes}), {len(data.split('train'))} train / {len(test_y)} test images")
    base, records = bundle.model, []
    results = {"settings": asdict(settings), "classes": data.classes, "records": []}

    def keep(record: RunRecord) -> None:
        records.append(record)
        results["records"] = [asdict(r) for r in records]
        write_progress(results, settings.out_dir)

    zero_head = make_head(bundle, base, data.classes, settings.templates)
    frozen_test = encode_images(base, test_x, settings.eval_batch_size)
    if "zero-shot" in settings.methods:
        accuracy_zs = (zero_head(frozen_test).argmax(-1).cpu() == test_y).float().mean().item()
        keep(RunRecord("zero-shot", 0, None, accuracy_zs, 0, 0.0))
    trained = [m for m in settings.methods if m != "zero-shot"]
    bar = progress_bar(len(settings.shots) * len(settings.seeds) * len(trained), "few-shot", settings.progress,
                       unit="run")
    for shots in settings.shots:
        for seed in settings.seeds:
            train_x, train_y = cache.stack(shot_sets[shots, seed])
            train_x, train_y = train_x.to(settings.device), train_y.to(settings.device)
            validation = None
            if settings.select:
                from train.tasks.fewshot_select import carve_validation

                held = carve_validation(data.split("train"), shot_sets[shots, seed], settings.val_per_class, seed,
                                        data.classes)
                validation = tuple(t.to(settings.device) for t in cache.stack(held))
            for method in trained:
                bar.set_postfix_str(f"{method} {shots}-shot seed {seed}")
                keep(_run_method(method, recipes.get(method), settings, bundle, data, shots, seed,
                                 (train_x, train_y), (test_x, test_y), frozen_test, validation))
                bar.update()
    bar.close()
    return results


def _run_method(method: str, recipe: Recipe | None, settings: FewShotSettings, bundle: ClipBundle,
                data: FewShotData, shots: int, seed: int, train: tuple, test: tuple,
                frozen_test: torch.Tensor, validation: tuple | None = None) -> RunRecord:
    (train_x, train_y), (test_x, test_y) = train, test
    if method == "linear-probe":
        start = time.perf_counter()
        features = encode_images(bundle.model, train_x, settings.eval_batch_size)
        acc, params = linear_probe_accuracy(features, train_y, frozen_test, test_y, seed, settings.linear_probe_c)
        return RunRecord(method, shots, seed, acc, params, time.perf_counter() - start)
    def train_candidate(candidate: Recipe) -> tuple[nn.Module, ClipPrototypeHead, float]:
        encoder = build_adapted(bundle.model, candidate, seed)
        head = make_head(bundle, encoder, data.classes, settings.templates)
        return encoder, head, train_recipe(encoder, head, candidate, train_x, train_y, shots, seed)

    lr, scores = recipe.lr, None
    if validation is not None:
        from train.tasks.fewshot_select import candidate_lrs, select_lr

        chosen = select_lr(recipe, candidate_lrs(recipe.lr, settings.lrs), train_candidate,
                           lambda enc, head: accuracy(enc, head, *validation, settings.eval_batch_size))
        encoder, head, seconds, lr = chosen.encoder, chosen.head, chosen.seconds, chosen.lr
        scores = {f"{k:g}": v for k, v in chosen.scores.items()}
    else:
        encoder, head, seconds = train_candidate(recipe)
    acc = accuracy(encoder, head, test_x, test_y, settings.eval_batch_size)
    files = []
    if settings.save_adapters:
        files = save_trained(encoder, Path(settings.out_dir) / "adapters" / f"{method}_{shots}shot_seed{seed}")
    return RunRecord(method, shots, seed, acc, trainable_parameters(encoder), seconds, files, lr, scores)
