#!/usr/bin/env bash
# Builds .venv-art: the real OpenPipe ART service module (openpipe-art 0.5.18, the last release for Python 3.11) on CPU,
# for tests/test_art.py. Kept apart from .venv because ART pins transformers 5.2.0 and trl 0.20.0.
# Usage: tests/support/make_art_venv.sh [VENV_DIR]   (default .venv-art next to this repo's .venv)
set -euo pipefail
here="$(cd "$(dirname "$0")/../.." && pwd)"
venv="${1:-$here/.venv-art}"
python="${PYTHON:-python3.11}"

"$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
# torch first and pinned to the CPU build on this machine's disk (a bare requirement pulls a multi-GB CUDA build).
"$venv/bin/python" -m pip install -q torch==2.13.0
"$venv/bin/python" -m pip install -q torch==2.13.0 openpipe-art==0.5.18 trl==0.20.0 transformers==5.2.0 peft
# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break `import transformers` beside CPU torch.
"$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
# The sidecar itself (daemon deps are small; its preload is what the tests exercise).
"$venv/bin/python" -m pip install -q --no-deps -e "$here"
"$venv/bin/python" -m pip install -q "psutil>=5.9" "pyyaml>=6" "safetensors>=0.4" pytest pytest-timeout
"$venv/bin/python" -c "import art.unsloth.service as s; print('art.unsloth.service imports:', s.UnslothService)"
touch "$venv/.installed"
