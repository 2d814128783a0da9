"""The PEFT parity tests skip without peft locally but fail in CI (``CI=true``), so CI cannot lose them."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

PARITY = Path(__file__).with_name("test_peft_parity.py")


def _import_parity_without_peft(monkeypatch: pytest.MonkeyPatch, ci: str | None) -> None:
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now raises ImportError
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    spec = importlib.util.spec_from_file_location("parity_without_peft", PARITY)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))


def test_missing_peft_fails_the_parity_module_in_ci(monkeypatch):
    with pytest.raises(ImportError, match="peft is required in CI"):
        _import_parity_without_peft(monkeypatch, "true")


def test_missing_peft_skips_the_parity_module_locally(monkeypatch):
    with pytest.raises(pytest.skip.Exception, match="peft is not installed"):
        _import_parity_without_peft(monkeypatch, None)
