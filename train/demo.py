"""The offline demo: pretrain a small ViT on digits, then LoRA-adapt the frozen model to a shifted domain.

Nothing is downloaded: scikit-learn ships the digits. The printed table compares the frozen base with the
LoRA-adapted model on the shifted domain and shows that turning the adapter off restores the original.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import mm
from data.digits import DigitsDataset
from encoders.vit import DEFAULT_TARGETS, VisionTransformer, ViTConfig


@dataclass
class DemoSettings:
    shifted_domain: str = "inverted_rotated"
    pretrain_epochs: int = 30
    adapt_epochs: int = 30
    rank: int = 8
    alpha: float = 16.0
    batch_size: int = 64
    seed: int = 0
    out_dir: str = "outputs/demo"


def fit(model: nn.Module, data: DigitsDataset, epochs: int, lr: float, batch_size: int, seed: int) -> float:
    """Train the parameters that require grad with AdamW; returns the last epoch's mean loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=epochs * -(-len(data) // batch_size), pct_start=0.1
    )
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order, losses = torch.randperm(len(data), generator=generator), []
        for start in range(0, len(data), batch_size):
            index = order[start : start + batch_size]
            loss = F.cross_entropy(model(data.images[index]), data.labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
    model.eval()
    return sum(losses) / len(losses)


@torch.no_grad()
def accuracy(model: nn.Module, data: DigitsDataset) -> float:
    model.eval()
    return (model(data.images).argmax(-1) == data.labels).float().mean().item()


def run_demo(settings: DemoSettings, log=print) -> dict[str, float]:
    torch.manual_seed(settings.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    source = {s: DigitsDataset(s, "original", seed=settings.seed) for s in ("train", "test")}
    shifted = {s: DigitsDataset(s, settings.shifted_domain, seed=settings.seed) for s in ("train", "test")}
    model = VisionTransformer(ViTConfig())
    start = time.perf_counter()
    fit(model, source["train"], settings.pretrain_epochs, 3e-3, settings.batch_size, settings.seed)
    log(f"pretrained the base ViT on original digits in {time.perf_counter() - start:.1f}s")
    results = {"base_original": accuracy(model, source["test"]), "base_shifted": accuracy(model, shifted["test"])}

    base_copy = copy.deepcopy(model)
    mm.attach(model, mm.LoRAConfig(targets=DEFAULT_TARGETS, r=settings.rank, alpha=settings.alpha))
    report = mm.trainable_report(model)
    start = time.perf_counter()
    fit(model, shifted["train"], settings.adapt_epochs, 1e-2, settings.batch_size, settings.seed)
    log(f"trained LoRA (r={settings.rank}) on '{settings.shifted_domain}' digits in "
        f"{time.perf_counter() - start:.1f}s")
    results["lora_shifted"] = accuracy(model, shifted["test"])
    with mm.disable_adapters(model):
        results["lora_disabled_original"] = accuracy(model, source["test"])

    path = mm.save_adapters(model, Path(settings.out_dir) / "digits_lora.safetensors")
    # The file alone (config inside) turns a copy of the base into the adapted model.
    results["reloaded_shifted"] = accuracy(mm.load_adapters(base_copy, path), shifted["test"])
    results["trainable_share"] = report.share
    results["trainable_params"] = float(report.trainable)
    _print_table(results, settings, report, path, log)
    return results


def _print_table(results: dict[str, float], settings: DemoSettings, report, path: Path, log) -> None:
    log("")
    log("| model                          | digits domain           | test accuracy |")
    log("|--------------------------------|-------------------------|---------------|")
    log(f"| frozen base                    | original                | {results['base_original']:13.3f} |")
    log(f"| frozen base                    | {settings.shifted_domain:<23} | {results['base_shifted']:13.3f} |")
    log(f"| base + LoRA                    | {settings.shifted_domain:<23} | {results['lora_shifted']:13.3f} |")
    log(f"| base + LoRA, adapter disabled  | original                | "
        f"{results['lora_disabled_original']:13.3f} |")
    log(f"| base + LoRA reloaded from file | {settings.shifted_domain:<23} | {results['reloaded_shifted']:13.3f} |")
    log("")
    log(f"trainable: {report.trainable:,} of {report.total:,} parameters ({100 * report.share:.2f}%), "
        f"adapter saved to {path}")
