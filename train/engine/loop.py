"""The training loop: one function, ``train(recipe)``, on accelerate (one process, DDP or DeepSpeed).

Per optimizer step: ``grad_accum`` micro-batches (forward, loss reduced over ranks, backward), then
clipping, the optimizer and the schedule. Around it: evaluation every ``eval_every`` steps, metrics to
CSV/TensorBoard, a progress bar, checkpoints every ``save_every`` steps, resume from the newest complete
checkpoint, and a stop when a loss is NaN or infinite (train/engine/nonfinite.py). Before the first step:
a lock on the run folder (train/engine/lock.py), writable folders and disk room (preflight.py), and a
resumed recipe checked against its checkpoint's (run_folder.py, resume.py).

Data order is a pure function of (seed, micro-batch index): epoch ``e`` is ``randperm(N, seed + e)`` and
rank ``r`` takes its slice of each global batch. So the data position is one integer, and a resumed run
sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mm.config import ConfigError
from train.engine.checkpoint import (
    TrainState,
    latest_checkpoint,
    save_checkpoint,
    save_trainable,
)
from train.engine.config import OptimConfig, Recipe, save_resolved
from train.engine.distributed import (
    after_prepare,
    before_prepare,
    cuda_peak_mib,
    is_deepspeed,
    make_accelerator,
    rank_disagreement,
    setup_name,
)
from train.engine.lock import RunLock, is_main_rank
from train.engine.nonfinite import NonFiniteGuard, NonFiniteLossError  # noqa: F401  (re-exported)
from train.engine.preflight import check_disk, check_files, check_writable, checkpoint_bytes
from train.engine.resume import resume_candidates, resume_run
from train.engine.run_folder import check_resume_recipe, describe_diff
from train.engine.run_log import RunLog, dumps
from train.engine.task import get_task
from train.rules.base import build_rules


@dataclass
class RunResult:
    out_dir: Path
    step: int
    losses: dict[int, float] = field(default_factory=dict)  # step -> mean loss over its micro-batches and ranks
    eval_metrics: dict[str, float] = field(default_factory=dict)
    checkpoint: Path | None = None
    step_time_s: float = float("nan")  # mean wall time of an optimizer step, first step excluded
    skipped_steps: int = 0
    resumed_from: Path | None = None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_optimizer(params: list, optim: OptimConfig) -> torch.optim.Optimizer:
    """``optim.name`` over ``params`` (parameters, or param groups whose own settings override ``optim``)."""
    if optim.name == "adamw":
        return torch.optim.AdamW(params, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                                 weight_decay=optim.weight_decay)
    if optim.name == "adamw8bit":  # bitsandbytes: optimizer states in 8 bits (QLoRA's paged-free variant)
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                                   weight_decay=optim.weight_decay)
    return torch.optim.SGD(params, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)


def lr_factor(step: int, optim: OptimConfig, max_steps: int) -> float:
    """Multiplier of ``optim.lr`` for the update after ``step`` finished steps: linear warm-up, then decay."""
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    progress = min(1.0, (step - optim.warmup_steps) / max(1, max_steps - optim.warmup_steps))
    floor = optim.min_lr_ratio
    if optim.schedule == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if optim.schedule == "linear":
        return 1 - (1 - floor) * progress
    return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig, max_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, optim, max_steps))


def batch_stream(dataset: Sequence, collate, batch_size: int, rank: int, world: int, seed: int,
                 start: int = 0) -> Iterator[tuple[int, Any]]:
    """Endless (micro-batch index, batch) pairs from ``start``; the last partial global batch of an
    epoch is dropped so every rank gets the same number of batches."""
    per_epoch = len(dataset) // (batch_size * world)
    if per_epoch == 0:
        raise ConfigError(f"dataset of {len(dataset)} samples is smaller than one global batch "
                          f"({batch_size} x {world} processes); lower train.batch_size")
    order, order_epoch = None, -1
    index = start
    while True:
        epoch, position = divmod(index, per_epoch)
        if epoch != order_epoch:
            order, order_epoch = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed + epoch)), epoch
        first = (position * world + rank) * batch_size
        yield index, collate([dataset[int(i)] for i in order[first:first + batch_size]])
        index += 1


def to_device(batch: Any, device, float_dtype: torch.dtype | None = None) -> Any:
    """``batch`` on ``device``; floating tensors also cast to ``float_dtype`` when given (DeepSpeed's bf16
    mode keeps the model's weights in bf16 and, unlike torch autocast, casts no inputs itself)."""
    if isinstance(batch, torch.Tensor):
        batch = batch.to(device, non_blocking=True)
        return batch.to(float_dtype) if float_dtype is not None and batch.is_floating_point() else batch
    if isinstance(batch, dict):
        return {k: to_device(v, device, float_dtype) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(to_device(v, device, float_dtype) for v in batch)
    return batch


def eval_batches(dataset: Sequence, collate, batch_size: int, device, float_dtype=None) -> Iterator[Any]:
    for start in range(0, len(dataset), batch_size):
        samples = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        yield to_device(collate(samples), device, float_dtype)


def train(recipe: Recipe, say=print) -> RunResult:
    """Train ``recipe``; returns the losses, final metrics and the last checkpoint (see module doc)."""
    main = is_main_rank()
    if main:  # fail now, not at the first save after the work it was meant to keep
        check_writable(recipe.out_dir, "run folder")
        check_writable(recipe.out_dir / "checkpoints", "checkpoint folder")
    required = getattr(get_task(recipe.task), "required_files", None)
    if required is not None:
        check_files(required(recipe), recipe.source)
    with RunLock(recipe.out_dir, enabled=main):
        return Trainer(recipe, say).run()


class Trainer:
    """One run: set-up in ``__init__``, then ``run`` loops over ``optimizer_step`` until ``max_steps``."""

    def __init__(self, recipe: Recipe, say=print) -> None:
        t = self.t = recipe.train
        self.recipe = recipe
        if t.threads:
            torch.set_num_threads(t.threads)
        self.accelerator = accelerator = make_accelerator(recipe)
        self.say = say if accelerator.is_main_process else (lambda *_: None)
        if is_deepspeed(accelerator) and t.nonfinite == "skip":
            raise ConfigError(f"{recipe.source}: train.nonfinite=skip is not available under DeepSpeed (the "
                              "engine steps inside backward); use train.nonfinite=stop")
        self.ckpt_root = recipe.out_dir / "checkpoints"
        candidates = resume_candidates(recipe, self.ckpt_root)
        changes = check_resume_recipe(recipe, candidates[0]) if candidates else {}  # before any data is built
        seed_everything(recipe.seed)  # the same base weights and adapter inits on every rank
        task = get_task(recipe.task)(recipe)
        trainable = [p for p in task.parameters() if p.requires_grad]
        if not trainable:
            raise ConfigError(f"{recipe.source}: nothing to train: no adapters and no trainable head")
        if accelerator.is_main_process:
            check_disk(self.ckpt_root, checkpoint_bytes(trainable, recipe.optim.name))
        self.rules = build_rules(recipe)  # train.rules and optim.loraplus_ratio (train/rules/)
        groups = self.rules.param_groups(task, trainable, recipe.optim)
        optimizer = self.rules.make_optimizer(groups, recipe.optim, build_optimizer)
        self.scheduler = build_scheduler(optimizer, recipe.optim, t.max_steps)
        before_prepare(accelerator, task)
        self.model, self.optimizer = accelerator.prepare(task, optimizer)
        self.task = accelerator.unwrap_model(self.model)
        after_prepare(accelerator, self.task)
        self.state = TrainState(world_size=accelerator.num_processes)
        resumed = resume_run(accelerator, self.model, self.task, self.optimizer, self.scheduler, recipe,
                             candidates, self.say)
        resumed_from = resumed.checkpoint if resumed else None
        if resumed:
            self.state = resumed.state
            self.say(f"resumed from {resumed_from} (step {self.state.step}, micro-batch {self.state.micro_batches})"
                     + (f"; changed from step {self.state.step} on: {describe_diff(changes)}" if changes else ""))
        self.rules.on_train_start(self.task, self.optimizer, accelerator, self.state.step)
        if accelerator.is_main_process:
            save_resolved(recipe, recipe.out_dir / "config.yaml")
        self.log = RunLog(recipe.out_dir, accelerator.is_main_process, resume_step=self.state.step, say=self.say)
        if resumed:
            self.log.event(self.state.step, "resume", checkpoint=str(resumed_from), unreadable=resumed.skipped,
                           changed={key: list(values) for key, values in changes.items()})
        self.nonfinite = NonFiniteGuard(recipe, self.ckpt_root, self.log)
        self.result = RunResult(out_dir=recipe.out_dir, step=self.state.step, resumed_from=resumed_from)
        self.eval_data = self.task.eval_dataset()
        self.stream = batch_stream(self.task.train_dataset(), self.task.collate, t.batch_size,
                                   accelerator.process_index, accelerator.num_processes, recipe.seed,
                                   start=self.state.micro_batches)
        self.samples_per_step = t.batch_size * t.grad_accum * accelerator.num_processes
        bf16_weights = is_deepspeed(accelerator) and t.precision == "bf16"
        self.input_dtype = torch.bfloat16 if bf16_weights else None
        self.step_times: list[float] = []

    def run(self) -> RunResult:
        from train.engine.progress import progress_bar

        t, state, result = self.t, self.state, self.result
        bar = progress_bar(t.max_steps, self.recipe.name, self.accelerator.is_main_process and t.progress,
                           initial=state.step)  # tqdm on a terminal, a few plain lines in a log file
        self.task.train()
        while state.step < t.max_steps:
            started, lr, skipped = time.perf_counter(), self.scheduler.get_last_lr()[0], state.skipped_steps
            loss, grad_norm, task_logs = self.optimizer_step()
            state.step += 1
            self.rules.on_step_end(state.step, task_logs)
            self.step_times.append(time.perf_counter() - started)
            result.losses[state.step] = loss
            throughput = self.samples_per_step / self.step_times[-1]
            if state.step % t.log_every == 0 or state.step == t.max_steps:
                metrics = {"loss": loss, **task_logs, "lr": lr, "samples_per_s": throughput,
                           "step_time_s": self.step_times[-1]}
                self.log.log(state.step, "train", metrics | ({} if grad_norm is None else {"grad_norm": grad_norm}))
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{throughput:.0f}")
            self.nonfinite.after_step(state.step, state.skipped_steps > skipped)
            if t.eval_every and state.step % t.eval_every == 0 and state.step != t.max_steps:
                result.eval_metrics = self.evaluate()
            if (t.save_every and state.step % t.save_every == 0 and self.nonfinite.saving) or state.step == t.max_steps:
                result.checkpoint = self.save()
        bar.close()
        return self.finish()

    def optimizer_step(self) -> tuple[float, float | None, dict[str, float]]:
        """``grad_accum`` micro-batches, then one update. Returns the mean loss (over micro-batches and
        ranks), the gradient norm, and the mean of the task's own logs (this rank's micro-batches)."""
        accelerator, t, state = self.accelerator, self.t, self.state
        losses, dropped, grad_norm, logs = [], False, None, []
        self.rules.on_step_start(state.step)
        for _ in range(t.grad_accum):
            index, batch = next(self.stream)
            with accelerator.accumulate(self.model):
                loss, step_logs = self.model(to_device(batch, accelerator.device, self.input_dtype))
                logs.append(step_logs)
                value = float(accelerator.reduce(loss.detach().float(), "mean"))  # the same on every rank
                if not math.isfinite(value):
                    if t.nonfinite == "stop":
                        raise self.nonfinite.stop(value, state.step + 1, index)
                    dropped = True
                self.rules.before_backward(loss)
                accelerator.backward(loss)
                self.rules.after_backward()
                state.micro_batches = index + 1
                losses.append(value)
                if accelerator.sync_gradients:
                    grad_norm = clip(accelerator, self.model, t.clip_norm)
                    if dropped:  # the whole step's gradients are suspect: drop them, take no step
                        state.skipped_steps += 1
                        self.say(f"step {state.step + 1}: non-finite loss, gradients dropped (train.nonfinite=skip)")
                    else:
                        self.rules.before_optimizer_step(state.step)
                        self.optimizer.step()
                    self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
        finite = [v for v in losses if math.isfinite(v)]
        mean_logs = {k: sum(d[k] for d in logs) / len(logs) for k in logs[0]}
        return (sum(finite) / len(finite) if finite else float("nan")), grad_norm, mean_logs

    def evaluate(self) -> dict[str, float]:
        """Every rank evaluates the whole eval set (ZeRO-3 needs all ranks in each forward)."""
        if self.eval_data is None:
            return {}
        self.task.eval()
        batches = eval_batches(self.eval_data, self.task.collate, self.t.batch_size, self.accelerator.device,
                               self.input_dtype)
        with torch.no_grad(), self.accelerator.autocast():
            metrics = self.task.evaluate(batches)
        self.task.train()
        self.log.log(self.state.step, "eval", metrics)
        return metrics

    def save(self) -> Path:
        return save_checkpoint(self.accelerator, self.model, self.task, self.optimizer, self.scheduler, self.state,
                               self.recipe, self.ckpt_root, self.t.keep_last)

    def finish(self) -> RunResult:
        accelerator, result, out_dir = self.accelerator, self.result, self.recipe.out_dir
        result.eval_metrics = self.evaluate()
        self.say("eval " + ", ".join(f"{k}={v:.4f}" for k, v in result.eval_metrics.items()))
        save_trainable(accelerator, self.task, out_dir)  # the final adapters, beside the run's logs
        disagreement = rank_disagreement(accelerator, [p for p in self.task.parameters() if p.requires_grad])
        if disagreement > 0:
            self.say(f"WARNING: trainable parameters differ between ranks (fingerprint difference {disagreement:g})")
        png = self.log.close()
        result.step, result.skipped_steps = self.state.step, self.state.skipped_steps
        result.checkpoint = result.checkpoint or latest_checkpoint(self.ckpt_root)
        if len(self.step_times) > 1:
            result.step_time_s = sum(self.step_times[1:]) / len(self.step_times[1:])
            self.say(f"mean step time {1000 * result.step_time_s:.1f} ms over {len(self.step_times) - 1} steps "
                     f"({self.samples_per_step / result.step_time_s:.0f} samples/s, "
                     f"{accelerator.num_processes} process(es))")
        if accelerator.is_main_process:
            write_summary(result, accelerator, disagreement)
            self.say(f"run folder {out_dir}: adapters.safetensors, metrics.csv, summary.json, config.yaml"
                     + (f", {png.name}" if png else ""))
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return result


def write_summary(result: RunResult, accelerator, disagreement: float) -> Path:
    """summary.json: how the run went, in one small file (scripts and tests read it)."""
    from mm.state import atomic_write

    summary = {
        "step": result.step, "processes": accelerator.num_processes, "setup": setup_name(accelerator),
        "final_loss": result.losses.get(result.step), "eval": result.eval_metrics,
        "step_time_s": result.step_time_s, "skipped_steps": result.skipped_steps,
        "rank_disagreement": disagreement, "cuda_peak_mib": cuda_peak_mib(accelerator),
        "checkpoint": str(result.checkpoint) if result.checkpoint else None,
        "resumed_from": str(result.resumed_from) if result.resumed_from else None,
    }
    path = result.out_dir / "summary.json"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(dumps(summary, indent=2, default=float)))


def clip(accelerator, model, clip_norm: float | None) -> float | None:
    """Clip gradients and return their norm (DeepSpeed clips inside its step: its config has the norm)."""
    if is_deepspeed(accelerator):
        norm = model.get_global_grad_norm()
        return None if norm is None else float(norm)
    if not clip_norm:
        return None
    params = [p for p in model.parameters() if p.grad is not None]
    return float(accelerator.clip_grad_norm_(params, clip_norm))
