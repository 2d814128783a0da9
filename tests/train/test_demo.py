"""The README's demo, end to end on a shortened schedule."""

from __future__ import annotations

import pytest

from train.demo import DemoSettings, run_demo


@pytest.mark.slow
def test_demo_adapts_to_the_shifted_domain_and_keeps_the_base(tmp_path):
    lines: list[str] = []
    results = run_demo(
        DemoSettings(pretrain_epochs=12, adapt_epochs=12, out_dir=str(tmp_path)), log=lines.append
    )
    assert results["base_original"] > 0.85
    assert results["base_shifted"] < 0.5  # the shift really hurts the frozen base
    assert results["lora_shifted"] > results["base_shifted"] + 0.3
    assert results["lora_disabled_original"] == results["base_original"]  # adapter off = base back
    assert results["reloaded_shifted"] == results["lora_shifted"]
    assert (tmp_path / "digits_lora.safetensors").is_file()
    assert any("base + LoRA" in line for line in lines)
