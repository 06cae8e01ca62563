"""Zero-touch ART forks: the marker written after `LocalBackend._experimental_fork_checkpoint` returns.

Two ways: a stand-in class here with openpipe-art 0.5.18's signature and behaviour (pick the newest step not after
`not_after_step` from the source run, copy it into the destination run), for the cases the real one cannot be made to
produce on demand; and the real `art.local.backend.LocalBackend` of openpipe-art 0.5.18 in `.venv-art`
(tests/support/make_art_venv.sh), whose fork is a plain file copy that runs on CPU, driven through the real
post-import hook machinery in a subprocess.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import textwrap
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from sidecar.layout import RunDir
from sidecar.marker import parse_marker
from sidecar.preload import art_fork
from sidecar.resolve import resolve_source
from tests.support.adapters import write_adapter

REPO = Path(__file__).resolve().parents[1]
ART_VENV = Path(os.environ.get("FORK_SIDECAR_ART_VENV") or REPO / ".venv-art")


@dataclass
class Model:
    name: str
    project: str


class StandInBackend:
    """openpipe-art 0.5.18's LocalBackend reduced to `_path` and the fork method (same signature, same effect)."""

    def __init__(self, path: str) -> None:
        self._path = path
        self.fail: Exception | None = None

    async def _experimental_fork_checkpoint(
        self,
        model: Model,
        from_model: str,
        from_project: str | None = None,
        from_s3_bucket: str | None = None,
        not_after_step: int | None = None,
        verbose: bool = False,
        prefix: str | None = None,
    ) -> None:
        await asyncio.sleep(0)
        if self.fail is not None:
            raise self.fail
        source = Path(self._path) / (from_project or model.project) / "models" / from_model / "checkpoints"
        steps = sorted(int(p.name) for p in source.iterdir() if p.name.isdigit())
        step = [s for s in steps if not_after_step is None or s <= not_after_step][-1]
        dest = Path(self._path) / model.project / "models" / model.name / "checkpoints" / f"{step:04d}"
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(source / f"{step:04d}", dest)


def make_runs(art: Path, source_steps: tuple[int, ...] = (0, 3, 7)) -> tuple[Path, Path]:
    source = art / "p" / "models" / "base"
    for step in source_steps:
        write_adapter(source / "checkpoints" / f"{step:04d}", seed=step + 1)
    dest = art / "p" / "models" / "child"
    write_adapter(dest / "checkpoints" / "0000", seed=100)
    return source, dest


@pytest.fixture
def backend_cls() -> type[StandInBackend]:
    cls = type("LocalBackend", (StandInBackend,), {})  # a fresh class per test: patching is in place
    module = ModuleType("art.local.backend")
    module.LocalBackend = cls  # type: ignore[attr-defined]
    art_fork.on_art_local_backend(module)
    return cls


def fork(backend: StandInBackend, **kwargs: Any) -> None:
    asyncio.run(backend._experimental_fork_checkpoint(Model("child", "p"), "base", **kwargs))


def marker_of(dest: Path) -> dict[str, Any]:
    return parse_marker((dest / ".fork").read_bytes(), dest / ".fork").to_json()


def test_a_fork_writes_a_step_marker_the_daemon_resolves_to_the_copied_step(
    tmp_path: Path, backend_cls: type[StandInBackend]
) -> None:
    _, dest = make_runs(tmp_path / "art")
    fork(backend_cls(str(tmp_path / "art")))
    request = marker_of(dest)
    assert request["kind"] == "step" and request["step"] == 7
    assert request["request_id"].startswith("art-")
    assert [p.name for p in dest.iterdir() if p.name.startswith(".fork")] == [".fork"]  # no temp left behind
    resolved = resolve_source(
        parse_marker((dest / ".fork").read_bytes(), dest), RunDir(tmp_path / "art", "p", "child"), (tmp_path / "art",)
    )
    assert resolved == dest / "checkpoints" / "0007"


def test_not_after_step_and_a_step_the_destination_already_had(
    tmp_path: Path, backend_cls: type[StandInBackend]
) -> None:
    _, dest = make_runs(tmp_path / "art")
    write_adapter(dest / "checkpoints" / "0003", seed=55)  # replaced by ART's copy: rmtree + copytree
    fork(backend_cls(str(tmp_path / "art")), not_after_step=5)
    assert marker_of(dest)["step"] == 3


def test_step_zero_names_the_source_checkpoint(tmp_path: Path, backend_cls: type[StandInBackend]) -> None:
    source, dest = make_runs(tmp_path / "art", source_steps=(0, 4))
    fork(backend_cls(str(tmp_path / "art")), not_after_step=2)
    request = marker_of(dest)
    assert request == {
        "kind": "source",
        "source": str(source / "checkpoints" / "0000"),
        "request_id": request["request_id"],
    }


def test_failed_fork_writes_nothing_and_raises_arts_error(tmp_path: Path, backend_cls: type[StandInBackend]) -> None:
    _, dest = make_runs(tmp_path / "art")
    backend = backend_cls(str(tmp_path / "art"))
    backend.fail = FileNotFoundError("No checkpoints found for model base in project p")
    with pytest.raises(FileNotFoundError, match="No checkpoints found"):
        fork(backend)
    assert not (dest / ".fork").exists()


def test_autofork_off(tmp_path: Path, backend_cls: type[StandInBackend], monkeypatch: pytest.MonkeyPatch) -> None:
    _, dest = make_runs(tmp_path / "art")
    monkeypatch.setenv("FORK_SIDECAR_ART_AUTOFORK", "0")
    fork(backend_cls(str(tmp_path / "art")))
    assert (dest / "checkpoints" / "0007").is_dir() and not (dest / ".fork").exists()


def test_preload_off_leaves_the_class_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORK_SIDECAR_PRELOAD", "0")
    cls = type("LocalBackend", (StandInBackend,), {})
    module = ModuleType("art.local.backend")
    module.LocalBackend = cls  # type: ignore[attr-defined]
    art_fork.on_art_local_backend(module)
    assert "_experimental_fork_checkpoint" not in cls.__dict__


def test_patching_is_idempotent_and_keeps_the_signature(backend_cls: type[StandInBackend]) -> None:
    import inspect

    method = backend_cls.__dict__["_experimental_fork_checkpoint"]
    assert art_fork.patch_backend_class(backend_cls)
    assert backend_cls.__dict__["_experimental_fork_checkpoint"] is method
    assert "_experimental_fork_checkpoint" not in StandInBackend.__dict__ or not getattr(
        StandInBackend.__dict__["_experimental_fork_checkpoint"], "__fork_sidecar_autofork__", False
    )
    assert inspect.iscoroutinefunction(method)
    assert list(inspect.signature(method).parameters)[:3] == ["self", "model", "from_model"]


def test_an_unknown_shape_is_left_alone() -> None:
    class Sync:
        def _experimental_fork_checkpoint(self, model: Any) -> None:
            pass

    assert not art_fork.patch_backend_class(Sync)
    assert art_fork.patch_backend_class(type("NoMethod", (), {})) is False


def test_a_marker_that_cannot_be_written_is_logged_not_raised(
    tmp_path: Path, backend_cls: type[StandInBackend], caplog: pytest.LogCaptureFixture
) -> None:
    _, dest = make_runs(tmp_path / "art")
    (dest / ".fork" / "someone's").mkdir(parents=True)  # a directory in the marker's place: the rename fails
    fork(backend_cls(str(tmp_path / "art")))  # ART's fork succeeded; the training script goes on
    assert (dest / "checkpoints" / "0007").is_dir()
    assert "the .fork marker could not be written" in caplog.text
    assert sorted(p.name for p in dest.iterdir() if p.name.startswith(".fork")) == [".fork"]


# --- the real openpipe-art 0.5.18 -------------------------------------------------------------------------------------
REAL_ART_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    import sidecar.preload.bootstrap  # arms hook_table.POST_IMPORT_HOOKS, as the installed .pth does
    from sidecar.preload import hooks
    from sidecar.preload.bootstrap import _lazy_target

    target = "sidecar.preload.art_fork:on_art_local_backend"
    hooks.when_imported("art.local.backend", _lazy_target(target), key=target)  # ignored if the table has it
    import art
    from art.local.backend import LocalBackend

    assert getattr(LocalBackend._experimental_fork_checkpoint, "__fork_sidecar_autofork__", False), "not patched"
    backend = LocalBackend(path=sys.argv[1])
    model = art.Model(name="child", project="p")
    not_after = None if sys.argv[2] == "-" else int(sys.argv[2])
    asyncio.run(backend._experimental_fork_checkpoint(model, from_model="base", not_after_step=not_after))
    print("forked", sys.argv[2])
    """
)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_real_art_local_backend_fork_writes_the_marker(tmp_path: Path) -> None:
    python = ART_VENV / "bin" / "python"
    if not (ART_VENV / ".installed").exists():
        pytest.skip(f"{ART_VENV} is not built; run tests/support/make_art_venv.sh (openpipe-art 0.5.18)")
    art = tmp_path / "art"
    source, dest = make_runs(art)
    script = tmp_path / "fork_with_art.py"
    script.write_text(REAL_ART_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("FORK_SIDECAR_ART_AUTOFORK", None)
    for not_after, step in (("-", 7), ("5", 3)):
        done = subprocess.run(
            [str(python), str(script), str(art), not_after], env=env, capture_output=True, text=True, timeout=240
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert f"wrote {dest / '.fork'}" in done.stderr
        assert marker_of(dest)["step"] == step
        assert (dest / "checkpoints" / f"{step:04d}" / "adapter_model.safetensors").read_bytes() == (
            source / "checkpoints" / f"{step:04d}" / "adapter_model.safetensors"
        ).read_bytes()
        (dest / ".fork").unlink()
