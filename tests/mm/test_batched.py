"""The gathered heterogeneous-batch kernel (mm.batched): equal to the per-adapter loop (the reference,
``gathered=False``) in outputs and in gradients, for every method whose update is s B A x, without running
any adapter's own forward."""

from __future__ import annotations

import pytest
import torch
from contract_cases import perturb
from toys import TOYS

import mm
from mm.adapters.lora import LoRA
from mm.adapters.lora_xs import LoRAXSConfig
from mm.adapters.mos import MoSConfig
from mm.adapters.nola import NOLAConfig
from mm.adapters.pissa import PiSSAConfig
from mm.batched import gathered_low_rank, stack_factors
from mm.route import route

ROWS = ["a", "b", None, "b", "c", "a"]


def _llama_with(configs: dict[str, mm.AdapterConfig]):
    toy = TOYS["llama"]
    model = toy.build()
    for seed, (name, config) in enumerate(configs.items()):
        mm.attach(model, config, name)
        with torch.no_grad():
            perturb(model, name, seed=seed + 1)
    ids = torch.randint(0, 64, (len(ROWS), 5), generator=torch.Generator().manual_seed(3))
    return model, ids


def _run(model, ids, gathered: bool, rows: list[str | None] = ROWS) -> torch.Tensor:
    with route(row_adapters=rows, gathered=gathered):
        return model(ids).logits


def test_kernel_matches_each_row_alone():
    gen = torch.Generator().manual_seed(0)
    factors = [(torch.randn(r, 6, generator=gen), torch.randn(5, r, generator=gen), s)
               for r, s in ((2, 0.5), (4, 2.0), (3, 1.0))]
    a_stack, b_stack = stack_factors(factors)
    assert a_stack.shape == (4, 4, 6) and b_stack.shape == (4, 5, 4)
    x, out = torch.randn(5, 3, 6, generator=gen), torch.randn(5, 3, 5, generator=gen)
    slots = torch.tensor([2, 0, 3, 1, 0])  # slot 3: no adapter
    got = gathered_low_rank(x, out, a_stack, b_stack, slots)
    for row, slot in enumerate(slots.tolist()):
        expected = out[row].clone()
        if slot < 3:
            a, b, s = factors[slot]
            expected += s * x[row] @ a.T @ b.T
        torch.testing.assert_close(got[row], expected)


@pytest.mark.parametrize("method", ["lora_mixed_ranks", "pissa", "lora_xs", "nola", "mos"])
def test_gathered_equals_the_loop_and_skips_adapter_forwards(method, monkeypatch):
    targets = TOYS["llama"].targets
    configs = {
        "lora_mixed_ranks": {"a": mm.LoRAConfig(targets=targets, r=4, alpha=8),
                             "b": mm.LoRAConfig(targets=targets[:2], r=2, alpha=4, rslora=True),
                             "c": mm.LoRAConfig(targets=targets, r=6, alpha=6)},
        "pissa": {n: PiSSAConfig(targets=targets, r=2, alpha=4) for n in "abc"},
        "lora_xs": {n: LoRAXSConfig(targets=targets, r=2) for n in "abc"},
        "nola": {n: NOLAConfig(targets=targets, r=2, num_basis_a=4, num_basis_b=5, seed=i)
                 for i, n in enumerate("abc")},
        "mos": {n: MoSConfig(targets=targets, r=2, shards_per_vector=2, pool_shards=6, private_shards=1)
                for n in "abc"},
    }[method]
    model, ids = _llama_with(configs)
    with torch.no_grad():
        reference = _run(model, ids, gathered=False)
        calls = []
        for cls in {type(a) for _, layer in mm.adapted_layers(model) for a in layer.adapters.values()}:
            monkeypatch.setattr(cls, "forward", lambda *args, **kw: calls.append(1) or args[2])
        gathered = _run(model, ids, gathered=True)
    assert calls == []  # no adapter ran on its own: the kernel computed every row
    torch.testing.assert_close(gathered, reference, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(gathered[0], gathered[1])  # rows really differ by adapter


def test_gradients_reach_only_each_rows_adapter():
    targets = TOYS["llama"].targets
    configs = {n: mm.LoRAConfig(targets=targets, r=r, alpha=8) for n, r in (("a", 4), ("b", 2), ("c", 3), ("d", 4))}
    model, ids = _llama_with(configs)  # "d" is attached but no row uses it
    grads = {}
    for gathered in (False, True):
        model.zero_grad(set_to_none=True)
        _run(model, ids, gathered).square().mean().backward()
        grads[gathered] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for name, grad in grads[False].items():
        if ".d." in name or name.endswith(".d"):
            assert grad is None and grads[True][name] is None or float(grads[True][name].abs().max()) == 0.0
            continue
        torch.testing.assert_close(grads[True][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # Only the rows of "b" reach b: dropping every other row's loss leaves b's gradient unchanged.
    model.zero_grad(set_to_none=True)
    logits = _run(model, ids, True)
    logits[[1, 3]].square().sum().div(logits.numel()).backward()
    b_grads = {n: p.grad for n, p in model.named_parameters() if "adapters.b." in n}
    assert b_grads and all(torch.allclose(g, grads[True][n], atol=1e-7) for n, g in b_grads.items())


def test_stacks_are_reused_without_gradients_and_follow_updates():
    targets = TOYS["llama"].targets
    model, ids = _llama_with({n: mm.LoRAConfig(targets=targets, r=2) for n in "abc"})
    with torch.no_grad():
        first = _run(model, ids, True)
        layer = next(layer for _, layer in mm.adapted_layers(model))
        held = layer._gathered_stacks[1][0]
        assert _run(model, ids, True).equal(first) and layer._gathered_stacks[1][0] is held
        layer.adapters["a"].lora_B.add_(1.0)  # an in-place update (an optimizer step) must be seen
        changed = _run(model, ids, True)
        assert layer._gathered_stacks[1][0] is not held
        torch.testing.assert_close(changed, _run(model, ids, False), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(changed[0], first[0])


def test_dropout_in_training_falls_back_to_the_loop(monkeypatch):
    targets = TOYS["llama"].targets
    model, ids = _llama_with({n: mm.LoRAConfig(targets=targets, r=2, dropout=0.5) for n in "abc"})
    model.train()
    calls = []
    original = LoRA.forward
    monkeypatch.setattr(LoRA, "forward", lambda self, *a: calls.append(1) or original(self, *a))
    _run(model, ids, True)
    assert calls  # per-adapter dropout masks: the reference loop ran


def test_grouped_rows_take_the_gather_free_path_with_equal_outputs_and_gradients(monkeypatch):
    """Rows in equal adapter-major blocks (a multi-adapter training batch) skip the gather; same results."""
    import mm.batched

    targets = TOYS["llama"].targets
    model, ids = _llama_with({n: mm.LoRAConfig(targets=targets, r=r, alpha=4) for n, r in (("a", 2), ("b", 3), ("c", 2))})
    rows = ["a", "a", "b", "b", "c", "c"]
    gathers = []
    original = mm.batched.gathered_low_rank
    monkeypatch.setattr(mm.batched, "gathered_low_rank", lambda *a: gathers.append(1) or original(*a))
    results = {}
    for gathered in (False, True):
        model.zero_grad(set_to_none=True)
        logits = _run(model, ids, gathered, rows)
        logits.square().mean().backward()
        results[gathered] = logits, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert gathers == []
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-5, atol=1e-5)
    for name, grad in results[False][1].items():
        torch.testing.assert_close(results[True][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)
