"""EVA: A spans the top principal directions of each layer's inputs (its defining property), the
incremental PCA, the rank redistribution by explained variance (rho), B = 0, the missing-data error,
loading without data, and parity with PEFT's ``eva`` initialisation."""

from __future__ import annotations

import pytest
import torch
from contract_cases import perturb
from toys import TOYS, TinyMLP

import mm
from mm.adapters import eva
from mm.adapters.eva import EVAConfig, IncrementalPCA, redistribute_ranks

TARGETS = ["fc1", "fc2"]


def tiny_mlp() -> TinyMLP:
    torch.manual_seed(0)
    return TinyMLP(d_in=12, hidden=24, d_out=5)


def batches(scales: list[float], n: int = 20, size: int = 32) -> list[torch.Tensor]:
    """Inputs whose variance per feature is ``scales**2``: a known spectrum for the first layer."""
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(size, 12, generator=gen) * torch.tensor(scales) for _ in range(n)]


SPREAD = torch.logspace(0, -1.5, 12).tolist()  # every direction counts, decaying
PEAKED = [3.0, 2.0] + [0.05] * 10  # two directions carry nearly all variance


def layer_inputs(data: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    model = tiny_mlp()
    with torch.no_grad():
        x = torch.cat(data)
        return {"fc1": x, "fc2": model.act(model.fc1(x))}


def principal_directions(rows: torch.Tensor, k: int) -> torch.Tensor:
    centred = rows.double() - rows.double().mean(dim=0)
    return torch.linalg.svd(centred, full_matrices=False).Vh[:k]


def initialised(data, **options) -> tuple[TinyMLP, dict[str, int]]:
    model = tiny_mlp()
    mm.attach(model, EVAConfig(targets=TARGETS, r=4, alpha=8.0, **options))
    return model, eva.initialize(model, data)


def test_A_rows_are_the_top_principal_directions_of_each_layers_inputs():
    """Every minibatch is a shuffle of the same 64 rows, so the principal directions of what each layer
    sees are known exactly; A's rows must be them (each up to sign), orthonormal, and B must be 0."""
    gen = torch.Generator().manual_seed(1)
    rows = torch.randn(64, 12, generator=gen) * torch.tensor(SPREAD)
    data = [rows[torch.randperm(64, generator=gen)] for _ in range(10)]
    model, ranks = initialised(data)
    inputs = layer_inputs(data)
    for name, layer in mm.adapted_layers(model):
        a = layer.adapters["default"].lora_A.detach().double()
        exact = principal_directions(inputs[name], ranks[name])
        cosines = (a * exact).sum(dim=1).abs()
        assert cosines.min() > 0.9999, f"{name}: |cos(A row, principal direction)| = {cosines.tolist()}"
        torch.testing.assert_close(a @ a.T, torch.eye(ranks[name], dtype=a.dtype), rtol=0, atol=1e-6)
        assert torch.count_nonzero(layer.adapters["default"].lora_B) == 0


def test_on_iid_minibatches_A_spans_nearly_the_whole_streams_principal_subspace():
    """With fresh minibatches EVA stops once its components stop moving (tau), so A estimates the
    principal subspace from part of the stream, through a truncated incremental SVD: close, not exact."""
    data = batches(SPREAD)
    model, ranks = initialised(data, tau=0.999)
    inputs = layer_inputs(data)
    for name, layer in mm.adapted_layers(model):
        a = layer.adapters["default"].lora_A.detach().double()
        angles_cos = torch.linalg.svdvals(a @ principal_directions(inputs[name], ranks[name]).T)
        assert angles_cos.min() > 0.98, f"{name}: cosines of principal angles {angles_cos.tolist()}"


def test_ranks_move_to_the_layer_with_more_explained_variance_and_keep_the_budget():
    """With two dominant input directions, fc1's components 3.. explain almost nothing: EVA gives fc1
    rank 2 and the freed budget to fc2 (at most rho * r = 8), keeping the total r * n_layers = 8."""
    model, ranks = initialised(batches(PEAKED), rho=2.0)
    assert ranks == {"fc1": 2, "fc2": 6}
    assert sum(ranks.values()) == 4 * 2
    counts = {n: layer.adapters["default"].lora_A.shape[0] for n, layer in mm.adapted_layers(model)}
    assert counts == ranks
    assert mm.adapter_config(model, "default").rank_pattern == ranks
    _, uniform = initialised(batches(PEAKED), rho=1.0)
    assert uniform == {"fc1": 4, "fc2": 4}, "rho = 1 must not redistribute"


def test_redistribution_picks_the_budget_best_components_under_the_cap():
    ratios = {"a": torch.tensor([0.6, 0.3, 0.05, 0.01]), "b": torch.tensor([0.4, 0.35, 0.2, 0.04]),
              "c": torch.tensor([0.9, 0.02, 0.01, 0.01])}
    assert redistribute_ranks(ratios, budget=6, caps={"a": 4, "b": 4, "c": 4}) == {"a": 2, "b": 3, "c": 1}
    assert redistribute_ranks(ratios, budget=6, caps={"a": 4, "b": 2, "c": 4}) == {"a": 3, "b": 2, "c": 1}
    for budget in range(1, 10):
        assert sum(redistribute_ranks(ratios, budget, dict.fromkeys(ratios, 3)).values()) == budget


def test_incremental_pca_matches_full_pca_when_k_covers_the_data_rank():
    gen = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(10, 3, generator=gen)).Q.T  # rank-3 data in 10 dimensions
    stream = [torch.randn(7, 3, generator=gen) * torch.tensor([3.0, 1.0, 0.3]) @ basis + 5.0 for _ in range(6)]
    pca = IncrementalPCA(4)
    for rows in stream:
        pca.update(rows)
    full = torch.cat(stream).double()
    centred = full - full.mean(dim=0)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    torch.testing.assert_close(pca.mean, full.mean(dim=0))
    torch.testing.assert_close(pca.singular[:3], s[:3])
    torch.testing.assert_close((pca.components[:3] * vh[:3]).sum(dim=1).abs(), torch.ones(3, dtype=s.dtype))
    torch.testing.assert_close(pca.explained_variance_ratio()[:3], s[:3] ** 2 / centred.pow(2).sum())


def test_output_is_the_base_at_init_and_unconverged_layers_are_an_error():
    data = batches(SPREAD)
    model, _ = initialised(data)
    torch.testing.assert_close(model(data[0]), tiny_mlp()(data[0]), rtol=0, atol=0)
    strict = tiny_mlp()
    mm.attach(strict, EVAConfig(targets=TARGETS, r=4, tau=1.0))
    with pytest.raises(RuntimeError, match=r"did not converge .*tau=1\.0.* within 1 pass"):
        eva.initialize(strict, iter(data))  # a one-shot iterator is read once


def test_running_before_initialisation_says_what_is_needed():
    model = tiny_mlp()
    mm.attach(model, EVAConfig(targets=TARGETS, r=4))
    with pytest.raises(RuntimeError, match=r"eva adapter is not initialised: it needs activations: "
                       r"call mm\.adapters\.eva\.initialize\(model, batches"):
        model(torch.randn(2, 12))


@pytest.mark.parametrize("toy_name", ["vit", "llama"])
def test_trained_adapter_loads_on_a_fresh_base_without_data(toy_name, tmp_path):
    toy = TOYS[toy_name]
    model, x = toy.build(), toy.make_input()
    mm.attach(model, EVAConfig(targets=toy.targets, r=4, alpha=8.0, tau=0.9))
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(x.shape, generator=gen) if x.is_floating_point()
            else torch.randint(0, 64, x.shape, generator=gen) for _ in range(8)]
    eva.initialize(model, data)
    perturb(model, scale=0.2)
    expected = toy.run(model, x)
    fresh = mm.load_adapters(toy.build(), mm.save_adapters(model, tmp_path / "eva.safetensors"))
    assert torch.equal(toy.run(fresh, x), expected)
    assert mm.adapter_config(fresh, "default").rank_pattern == mm.adapter_config(model, "default").rank_pattern


def test_a_layer_given_rank_zero_keeps_an_empty_frozen_adapter():
    config = EVAConfig(targets=TARGETS, r=2, rank_pattern={"fc1": 0, "fc2": 4})
    model = tiny_mlp()
    mm.attach(model, config)
    assert model.fc1.adapters["default"].lora_A.shape == (0, 12)
    assert not any(p.requires_grad for p in model.fc1.adapters["default"].parameters())
    assert mm.trainable_report(model).trainable == 4 * (24 + 24)
    model(torch.randn(3, 12)).sum().backward()
    with pytest.raises(mm.ConfigError, match="rank_pattern' has no rank for layer 'fc2'"):
        mm.attach(tiny_mlp(), EVAConfig(targets=TARGETS, rank_pattern={"fc1": 2}))


# --- parity with HF PEFT ------------------------------------------------------------------------------

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("scales", [SPREAD, PEAKED], ids=["spread", "peaked"])
def test_parity_with_peft_eva(scales):
    """Same rank pattern, the same A rows (each up to sign) and the same scale per layer as PEFT's
    ``initialize_lora_eva_weights``. PEFT's incremental PCA uses a seeded low-rank SVD and ours an exact
    SVD of each update, so rows agree to |cos| > 0.999, not bit for bit. PEFT would drop a rank-0 layer's
    adapter; we keep an empty one (not reached here)."""
    from peft.tuners.lora.eva import initialize_lora_eva_weights

    data = batches(scales)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="eva",
                             eva_config=peft.EvaConfig(rho=2.0, tau=0.99))
    theirs = peft.get_peft_model(tiny_mlp(), config)
    initialize_lora_eva_weights(theirs, dataloader=data, forward_fn=lambda m, x: m(x), prepare_model_inputs_fn=None,
                                prepare_layer_inputs_fn=None, show_progress_bar=False)
    ours, ranks = initialised(data, rho=2.0, tau=0.99)
    peft_ranks = {n: theirs.peft_config["default"].rank_pattern.get(n, 4) for n in TARGETS}
    assert ranks == peft_ranks
    for name in TARGETS:
        peft_layer = theirs.base_model.model.get_submodule(name)
        adapter = ours.get_submodule(name).adapters["default"]
        cosines = (peft_layer.lora_A["default"].weight * adapter.lora_A).sum(dim=1).abs()
        assert cosines.min() > 0.999, f"{name}: {cosines.tolist()}"
        assert peft_layer.scaling["default"] == pytest.approx(adapter.scaling)
        assert torch.count_nonzero(peft_layer.lora_B["default"].weight) == 0


# ---- padding and label masks (PEFT's prepare_model_inputs_fn_language_modeling)


def padded_batches(n: int = 12) -> tuple[list[dict], list[torch.Tensor]]:
    """Sequence batches (4, 6, 12) with ragged lengths, their padding filled with huge values, and the real
    positions alone as flat row batches (the same rows, in the same order)."""
    gen = torch.Generator().manual_seed(3)
    padded, real = [], []
    for _ in range(n):
        x = torch.randn(4, 6, 12, generator=gen) * torch.tensor(SPREAD)
        lengths = torch.randint(2, 7, (4,), generator=gen)
        mask = (torch.arange(6)[None] < lengths[:, None]).long()
        x = torch.where(mask[..., None].bool(), x, torch.full_like(x, 50.0))  # padding that would dominate
        padded.append({"x": x, "attention_mask": mask})
        real.append(x[mask.bool()])
    return padded, real


def run_x(model, batch):
    return model(batch["x"] if isinstance(batch, dict) else batch)


def test_padded_positions_stay_out_of_the_statistics():
    padded, real = padded_batches()
    masked_model = tiny_mlp()
    mm.attach(masked_model, EVAConfig(targets=TARGETS, r=4, alpha=8.0))
    masked_ranks = eva.initialize(masked_model, padded, forward_fn=run_x)
    plain_model = tiny_mlp()
    mm.attach(plain_model, EVAConfig(targets=TARGETS, r=4, alpha=8.0))
    plain_ranks = eva.initialize(plain_model, real, forward_fn=run_x)
    assert masked_ranks == plain_ranks
    for name in TARGETS:  # the stats of the unpadded tokens alone (up to matmul rounding on other shapes)
        masked_A = getattr(masked_model, name).adapters["default"].lora_A
        torch.testing.assert_close(masked_A, getattr(plain_model, name).adapters["default"].lora_A,
                                   rtol=1e-4, atol=1e-5)
    unmasked = tiny_mlp()  # without the mask the padding rows dominate the first principal direction
    mm.attach(unmasked, EVAConfig(targets=TARGETS, r=4, alpha=8.0))
    eva.initialize(unmasked, padded, forward_fn=run_x, token_mask=lambda batch, config: None)
    first = unmasked.fc1.adapters["default"].lora_A[0]
    assert abs(float(first @ masked_model.fc1.adapters["default"].lora_A[0])) < 0.9


def test_label_mask_follows_use_label_mask():
    padded, _ = padded_batches(1)
    labels = torch.full((4, 6), 7)
    labels[:, :2] = -100  # e.g. prompt tokens
    batch = {**padded[0], "labels": labels}
    config = EVAConfig(targets=TARGETS, r=4)
    expected = padded[0]["attention_mask"].bool() & (labels != -100)
    assert torch.equal(eva.default_token_mask(batch, config), expected)
    no_labels = EVAConfig(targets=TARGETS, r=4, use_label_mask=False)
    assert torch.equal(eva.default_token_mask(batch, no_labels), padded[0]["attention_mask"].bool())
    assert eva.default_token_mask(padded[0]["x"], config) is None  # a plain tensor batch: every position
