"""Smoke test of scripts/bench_moe.py on a tiny model: the variants agree and every row is printed.

Timing figures are the script's job (ratios against a baseline in the same run), never asserted here.
"""

from __future__ import annotations

import pytest
from script_loader import load_script


def load_bench():
    return load_script('bench_moe')


def test_naive_per_expert_ffn_loop_computes_the_library_mixture():
    import torch

    from mm.adapters.moe import aux_loss

    bench = load_bench()
    sizes = {"layers": 1, "hidden": 16, "intermediate": 40, "heads": 2, "vocab": 32, "batch": 2, "seq": 5}
    library, naive = bench.build("default", sizes), bench.build("naive", sizes)
    assert "forward" in vars(naive.model.layers[0].mlp), "the naive row must run the bench's own loop"
    ids = torch.randint(0, 32, (2, 5), generator=torch.Generator().manual_seed(0))
    grads = []
    for model in (library, naive):
        out = model(input_ids=ids, labels=ids)
        (out.loss + aux_loss(model)).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    torch.testing.assert_close(naive(input_ids=ids).logits, library(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 7  # 3 x (A, B) + the router
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_quick_run_prints_every_row():
    bench = load_bench()
    text = bench.main(["--quick", "--rounds", "1", "--steps", "1", "--no-memory"])
    labels = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert labels[1:] == list(bench.ROWS.values())
    assert "naive per-expert FFN loop / default, training step:" in text


def test_cuda_device_without_a_gpu_is_a_clear_usage_error(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: --device cuda is valid here")
    with pytest.raises(SystemExit) as exit_info:
        load_bench().main(["--quick", "--device", "cuda"])
    assert exit_info.value.code == 2
    assert "--device cuda: torch sees no CUDA device" in capsys.readouterr().err
