"""mm.AdapterPool: adapters registered from safetensors files and PEFT directories, paged into a fixed
device pool with LRU eviction; outputs equal the attached adapters' per-row route; bad files are refused
naming the file, leaving the pool as it was."""

from __future__ import annotations

import pytest
import torch
from contract_cases import perturb
from toys import TOYS

import mm
from mm.route import route

TARGETS = TOYS["llama"].targets


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Four LoRA adapters of different ranks (one on fewer layers), each in its own file; c also as PEFT."""
    folder = tmp_path_factory.mktemp("pool")
    model = TOYS["llama"].build()
    specs = {"a": (4, TARGETS), "b": (2, TARGETS[:2]), "c": (8, TARGETS), "d": (3, TARGETS)}
    for seed, (name, (rank, targets)) in enumerate(specs.items()):
        mm.attach(model, mm.LoRAConfig(targets=targets, r=rank, alpha=2 * rank, rslora=name == "d"), name)
        with torch.no_grad():
            perturb(model, name, seed=seed + 1)
        mm.save_adapters(model, folder / f"{name}.safetensors", [name])
    mm.export_peft(model, folder / "c_peft", adapter="c")
    ids = torch.randint(0, 64, (5, 6), generator=torch.Generator().manual_seed(4))
    return folder, model, ids


def _reference(model, ids, rows):
    with torch.no_grad(), route(row_adapters=rows, gathered=False):
        return model(ids).logits


def _pool(folder, slots=2, **kwargs):
    base = TOYS["llama"].build()
    pool = mm.AdapterPool(base, targets=TARGETS, r_max=8, slots=slots, **kwargs)
    for name in "abcd":
        pool.register(name, folder / f"{name}.safetensors")
    return base, pool


def _served(base, pool, ids, rows):
    with torch.no_grad(), pool.route(rows):
        return base(ids).logits


def test_pool_serves_mixed_ranks_equal_to_attached_adapters_with_lru_paging(saved):
    folder, model, ids = saved
    base, pool = _pool(folder, slots=2)
    memory = pool.device_bytes()
    for rows in (["a", "b", None, "a", "b"], ["c", "a", "c", None, "a"], ["d", "b", "d", "b", None]):
        torch.testing.assert_close(_served(base, pool, ids, rows), _reference(model, ids, rows), rtol=1e-5, atol=1e-5)
    # a, b loaded; c needed a slot: b (least recently used) went; then d, b evicted a and c.
    assert pool.resident() == ["d", "b"] and pool.evictions == 3 and pool.loads == 5
    assert pool.device_bytes() == memory  # fixed by the slots, whatever was paged in


def test_peft_directory_registers_like_the_mmtune_file(saved):
    folder, model, ids = saved
    base, pool = _pool(folder, slots=3)
    pool.register("c_peft", folder / "c_peft")
    rows = ["c_peft", "a", None, "c_peft", "b"]
    expected = _reference(model, ids, ["c", "a", None, "c", "b"])
    torch.testing.assert_close(_served(base, pool, ids, rows), expected, rtol=1e-5, atol=1e-5)


def test_device_memory_is_bounded_by_the_budget_not_the_number_registered(saved):
    folder, _, _ = saved
    base = TOYS["llama"].build()
    one_slot = mm.AdapterPool(TOYS["llama"].build(), targets=TARGETS, r_max=8, slots=1).slot_bytes
    pool = mm.AdapterPool(base, targets=TARGETS, r_max=8, budget_bytes=3 * one_slot + one_slot // 2)
    assert pool.slots == 3
    before = pool.device_bytes()
    for i in range(200):
        pool.register(f"copy{i}", folder / "a.safetensors")
    ids = torch.randint(0, 64, (3, 4))
    for start in range(0, 12, 3):
        _served(base, pool, ids, [f"copy{start + k}" for k in range(3)])
    assert pool.device_bytes() == before and len(pool.resident()) == 3 and len(pool.names()) == 200
    with pytest.raises(mm.ConfigError, match="holds no adapter"):
        mm.AdapterPool(base, targets=TARGETS, r_max=8, budget_bytes=one_slot - 1)


def test_a_file_that_does_not_fit_is_refused_naming_it_and_the_pool_keeps_working(saved, tmp_path):
    folder, model, ids = saved
    base, pool = _pool(folder, slots=2)
    rows = ["a", "b", None, "a", "b"]
    before = _served(base, pool, ids, rows)
    other = TOYS["llama"].build()
    mm.attach(other, mm.LoRAConfig(targets=TARGETS, r=16), "big")  # rank above r_max
    mm.save_adapters(other, tmp_path / "big.safetensors")
    with pytest.raises(mm.AdapterStateError, match=r"big\.safetensors.*rank 16.*r_max=8"):
        pool.register("big", tmp_path / "big.safetensors")
    wide = torch.nn.Sequential()
    wide.add_module("q_proj", torch.nn.Linear(16, 32))
    mm.attach(wide, mm.LoRAConfig(targets=["q_proj"], r=2), "wide")
    mm.save_adapters(wide, tmp_path / "wide.safetensors")
    with pytest.raises(mm.AdapterStateError, match=r"wide\.safetensors.*'q_proj'.*not one of the pool"):
        pool.register("wide", tmp_path / "wide.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(mm.AdapterStateError, match=r"junk\.safetensors.*not a readable"):
        pool.register("junk", tmp_path / "junk.safetensors")
    with pytest.raises(mm.PoolError, match="unknown adapter 'nope'.*a, b, c, d"):
        pool.acquire(["a", "nope"])
    with pytest.raises(mm.PoolError, match="3 adapters; the pool holds 2"):
        pool.acquire(["a", "c", "d"])
    with pytest.raises(mm.PoolError, match="already registered"):
        pool.register("a", folder / "c.safetensors")
    assert pool.names() == list("abcd") and pool.resident() == ["a", "b"]
    torch.testing.assert_close(_served(base, pool, ids, rows), before)


def test_a_file_changed_after_registering_fails_its_load_without_evicting(saved, tmp_path):
    folder, _, ids = saved
    base, pool = _pool(folder, slots=2)
    (tmp_path / "x.safetensors").write_bytes((folder / "a.safetensors").read_bytes())
    pool.register("x", tmp_path / "x.safetensors")
    _served(base, pool, ids, ["a", "b", "a", "b", None])
    data = bytearray((tmp_path / "x.safetensors").read_bytes())
    data[-3] ^= 0xFF  # flip bits in the last tensor's bytes
    (tmp_path / "x.safetensors").write_bytes(bytes(data))
    with pytest.raises(mm.AdapterStateError, match=r"x\.safetensors.*checksum"):
        pool.acquire(["x"])
    assert pool.resident() == ["a", "b"] and pool.evictions == 0


def test_prefetched_adapters_load_without_reading_the_file_again(saved, tmp_path):
    folder, model, ids = saved
    base, pool = _pool(folder, slots=2)
    for name in ("x", "bad"):
        (tmp_path / f"{name}.safetensors").write_bytes((folder / "c.safetensors").read_bytes())
        pool.register(name, tmp_path / f"{name}.safetensors")
    data = bytearray((tmp_path / "bad.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (tmp_path / "bad.safetensors").write_bytes(bytes(data))
    pool.prefetch(["x", "bad"])
    pool._pending["x"].result()  # wait for the background read, then take the file away
    (tmp_path / "x.safetensors").unlink()
    rows = ["x", "a", None, "x", "a"]
    torch.testing.assert_close(_served(base, pool, ids, rows), _reference(model, ids, ["c", "a", None, "c", "a"]),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(mm.AdapterStateError, match=r"bad\.safetensors.*checksum"):  # the background error, here
        pool.acquire(["bad"])
    assert pool.resident() == ["x", "a"]
