"""LLaVA-MoLE's data-conflict claim in miniature: plain LoRA vs MoLE vs MixLoRA on two conflicting tasks.

Data: scikit-learn's 8x8 digits (bundled, no download). Each image is a 17-token sequence for a tiny
transformers Llama: a task token, then 16 patch tokens (2x2 pixels each). Task A labels a digit y as y; task B
labels the same image 9 - y. The two tasks are mixed in one training set, so the same inputs carry opposite
targets and only the task token tells them apart: the conflict that mixing instruction data from different
domains creates in LLaVA-MoLE.

The backbone (with its head) is first trained on task A alone for a few epochs and then frozen: the
"pretrained model". Each method then trains its adapters on the MLP projections (gate/up/down) plus the
head on the A+B mixture. At (nearly) equal adapter parameters: LoRA r=8; MoLE and MixLoRA 4 experts of r=2
(+ a router per block); MixLoRA routes top-2; both add the load-balance loss (coefficient 0.01). MoLE runs
twice: its expert update scaled by the router probability (default) and at full strength (the router then
learns from the balance loss alone). LoRA r=2 and r=4 match the mixtures' rank per token (LLaVA-MoLE's
comparison: same compute, not same parameters). A head-only row shows what the frozen features give.
Reported: test accuracy per task, mean and standard deviation over 3 seeds, and for the mixtures the
routing purity (how well a token's top-1 expert tells its task: 0.5 = no task separation, 1 = experts
split by task; last block, test set).

    .venv/bin/python scripts/repro_moe.py            # about 150 s of CPU time (one thread)
    .venv/bin/python scripts/repro_moe.py --quick    # seconds: a smoke test of the script
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import mm
from mm.adapters.mixlora import MixLoRAConfig
from mm.adapters.moe import aux_loss, mixtures
from mm.adapters.mole import MoLEConfig

MLP = ["gate_proj", "up_proj", "down_proj"]
#: The balance-loss weight this miniature was run with (the library default is MoE-PEFT's 0.001).
AUX = 0.01
METHODS = {
    "head only": None,
    "LoRA r=2 (MoLE's active rank)": lambda: mm.LoRAConfig(targets=MLP, r=2, alpha=4.0),
    "LoRA r=4 (MixLoRA's active rank)": lambda: mm.LoRAConfig(targets=MLP, r=4, alpha=8.0),
    "LoRA r=8": lambda: mm.LoRAConfig(targets=MLP, r=8, alpha=16.0),
    "MoLE 4x r=2": lambda: MoLEConfig(targets=MLP, r=2, alpha=4.0, num_experts=4, aux_loss_coef=AUX),
    "MoLE 4x r=2, unscaled gate": lambda: MoLEConfig(targets=MLP, r=2, alpha=4.0, num_experts=4,
                                                      scale_by_gate=False, aux_loss_coef=AUX),
    "MixLoRA 4x r=2 top-2": lambda: MixLoRAConfig(targets=MLP, r=2, alpha=4.0, num_experts=4, top_k=2,
                                                  aux_loss_coef=AUX),
}
FULL = {"pretrain_epochs": 6, "epochs": 8, "seeds": 3, "hidden": 64, "batch": 64, "images": None}
QUICK = {"pretrain_epochs": 1, "epochs": 1, "seeds": 2, "hidden": 16, "batch": 128, "images": 160}


@dataclass
class Split:
    images: torch.Tensor  # (N, 8, 8) in [0, 1]
    tasks: torch.Tensor  # (N,) 0 = A, 1 = B
    labels: torch.Tensor  # (N,)


def conflicting_digits(limit: int | None = None, test_share: float = 0.3) -> tuple[Split, Split, Split]:
    """(task-A training split for pretraining, A+B training mixture, A+B test set); B labels y as 9 - y."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(digits.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))[:limit]
    cut = int(len(order) * (1 - test_share))

    def both_tasks(idx: torch.Tensor) -> Split:
        n = len(idx)
        tasks = torch.cat([torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long)])
        return Split(images[idx].repeat(2, 1, 1), tasks, torch.cat([labels[idx], 9 - labels[idx]]))

    train_idx, test_idx = order[:cut], order[cut:]
    task_a = Split(images[train_idx], torch.zeros(cut, dtype=torch.long), labels[train_idx])
    return task_a, both_tasks(train_idx), both_tasks(test_idx)


class DigitsLlama(nn.Module):
    """Task token + 16 patch tokens -> a tiny transformers Llama -> mean pool -> 10 classes."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaModel

        config = LlamaConfig(vocab_size=2, bos_token_id=0, eos_token_id=1, hidden_size=hidden,
                             intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=4, max_position_embeddings=32)
        self.patch = nn.Linear(4, hidden)
        self.task = nn.Embedding(2, hidden)
        self.llm = LlamaModel(config)
        self.head = nn.Linear(hidden, 10)

    def forward(self, images: torch.Tensor, tasks: torch.Tensor) -> torch.Tensor:
        patches = images.view(-1, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(-1, 16, 4)
        tokens = torch.cat([self.task(tasks).unsqueeze(1), self.patch(patches)], dim=1)
        return self.head(self.llm(inputs_embeds=tokens).last_hidden_state.mean(dim=1))


def train(model: nn.Module, split: Split, epochs: int, batch: int, lr: float, seed: int) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(split.labels), generator=generator).split(batch):
            loss = F.cross_entropy(model(split.images[idx], split.tasks[idx]), split.labels[idx])
            (loss + aux_loss(model)).backward()  # zero for models without mixtures
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    model.eval()


@torch.no_grad()
def evaluate(model: nn.Module, split: Split) -> tuple[dict[str, float], float | None]:
    """(accuracy per task, routing purity of the last mixture block or None)."""
    predictions = model(split.images, split.tasks).argmax(-1)
    accuracy = {name: float((predictions == split.labels)[split.tasks == t].float().mean())
                for t, name in enumerate(("A", "B"))}
    routers = [adapter.router for _, adapter in mixtures(model)]
    if not routers:
        return accuracy, None
    top1 = routers[-1].routing.experts[:, 0]  # tokens in (sample, position) order
    token_task = split.tasks.repeat_interleave(top1.numel() // len(split.tasks))
    counts = torch.zeros(routers[-1].num_experts, 2).index_put_((top1, token_task), torch.ones_like(top1, dtype=torch.float),
                                                                accumulate=True)
    return accuracy, float(counts.max(1).values.sum() / counts.sum())


def pretrained_backbone(task_a: Split, sizes: dict) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = DigitsLlama(sizes["hidden"])
    train(model, task_a, sizes["pretrain_epochs"], sizes["batch"], lr=3e-3, seed=0)
    return model.state_dict()


def run_method(name: str, base_state: dict, data: tuple[Split, Split], sizes: dict, seed: int):
    """Train one method on the A+B mixture from the pretrained backbone: (accuracies, purity, adapter params)."""
    mixture, test = data
    torch.manual_seed(seed)
    model = DigitsLlama(sizes["hidden"])
    model.load_state_dict(base_state)
    model.requires_grad_(False)
    config = METHODS[name]
    if config is not None:
        mm.attach(model, config())
    model.head.requires_grad_(True)  # every method trains the (pretrained) head too
    adapter_params = sum(mm.trainable_report(model).per_adapter.values())
    train(model, mixture, sizes["epochs"], sizes["batch"], lr=5e-3, seed=seed)
    accuracy, purity = evaluate(model, test)
    return accuracy, purity, adapter_params


def summary(values: list[float]) -> str:
    mean = statistics.mean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings: a smoke test of the script")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the model is tiny: 1 is fastest)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    start, cpu_start = time.perf_counter(), time.process_time()
    task_a, mixture, test = conflicting_digits(sizes["images"])
    base_state = pretrained_backbone(task_a, sizes)
    pretrained = DigitsLlama(sizes["hidden"])
    pretrained.load_state_dict(base_state)
    before, _ = evaluate(pretrained.eval(), test)
    rows = []
    for name in METHODS:
        results = [run_method(name, base_state, (mixture, test), sizes, seed) for seed in range(sizes["seeds"])]
        acc_a = [r[0]["A"] for r in results]
        acc_b = [r[0]["B"] for r in results]
        purity = [r[1] for r in results if r[1] is not None]
        rows.append(f"| {name} | {results[0][2]:,} | {summary(acc_a)} | {summary(acc_b)} | "
                    f"{summary([(a + b) / 2 for a, b in zip(acc_a, acc_b, strict=True)])} | "
                    f"{summary(purity) if purity else '-'} |")
        print(f"{name}: done ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    text = "\n".join([
        f"Digits, task A (y) + task B (9 - y) mixed; {len(mixture.labels)} training / {len(test.labels)} test "
        f"samples; {sizes['seeds']} seeds; pretrained on A alone: A {100 * before['A']:.1f}%, "
        f"B {100 * before['B']:.1f}%",
        "",
        "| method | adapter params | task A acc % | task B acc % | mean % | routing purity % |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        f"wall time {time.perf_counter() - start:.0f} s, CPU time {time.process_time() - cpu_start:.0f} s",
    ])
    print(text)
    return text


if __name__ == "__main__":
    main()
