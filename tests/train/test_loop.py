"""The loop on one process: schedule, data order, accumulation, run folder, non-finite losses."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file
from train_helpers import csv_losses, digits_recipe

from train.engine.config import OptimConfig, load_recipe
from train.engine.loop import NonFiniteLossError, batch_stream, lr_factor, train
from train.engine.run_log import read_metrics
from train.tasks.digits import DigitsClassification


def test_schedule_warms_up_then_decays_to_the_floor():
    cosine = OptimConfig(schedule="cosine", warmup_steps=4, min_lr_ratio=0.1)
    factors = [lr_factor(s, cosine, 20) for s in range(21)]
    assert factors[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert factors[4] == pytest.approx(1.0) and factors[20] == pytest.approx(0.1)
    assert factors[12] == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the decay: cos(pi/2) = 0
    assert all(a >= b for a, b in zip(factors[4:], factors[5:], strict=False))
    linear = OptimConfig(schedule="linear", warmup_steps=0)
    assert [lr_factor(s, linear, 10) for s in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0])
    assert lr_factor(7, OptimConfig(schedule="constant"), 10) == 1.0


def test_ranks_split_the_single_process_batches_and_resume_mid_stream():
    data = [{"x": torch.tensor(i)} for i in range(50)]
    collate = torch.utils.data.default_collate
    single = batch_stream(data, collate, 8, rank=0, world=1, seed=3)
    ranks = [batch_stream(data, collate, 4, rank=r, world=2, seed=3) for r in range(2)]
    seen_epoch0 = []
    for step in range(12):  # 6 batches per epoch: crosses into epoch 1
        index, whole = next(single)
        parts = [next(stream)[1]["x"] for stream in ranks]
        assert index == step and torch.equal(torch.cat(parts), whole["x"])
        if step < 6:
            seen_epoch0.extend(whole["x"].tolist())
    assert len(set(seen_epoch0)) == 48, "an epoch visits distinct samples"
    resumed = batch_stream(data, collate, 8, rank=0, world=1, seed=3, start=9)
    fresh = batch_stream(data, collate, 8, rank=0, world=1, seed=3)
    for _ in range(9):
        next(fresh)
    assert torch.equal(next(resumed)[1]["x"], next(fresh)[1]["x"])


def test_a_run_learns_and_writes_its_folder(tmp_path):
    recipe = digits_recipe(tmp_path / "run", "train.max_steps=12", "train.eval_every=4", "train.save_every=4")
    result = train(recipe)
    losses = csv_losses(tmp_path / "run")
    assert sorted(losses) == list(range(1, 13)) and losses == pytest.approx(result.losses)
    assert sum(list(losses.values())[-3:]) < sum(list(losses.values())[:3]), "the loss must go down"
    folder = tmp_path / "run"
    assert (folder / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert yaml.safe_load((folder / "config.yaml").read_text())["train"]["max_steps"] == 12
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["setup"] == "single" and summary["step"] == 12 and summary["eval"]["accuracy"] > 0.2
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["step-00000008", "step-00000012"]
    assert (folder / "checkpoints" / "step-00000012" / "config.yaml").is_file()
    evals = [r for r in read_metrics(folder / "metrics.csv") if r["split"] == "eval" and r["metric"] == "accuracy"]
    assert [r["step"] for r in evals] == [4, 8, 12] and evals[-1]["value"] > evals[0]["value"]
    # The saved adapters and head reproduce the trained model's evaluation on a fresh task.
    from train.engine.checkpoint import load_trainable

    fresh = DigitsClassification(load_recipe(folder / "config.yaml"))
    load_trainable(fresh, folder)
    metrics = fresh.evaluate([fresh.collate([fresh.eval_dataset()[i] for i in range(len(fresh.eval_dataset()))])])
    assert metrics["accuracy"] == pytest.approx(result.eval_metrics["accuracy"])
    assert all(t.numel() > 0 for t in load_file(folder / "adapters.safetensors").values())


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    big = train(digits_recipe(tmp_path / "big", "train.max_steps=6", "train.batch_size=32"))
    accumulated = train(digits_recipe(tmp_path / "acc", "train.max_steps=6", "train.batch_size=16",
                                      "train.grad_accum=2"))
    assert accumulated.losses == pytest.approx(big.losses, abs=1e-5)
    a, b = load_file(tmp_path / "big" / "adapters.safetensors"), load_file(tmp_path / "acc" / "adapters.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


@pytest.mark.parametrize("clip_norm", [1e-3, None])
def test_clipping_bounds_the_update(tmp_path, clip_norm):
    # Plain SGD with lr 1 moves the weights by exactly the (clipped) gradient: its norm is the bound.
    recipe = digits_recipe(tmp_path / "run", "train.max_steps=1", "optim.name=sgd", "optim.lr=1.0",
                           "optim.warmup_steps=0", "optim.schedule=constant", f"train.clip_norm={clip_norm or 'null'}")
    start = {n: p.detach().clone() for n, p in DigitsClassification(recipe).named_parameters() if p.requires_grad}
    train(recipe)
    from train.engine.checkpoint import load_trainable

    trained = DigitsClassification(recipe)
    load_trainable(trained, tmp_path / "run")
    moved = torch.sqrt(sum((p.detach() - start[n]).square().sum() for n, p in trained.named_parameters()
                           if p.requires_grad))
    if clip_norm is None:
        assert moved > 1e-2
    else:
        assert moved == pytest.approx(clip_norm, rel=1e-3)


def _nan_at_call(monkeypatch, call: int) -> None:
    original, calls = DigitsClassification.training_step, {"n": 0}

    def poisoned(self, batch):
        calls["n"] += 1
        loss, logs = original(self, batch)
        return (loss * float("nan") if calls["n"] == call else loss), logs

    monkeypatch.setattr(DigitsClassification, "training_step", poisoned)


def _events(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "events.jsonl").read_text().splitlines()]


def _strict_json(path) -> dict:
    """JSON as any strict reader takes it: a bare NaN or Infinity fails."""
    def refuse(constant):
        raise AssertionError(f"{path}: {constant} is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_nonfinite_stop_keeps_the_checkpoint_from_before_it_and_writes_none(tmp_path, monkeypatch):
    # Saves at 4 and 8... ; NaN at step 6: the weights after step 5 produced it, so no "last good" save of
    # them (it would also prune an older, good checkpoint): step-00000004 stays the newest, and is named.
    _nan_at_call(monkeypatch, call=6)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 6 .*kept the checkpoint from before it, "
                                                  r".*step-00000004 \(step 4\).*train.resume=auto"):
        train(digits_recipe(run, "train.max_steps=10", "train.save_every=4", "train.keep_last=1"))
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000004"]
    (event,) = _events(run)
    assert event["event"] == "nonfinite_stop" and event["first_bad_step"] == 6
    assert event["checkpoint"].endswith("step-00000004")


def test_nonfinite_stop_without_any_checkpoint_says_so(tmp_path, monkeypatch):
    _nan_at_call(monkeypatch, call=2)
    with pytest.raises(NonFiniteLossError, match=r"no checkpoint was saved before step 2 \(train.save_every=0\)"):
        train(digits_recipe(tmp_path / "run", "train.max_steps=4"))


def test_nonfinite_loss_skip_drops_that_step_and_goes_on(tmp_path, monkeypatch):
    _nan_at_call(monkeypatch, call=3)
    result = train(digits_recipe(tmp_path / "run", "train.max_steps=6", "train.nonfinite=skip"))
    assert result.skipped_steps == 1 and math.isnan(result.losses[3])
    assert all(math.isfinite(result.losses[s]) for s in (1, 2, 4, 5, 6))
    weights = load_file(tmp_path / "run" / "adapters.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values()), "NaN gradients must not reach the weights"


def test_nonfinite_skip_stops_after_the_limit_of_consecutive_skips(tmp_path, monkeypatch):
    original = DigitsClassification.training_step

    def diverged_from_step_3(self, batch, calls={"n": 0}):  # noqa: B006  (a counter shared by the calls)
        calls["n"] += 1
        loss, logs = original(self, batch)
        return (loss * float("nan") if calls["n"] >= 3 else loss), logs

    monkeypatch.setattr(DigitsClassification, "training_step", diverged_from_step_3)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"non-finite in 3 consecutive steps \(3\.\.5; "
                                                  r"train.max_nonfinite_skips=3\).*step-00000002 \(step 2\)"):
        train(digits_recipe(run, "train.max_steps=20", "train.nonfinite=skip", "train.save_every=2",
                            "train.keep_last=1"))
    # No save while skipping: the step-4 save would have pruned the one from before the first NaN.
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000002"]


def test_a_run_with_a_nan_last_step_writes_valid_json(tmp_path, monkeypatch):
    _nan_at_call(monkeypatch, call=4)
    result = train(digits_recipe(tmp_path / "run", "train.max_steps=4", "train.nonfinite=skip"))
    assert math.isnan(result.losses[4])
    summary = _strict_json(tmp_path / "run" / "summary.json")
    assert summary["final_loss"] is None and summary["skipped_steps"] == 1 and summary["step"] == 4


def test_resume_applies_a_changed_learning_rate_and_records_it(tmp_path):
    """Defect 2: the optimizer state carried the old lr while config.yaml recorded the new one."""
    run, constant = tmp_path / "run", ("optim.schedule=constant", "optim.warmup_steps=0", "train.save_every=2")
    train(digits_recipe(run, "train.max_steps=4", "optim.lr=0.02", *constant))
    train(digits_recipe(run, "train.max_steps=8", "optim.lr=0.005", *constant, "train.resume=auto"))
    rates = {r["step"]: r["value"] for r in read_metrics(run / "metrics.csv") if r["metric"] == "lr"}
    assert rates == pytest.approx({1: 0.02, 2: 0.02, 3: 0.02, 4: 0.02, 5: 0.005, 6: 0.005, 7: 0.005, 8: 0.005})
    resume = _events(run)[-1]
    assert resume["event"] == "resume" and resume["step"] == 4
    assert resume["changed"] == {"optim.lr": [0.02, 0.005], "train.max_steps": [4, 8]}
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"] == 0.005


def test_after_a_nan_stop_a_resume_with_a_lower_lr_finishes(tmp_path):
    """The advice the NaN stop prints works: the kept checkpoint is from before the blow-up, and the
    lowered lr is the one used."""
    run, sgd = tmp_path / "run", ("optim.name=sgd", "optim.schedule=constant", "optim.warmup_steps=0",
                                  "train.clip_norm=null", "train.save_every=4")
    train(digits_recipe(run, "train.max_steps=4", "optim.lr=0.05", *sgd))
    with pytest.raises(NonFiniteLossError, match=r"step-00000004 \(step 4\)"):
        train(digits_recipe(run, "train.max_steps=12", "optim.lr=1e5", *sgd, "train.resume=auto"))
    result = train(digits_recipe(run, "train.max_steps=12", "optim.lr=0.05", *sgd, "train.resume=auto"))
    assert result.resumed_from.name == "step-00000004" and result.step == 12
    assert all(math.isfinite(v) for v in csv_losses(run).values()) and sorted(csv_losses(run)) == list(range(1, 13))


def test_mixture_adapters_add_and_log_their_balance_loss(tmp_path):
    """Any task: the loop's forward adds the routers' weighted balance loss and logs the routers' health."""
    from train_helpers import LLAMA

    mlp = "adapters.default.targets=[gate_proj,up_proj,down_proj]"
    recipe = load_recipe(LLAMA, ["train.progress=false", "train.threads=1", "train.eval_every=0",
                                 "train.save_every=0", "train.max_steps=3", f"train.out_dir={tmp_path / 'run'}",
                                 "adapters.default.method=mixlora", mlp, "adapters.default.r=2",
                                 "adapters.default.num_experts=4", "adapters.default.aux_loss_coef=0.5"])
    from train.engine.task import get_task

    task = get_task(recipe.task)(recipe)
    batch = task.collate([task.train_dataset()[i] for i in range(4)])
    task_loss, _ = task.training_step(batch)
    loss, logs = task(batch)
    assert logs["moe_aux_loss"] >= 0.5 * 2 - 1e-4  # top-2 balance loss is at least k = 2
    assert loss.item() == pytest.approx(task_loss.item() + logs["moe_aux_loss"], rel=1e-5)
    train(recipe)
    logged = {r["metric"] for r in read_metrics(tmp_path / "run" / "metrics.csv") if r["split"] == "train"}
    assert {"moe_aux_loss", "moe_router_entropy", "moe_max_expert_share"} <= logged
