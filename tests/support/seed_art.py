"""`make run` helper: give a newcomer an ART-shaped run to fork, if ./.art has none yet.

Creates {art}/demo/models/tiny/checkpoints/{0000,0001,0002} with small real LoRA adapters (safetensors) and
prints the commands that fork it while `make run` shows the daemon's log.
"""

from __future__ import annotations

import sys
from pathlib import Path

from sidecar.layout import iter_run_dirs
from tests.support.adapters import write_adapter


def main(art: Path) -> None:
    if any(iter_run_dirs(art)):
        print(f"{art} already has runs; forking those.")
        return
    model_dir = art / "demo" / "models" / "tiny"
    for step in (0, 1, 2):
        write_adapter(model_dir / "checkpoints" / f"{step:04d}", seed=step)
    print(f"created an example run in {model_dir} (checkpoints 0000, 0001, 0002)")
    print("in another terminal, try:")
    print(f"  touch {model_dir}/.fork                      # fork from the newest checkpoint (0002)")
    print(f"  .venv/bin/fork-sidecar fork {model_dir} --step 1 --wait")
    print(f"  cat {model_dir}/.fork.done")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else ".art"))
