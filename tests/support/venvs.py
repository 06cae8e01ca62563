"""Real throwaway venvs for trainer-side tests: `python -m venv` whose site-packages chain to another env's.

The chain is a `.pth` that adds the other env's site-packages (with its own `.pth` files) to the new one, so torch
and peft come from there while the preload is installed into the new venv for real (`fork-sidecar preload
install --python`), never through PYTHONPATH.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

__all__ = ["chained_venv", "install_preload", "make_venv", "purelib"]


def purelib(python: Path | str) -> Path:
    """The site-packages directory of the interpreter `python`."""
    out = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(out.stdout.strip())


def chained_venv(where: Path, target_site: Path | None = None, base: Path | str = sys.executable) -> Path:
    """Create a venv at `where` with `base`'s Python, chained to `target_site` (default: this interpreter's site);
    returns its python. `base` must be the Python version `target_site` was built for."""
    subprocess.run([str(base), "-m", "venv", "--without-pip", str(where)], check=True, capture_output=True)
    python = where / "bin" / "python"
    site = target_site or purelib(sys.executable)
    (purelib(python) / "00_chain.pth").write_text(f"import site; site.addsitedir({str(site)!r})\n")
    return python


def install_preload(python: Path) -> subprocess.CompletedProcess[str]:
    """`fork-sidecar preload install --python PYTHON`, run by this interpreter's CLI."""
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "preload", "install", "--python", str(python)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )


def preloaded_venv(where: Path) -> Path:
    """A venv at `where` chained to this interpreter's site-packages (torch, peft, transformers), with the preload
    installed the way a user installs it (`fork-sidecar preload install`); returns its python."""
    python = chained_venv(where)
    install = install_preload(python)
    assert install.returncode == 0, install.stderr
    assert (purelib(python) / "_fork_sidecar.pth").exists()
    return python


def make_venv(root: Path, *packages: Path, base: str = sys.executable) -> tuple[Path, Path]:
    """A real venv under `root` whose site-packages also sees each of `packages` (one path line each)."""
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run([base, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    site = purelib(python)
    for index, package_dir in enumerate(packages):
        (site / f"test_path_{index}.pth").write_text(f"{package_dir}\n")
    return python, site
