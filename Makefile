# Every target creates .venv/ and installs the pinned stack first if needed (a stamp makes reruns no-ops).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mmtune-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TORCH_EXTENSIONS_DIR := $(CURDIR)/$(VENV)/torch_extensions
PYTEST := $(PY) -m pytest -q

.PHONY: install demo test test-slow lint bench clean

install: $(STAMP)

# torch first, alone: the rest then resolves against it instead of pulling another build.
$(STAMP): pyproject.toml
	@# System dependency: espeak-ng synthesises the AVSR track's test speech (data/fake_av.py).
	command -v espeak-ng >/dev/null || (apt-get update -qq && apt-get install -y -qq espeak-ng)
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.9.1 torchvision==0.24.1
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mmtune demo

test: $(STAMP)
	$(PYTEST) -m "not slow"

test-slow: $(STAMP)
	$(PYTEST) -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) scripts/bench_lora.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
