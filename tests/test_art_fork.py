"""Zero-touch ART forks: the marker written after `LocalBackend._experimental_fork_checkpoint` returns.

Two ways: a stand-in class here with ART's signature and behaviour (pick the newest step not after `not_after_step`
from the source run, copy it into the destination run, stored under `model.name` as in 0.5.18 or `run_name` as in
0.5.23), for the cases the real one cannot be made to produce on demand (another writer during the call, an ART that
stores runs somewhere new); and the real `art.local.backend.LocalBackend` of each supported openpipe-art in its own
venv (tests/support/art_venvs.py), whose fork is a plain file copy that runs on CPU, driven through the real
post-import hook machinery in a subprocess - for 0.5.23 with the real daemon doing the fork.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
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
from tests.support.art_venvs import ART_VERSIONS, art_python
from tests.support.daemon import DaemonProcess, wait_outcome, write_config

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Model:
    """openpipe-art 0.5.18's Model as the fork reads it: stored under `models/{name}`."""

    name: str
    project: str


@dataclass
class TrainableModel(Model):
    """openpipe-art 0.5.23's TrainableModel: stored under `models/{run_name}`, whatever its `name`."""

    run_name: str = ""

    def _storage_name(self) -> str:
        return self.run_name


def storage_name(model: Model) -> str:
    return model._storage_name() if isinstance(model, TrainableModel) else model.name


class StandInBackend:
    """ART's LocalBackend reduced to `_path` and the fork method (same signature, same effect, 0.5.18 and 0.5.23)."""

    def __init__(self, path: str) -> None:
        self._path = path
        self.fail: Exception | None = None
        self.also: Any = None  # something else that happens during the call (another writer)

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
        dest = Path(self._path) / model.project / "models" / self.stored_as(model) / "checkpoints" / f"{step:04d}"
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(source / f"{step:04d}", dest)
        if self.also is not None:
            self.also(dest)

    def stored_as(self, model: Model) -> str:
        return storage_name(model)


def make_runs(art: Path, source_steps: tuple[int, ...] = (0, 3, 7)) -> tuple[Path, Path]:
    source = art / "p" / "models" / "base"
    for step in source_steps:
        write_adapter(source / "checkpoints" / f"{step:04d}", seed=step + 1)
    dest = art / "p" / "models" / "child"
    write_adapter(dest / "checkpoints" / "0000", seed=100)
    return source, dest


def tree(root: Path) -> dict[str, str]:
    """Every entry under `root` (dotfiles included) -> its bytes' sha256, or "dir": what "untouched" compares."""
    out = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        out[key] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture
def backend_cls() -> type[StandInBackend]:
    cls = type("LocalBackend", (StandInBackend,), {})  # a fresh class per test: patching is in place
    module = ModuleType("art.local.backend")
    module.LocalBackend = cls  # type: ignore[attr-defined]
    art_fork.on_art_local_backend(module)
    return cls


def fork(backend: StandInBackend, model: Model | None = None, **kwargs: Any) -> None:
    asyncio.run(backend._experimental_fork_checkpoint(model or Model("child", "p"), "base", **kwargs))


def marker_of(dest: Path) -> dict[str, Any]:
    return parse_marker((dest / ".fork").read_bytes(), dest / ".fork").to_json()


def markers(art: Path) -> list[Path]:
    return sorted(art.glob("*/models/*/.fork*"))


def test_a_fork_marks_the_copied_checkpoint_by_its_path(tmp_path: Path, backend_cls: type[StandInBackend]) -> None:
    _, dest = make_runs(tmp_path / "art")
    fork(backend_cls(str(tmp_path / "art")))
    request = marker_of(dest)
    assert request["kind"] == "source" and request["source"] == str(dest / "checkpoints" / "0007")
    assert request["request_id"].startswith("art-")
    assert [p.name for p in dest.iterdir() if p.name.startswith(".fork")] == [".fork"]  # no temp left behind
    resolved = resolve_source(
        parse_marker((dest / ".fork").read_bytes(), dest), RunDir(tmp_path / "art", "p", "child"), (tmp_path / "art",)
    )
    assert resolved == dest / "checkpoints" / "0007"


def test_the_marker_goes_to_the_run_art_stores_not_to_the_models_name(
    tmp_path: Path, backend_cls: type[StandInBackend]
) -> None:
    # ART 0.5.23 stores TrainableModel(name="agent", run_name="child3") under models/child3. An older, unrelated
    # run called "agent" (with a step 7 of its own) must stay exactly as it was: a marker there would fork it.
    art = tmp_path / "art"
    make_runs(art)
    agent = art / "p" / "models" / "agent"
    for step, seed in ((0, 50), (7, 51)):
        write_adapter(agent / "checkpoints" / f"{step:04d}", seed=seed)
    before = tree(agent)
    fork(backend_cls(str(art)), TrainableModel("agent", "p", run_name="child3"))
    child3 = art / "p" / "models" / "child3"
    assert marker_of(child3)["source"] == str(child3 / "checkpoints" / "0007")
    assert tree(agent) == before
    assert markers(art) == [child3 / ".fork"]


def test_a_run_name_alone_is_enough(tmp_path: Path, backend_cls: type[StandInBackend]) -> None:
    art = tmp_path / "art"
    make_runs(art)
    fork(backend_cls(str(art)), TrainableModel("child2-serve", "p", run_name="child2"))
    child2 = art / "p" / "models" / "child2"
    assert marker_of(child2)["source"] == str(child2 / "checkpoints" / "0007")
    assert markers(art) == [child2 / ".fork"]


def test_not_after_step_and_a_step_the_destination_already_had(
    tmp_path: Path, backend_cls: type[StandInBackend]
) -> None:
    _, dest = make_runs(tmp_path / "art")
    write_adapter(dest / "checkpoints" / "0003", seed=55)  # replaced by ART's copy: rmtree + copytree
    fork(backend_cls(str(tmp_path / "art")), not_after_step=5)
    assert marker_of(dest)["source"] == str(dest / "checkpoints" / "0003")


def test_step_zero_names_the_source_checkpoint(tmp_path: Path, backend_cls: type[StandInBackend]) -> None:
    source, dest = make_runs(tmp_path / "art", source_steps=(0, 4))
    fork(backend_cls(str(tmp_path / "art")), not_after_step=2)
    request = marker_of(dest)
    assert request == {
        "kind": "source",
        "source": str(source / "checkpoints" / "0000"),
        "request_id": request["request_id"],
    }


def test_a_copy_that_lands_elsewhere_writes_nothing_and_says_what_to_run(
    tmp_path: Path, backend_cls: type[StandInBackend], caplog: pytest.LogCaptureFixture
) -> None:
    # An ART whose storage rule we do not know: the copy is not where ART's helpers say, so nothing is guessed.
    art = tmp_path / "art"
    make_runs(art)
    backend = backend_cls(str(art))
    backend.stored_as = lambda model: f"{model.name}-v2"  # type: ignore[method-assign]
    fork(backend, TrainableModel("agent", "p", run_name="child3"))
    assert (art / "p" / "models" / "agent-v2" / "checkpoints" / "0007").is_dir()
    assert markers(art) == []
    assert "no .fork marker was written" in caplog.text
    assert "run `fork-sidecar fork MODEL_DIR --step 7`" in caplog.text


def test_another_new_step_during_the_call_writes_nothing(
    tmp_path: Path, backend_cls: type[StandInBackend], caplog: pytest.LogCaptureFixture
) -> None:
    _, dest = make_runs(tmp_path / "art")
    backend = backend_cls(str(tmp_path / "art"))
    backend.also = lambda step_dir: write_adapter(step_dir.parent / "0008", seed=9)  # a trainer saving meanwhile
    fork(backend)
    assert not (dest / ".fork").exists()
    assert "new: 0007, 0008" in caplog.text and "fork-sidecar fork" in caplog.text


def test_a_step_dir_without_the_source_files_writes_nothing(
    tmp_path: Path, backend_cls: type[StandInBackend], caplog: pytest.LogCaptureFixture
) -> None:
    _, dest = make_runs(tmp_path / "art")
    backend = backend_cls(str(tmp_path / "art"))
    backend.also = lambda step_dir: (step_dir / "extra.bin").write_bytes(b"x")
    fork(backend)
    assert not (dest / ".fork").exists()
    assert "does not hold the files of" in caplog.text


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
    assert f"run `fork-sidecar fork {dest} --source {dest / 'checkpoints' / '0007'}`" in caplog.text
    assert sorted(p.name for p in dest.iterdir() if p.name.startswith(".fork")) == [".fork"]


# --- the real openpipe-art, each supported version in its own venv -----------------------------------------------
# Runs ART's own LocalBackend._experimental_fork_checkpoint (a plain file copy, fine on CPU) with the preload armed
# through the real post-import hook machinery. argv: art path, then a JSON list of calls
# {"name", "run_name" (None: a 0.5.18-style art.Model), "not_after", "consume"}; prints one JSON line per call.
REAL_ART_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, os, sys
    import sidecar.preload.bootstrap  # arms hook_table.POST_IMPORT_HOOKS, as the installed .pth does
    from sidecar.preload import hooks
    from sidecar.preload.bootstrap import _lazy_target

    target = "sidecar.preload.art_fork:on_art_local_backend"
    hooks.when_imported("art.local.backend", _lazy_target(target), key=target)  # ignored if the table has it
    import art
    from art.local.backend import LocalBackend

    assert getattr(LocalBackend._experimental_fork_checkpoint, "__fork_sidecar_autofork__", False), "not patched"
    backend = LocalBackend(path=sys.argv[1])
    for call in json.loads(sys.argv[2]):
        if call["run_name"] is None:
            model = art.Model(name=call["name"], project="p")
        else:
            model = art.TrainableModel(name=call["name"], run_name=call["run_name"], project="p", base_model="base")
        asyncio.run(backend._experimental_fork_checkpoint(model, from_model="base", not_after_step=call["not_after"]))
        stored = model._storage_name() if hasattr(model, "_storage_name") else model.name
        marker = os.path.join(sys.argv[1], "p", "models", stored, ".fork")
        try:
            with open(marker) as f:
                text = f.read()
        except FileNotFoundError:  # not written, or already claimed by a daemon watching the root
            text = None
        if call.get("consume") and text is not None:
            os.unlink(marker)
        print(json.dumps({"stored": stored, "marker": text}), flush=True)
    """
)


def run_real_art(version: str, tmp_path: Path, art: Path, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    python = art_python(version)
    script = tmp_path / "fork_with_art.py"
    script.write_text(REAL_ART_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("FORK_SIDECAR_ART_AUTOFORK", None)
    done = subprocess.run(
        [str(python), str(script), str(art), json.dumps(calls)], env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def parsed(text: str | None, where: Path) -> dict[str, Any]:
    assert text is not None, f"no marker in {where}"
    return parse_marker(text.encode(), where / ".fork").to_json()


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("version", ART_VERSIONS)
def test_real_art_fork_marks_the_copied_checkpoint(version: str, tmp_path: Path) -> None:
    art = tmp_path / "art"
    source, dest = make_runs(art)
    run_name = None if version == "0.5.18" else "child"  # 0.5.18 has no run_name; 0.5.23 requires one
    calls = [{"name": "child", "run_name": run_name, "not_after": n, "consume": True} for n in (None, 5)]
    results = run_real_art(version, tmp_path, art, calls)
    for result, step in zip(results, ("0007", "0003"), strict=True):
        assert parsed(result["marker"], dest)["source"] == str(dest / "checkpoints" / step)
        assert (dest / "checkpoints" / step / "adapter_model.safetensors").read_bytes() == (
            source / "checkpoints" / step / "adapter_model.safetensors"
        ).read_bytes()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_real_art_0523_forks_only_the_run_it_wrote_into(tmp_path: Path) -> None:
    """The issue's report, end to end: ART 0.5.23, the preload's hook, the real daemon. `name="agent"` is also the
    directory of an older, unrelated run; ART writes into `run_name`'s directory, and only that run is forked."""
    art = tmp_path / "art"
    source, _ = make_runs(art)
    agent = art / "p" / "models" / "agent"
    for step, seed in ((0, 50), (7, 51)):
        write_adapter(agent / "checkpoints" / f"{step:04d}", seed=seed)
    runs = {name: art / "p" / "models" / name for name in ("child3", "child2")}
    for run in runs.values():
        write_adapter(run / "checkpoints" / "0000", seed=100)
    before = tree(agent)
    config = write_config(tmp_path / "config.yaml", [art], tmp_path / "state", tmp_path / "run")
    with DaemonProcess(config, tmp_path / "daemon.log"):
        results = run_real_art(
            "0.5.23",
            tmp_path,
            art,
            [
                {"name": "agent", "run_name": "child3", "not_after": None},
                {"name": "child2-serve", "run_name": "child2", "not_after": None},
            ],
        )
        assert [r["stored"] for r in results] == ["child3", "child2"]
        outcomes = {name: wait_outcome(run, timeout=60) for name, run in runs.items()}
    forked = source / "checkpoints" / "0007" / "adapter_model.safetensors"
    for name, run in runs.items():
        assert outcomes[name]["status"] == "done", outcomes[name]
        assert outcomes[name]["source"] == str(run / "checkpoints" / "0007")
        assert (run / "checkpoints" / "0000" / "adapter_model.safetensors").read_bytes() == forked.read_bytes()
    assert tree(agent) == before  # byte for byte, and no marker or outcome file either
