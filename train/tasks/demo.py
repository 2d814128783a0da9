"""The offline demo (``make demo``): the CLIP few-shot track end to end, with nothing downloaded.

1. scikit-learn's bundled digits become real PNG files with a CoOp-style split JSON (``.cache/demo``).
2. A tiny CLIP (``tiny-digits``) is pretrained on image-caption pairs of the *base* classes (zero..four)
   with a multi-positive contrastive loss (captions of the image's class are all positives, as in UniCL,
   since many images share a caption); its weights are cached as safetensors and reused on later runs.
3. ``mmtune fewshot`` logic runs on the *novel* classes (five..nine), whose names the model never saw:
   zero-shot, linear probe, LoRA, Block-LoRA and QLadder over shots and seeds, printing the table.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CAPTION_TEMPLATES = ["a photo of a {}.", "a handwritten {}.", "the digit {}.", "a picture of the number {}."]
DEMO_MODEL = "tiny-digits"
DEMO_RECIPES = Path(__file__).resolve().parents[2] / "configs" / "clip" / "demo"  # train/tasks/ -> repo root


@dataclass
class DemoSettings:
    cache_dir: str = ".cache/demo"
    out_dir: str = "outputs/demo"
    pretrain_epochs: int = 60
    pretrain_lr: float = 2e-3
    pretrain_batch_size: int = 128
    pretrain_seed: int = 0
    shots: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    methods: list[str] = field(default_factory=lambda: ["zero-shot", "linear-probe", "lora", "block_lora",
                                                        "qladder"])
    recipes: str = str(DEMO_RECIPES)
    progress: bool = True

    def pretrain_key(self) -> str:
        """Identifies the pretraining recipe: a cached checkpoint is reused only if this matches."""
        fields = {k: v for k, v in asdict(self).items() if k.startswith("pretrain_")}
        fields.update(model=DEMO_MODEL, captions=CAPTION_TEMPLATES, version=1)
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def export_digits(root: Path) -> Path:
    """The digits as 8x8 PNG files with a CoOp split JSON (train/test as ``data.digits.split_indices``)."""
    from data.digits import load_digits_arrays, split_indices
    from data.fake_images import write_image_dataset

    split_file = root / "split_fewshot.json"
    if split_file.is_file():
        return root
    images, labels = load_digits_arrays("original")
    train, test = split_indices(len(labels), seed=0)
    return write_image_dataset(root, images[:, 0], labels, DIGIT_NAMES,
                               {"train": train.tolist(), "test": test.tolist()}, layout="coop")


def multi_positive_clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, image_labels: torch.Tensor,
                             text_labels: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric contrastive loss where every (image, caption) pair of the same class is a positive."""
    logits = logit_scale * F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).t()
    positives = (image_labels[:, None] == text_labels[None, :]).float()
    image_to_text = -(positives * logits.log_softmax(dim=1)).sum(1) / positives.sum(1)
    text_to_image = -(positives * logits.log_softmax(dim=0)).sum(0) / positives.sum(0).clamp(min=1)
    has_image = positives.sum(0) > 0  # captions of classes absent from this batch have no positive
    return 0.5 * (image_to_text.mean() + text_to_image[has_image].mean())


def pretrain_clip(bundle, images: torch.Tensor, labels: torch.Tensor, classes: list[str], settings: DemoSettings,
                  log: Callable[[str], None]) -> None:
    """Contrastive pretraining of the whole tiny CLIP on (image, caption-of-its-class) pairs."""
    model = bundle.model
    # The BPE token table (49,408 x width) keeps its random init: a fixed random code per token. Training
    # it would be most of each step's optimiser cost, and the novel class names would not be trained anyway.
    model.token_embedding.requires_grad_(False)
    captions = [t.format(c) for c in classes for t in CAPTION_TEMPLATES]
    tokens = bundle.tokenizer(captions)
    caption_labels = torch.arange(len(classes)).repeat_interleave(len(CAPTION_TEMPLATES))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.pretrain_lr, weight_decay=0.05)
    steps = settings.pretrain_epochs * -(-len(labels) // settings.pretrain_batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, settings.pretrain_lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(settings.pretrain_seed)
    model.train()
    for _ in range(settings.pretrain_epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(order), settings.pretrain_batch_size):
            index = order[start : start + settings.pretrain_batch_size]
            loss = multi_positive_clip_loss(model.encode_image(images[index]), model.encode_text(tokens),
                                            labels[index], caption_labels, model.logit_scale.exp().clamp(max=100))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval().requires_grad_(True)
    log(f"pretrained {DEMO_MODEL} on {len(labels)} image-caption pairs of {classes}; last loss {loss.item():.3f}")


def pretrained_checkpoint(settings: DemoSettings, data_dir: Path, log: Callable[[str], None]) -> Path:
    """The cached pretrained weights, trained (about a minute on 2 cores) when missing or stale."""
    from safetensors import safe_open

    from data.fewshot import base_novel_classes, load_fewshot_data, restrict_classes
    from encoders.clip import create_clip, save_clip_weights
    from train.tasks.fewshot import ImageCache

    path = Path(settings.cache_dir) / f"{DEMO_MODEL}_digits_base.safetensors"
    if path.is_file():
        with safe_open(str(path), framework="pt") as handle:
            if json.loads((handle.metadata() or {}).get("pretrain_key", "null")) == settings.pretrain_key():
                log(f"using the cached pretrained {DEMO_MODEL}: {path}")
                return path
    base, _ = base_novel_classes(DIGIT_NAMES)
    data = restrict_classes(load_fewshot_data(data_dir), base)
    bundle = create_clip(DEMO_MODEL, seed=settings.pretrain_seed)
    images, labels = ImageCache(bundle.preprocess).stack(data.split("train"))
    start, cpu = time.perf_counter(), time.process_time()
    pretrain_clip(bundle, images, labels, base, settings, log)
    log(f"pretraining took {time.perf_counter() - start:.0f}s ({time.process_time() - cpu:.0f}s of CPU time); "
        f"caching the weights at {path}")
    return save_clip_weights(bundle.model, path, {"pretrain_key": settings.pretrain_key(), "classes": base})


def run_demo(settings: DemoSettings, log: Callable[[str], None] = print) -> dict:
    """Pretrain (or reuse) the tiny CLIP, then the few-shot comparison on novel classes; returns the results."""
    threads = torch.get_num_threads()
    # The tiny model's matmuls are too small to split: one thread is as fast, and far faster on a busy machine.
    torch.set_num_threads(1)
    try:
        return _run_demo(settings, log)
    finally:
        torch.set_num_threads(threads)


def _run_demo(settings: DemoSettings, log: Callable[[str], None]) -> dict:
    from encoders.clip import create_clip
    from heads.clip_prototype import ClipPrototypeHead
    from train.tasks.fewshot import FewShotSettings, ImageCache, accuracy, run_fewshot
    from train.tasks.fewshot_report import markdown_table, summarize, write_reports

    torch.manual_seed(settings.pretrain_seed)
    data_dir = export_digits(Path(settings.cache_dir) / "digits")
    checkpoint = pretrained_checkpoint(settings, data_dir, log)
    # Sanity line: zero-shot on the base classes the model was pretrained on (their test images are unseen).
    from data.fewshot import load_fewshot_data, select_classes

    bundle = create_clip(DEMO_MODEL, str(checkpoint))
    base = select_classes(load_fewshot_data(data_dir), "base")
    test_x, test_y = ImageCache(bundle.preprocess).stack(base.split("test"))
    head = ClipPrototypeHead(base.classes, bundle.tokenizer, bundle.model.encode_text, bundle.logit_scale)
    base_zero_shot = accuracy(bundle.model, head, test_x, test_y)
    log(f"zero-shot on the base classes {base.classes}: {100 * base_zero_shot:.1f}% "
        f"(chance {100 / len(base.classes):.0f}%)")

    fewshot = FewShotSettings(model=DEMO_MODEL, pretrained=str(checkpoint), data=str(data_dir), classes="novel",
                              shots=settings.shots, methods=settings.methods, seeds=settings.seeds,
                              recipes=settings.recipes, out_dir=settings.out_dir, progress=settings.progress)
    results = run_fewshot(fewshot, log)
    results["base_zero_shot"] = base_zero_shot
    paths = write_reports(results, settings.out_dir, title="tiny CLIP on novel digit classes")
    log("")
    log(f"few-shot on the novel classes {results['classes']} (names never seen in pretraining), test accuracy %, "
        f"mean ± std over seeds {settings.seeds}:")
    log(markdown_table(summarize(results["records"])))
    log(f"\nwrote {paths['table']}, {paths['json']}, {paths['plot']}")
    return results
