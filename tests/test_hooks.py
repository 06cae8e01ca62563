"""Post-import hooks (sidecar.preload.hooks) and the bootstrap that arms them.

In-process tests import throwaway packages with unique names from a temp dir (the finder keeps its registry for the
whole pytest process, so names are never reused); the bootstrap is exercised in real child interpreters, because
arming it here would arm the real hook table inside the test runner.
"""

from __future__ import annotations

import importlib
import itertools
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from sidecar.preload import hooks
from sidecar.preload.hook_table import POST_IMPORT_HOOKS

REPO = Path(__file__).resolve().parents[1]
_counter = itertools.count()


@pytest.fixture
def package_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory on sys.path for throwaway packages; their modules are dropped from sys.modules afterwards."""
    sys.path.insert(0, str(tmp_path))
    before = set(sys.modules)
    try:
        yield tmp_path
    finally:
        sys.path.remove(str(tmp_path))
        for name in set(sys.modules) - before:
            del sys.modules[name]


def make_package(root: Path, body: str = "VALUE = 41\n") -> str:
    """Write package `pkgN` with submodule `watched` (executing `body`); return the submodule's dotted name."""
    name = f"sidecar_hooks_pkg{next(_counter)}_{os.getpid()}"
    (root / name).mkdir()
    (root / name / "__init__.py").write_text("")
    (root / name / "watched.py").write_text(body)
    importlib.invalidate_caches()
    return f"{name}.watched"


def test_callback_runs_once_right_after_the_module_executes(package_dir: Path) -> None:
    module_name = make_package(package_dir)
    seen: list[tuple[ModuleType, int]] = []
    hooks.when_imported(module_name, lambda module: seen.append((module, module.VALUE)))
    assert seen == []
    module = importlib.import_module(module_name)
    assert seen == [(module, 41)]
    importlib.import_module(module_name)
    assert len(seen) == 1


def test_the_module_keeps_its_real_loader(package_dir: Path) -> None:
    # What the module body itself sees matters too: importlib.resources and inspect read __spec__.loader.
    body = "SEEN = (type(__loader__).__name__, type(__spec__.loader).__name__, __loader__.get_source(__name__))\n"
    module_name = make_package(package_dir, body)
    hooks.when_imported(module_name, lambda module: None)
    module = importlib.import_module(module_name)
    seen_in_body = module.SEEN
    assert seen_in_body == ("SourceFileLoader", "SourceFileLoader", body)
    assert type(module.__loader__).__name__ == "SourceFileLoader"
    assert module.__spec__ is not None and module.__spec__.loader is module.__loader__


def test_an_imported_module_gets_the_callback_at_once(package_dir: Path) -> None:
    module_name = make_package(package_dir)
    module = importlib.import_module(module_name)
    seen: list[ModuleType] = []
    hooks.when_imported(module_name, seen.append)
    assert seen == [module]


def test_a_key_registers_once(package_dir: Path) -> None:
    module_name = make_package(package_dir)
    seen: list[str] = []
    hooks.when_imported(module_name, lambda module: seen.append("first"), key="same")
    hooks.when_imported(module_name, lambda module: seen.append("second"), key="same")
    importlib.import_module(module_name)
    assert seen == ["first"]
    assert hooks.watched_modules()[module_name] == ["same"]


def test_a_fresh_import_of_the_module_runs_the_callback_again(package_dir: Path) -> None:
    module_name = make_package(package_dir)
    seen: list[ModuleType] = []
    hooks.when_imported(module_name, seen.append)
    first = importlib.import_module(module_name)
    del sys.modules[module_name]
    second = importlib.import_module(module_name)
    assert seen == [first, second] and first is not second


def test_a_failing_callback_is_logged_once_and_never_breaks_the_import(
    package_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    module_name = make_package(package_dir)
    after: list[ModuleType] = []

    def broken(module: ModuleType) -> None:
        raise ValueError("hook bug")

    hooks.when_imported(module_name, broken, key="broken")
    hooks.when_imported(module_name, after.append, key="after")
    with caplog.at_level(logging.WARNING, logger=hooks.LOGGER_NAME):
        module = importlib.import_module(module_name)
        del sys.modules[module_name]
        importlib.import_module(module_name)
    assert module.VALUE == 41
    assert len(after) == 2  # the next callback still ran, both times
    failures = [record for record in caplog.records if "broken" in record.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info is not None


def test_a_module_that_fails_to_import_gets_no_callback(package_dir: Path) -> None:
    module_name = make_package(package_dir, "raise ImportError('missing dependency')\n")
    seen: list[ModuleType] = []
    hooks.when_imported(module_name, seen.append)
    with pytest.raises(ImportError, match="missing dependency"):
        importlib.import_module(module_name)
    assert seen == []


def test_registered_from_inside_the_modules_own_import_it_runs_once_that_import_ends(package_dir: Path) -> None:
    """The Unsloth case: a hook on `utils` registers one for `fast_lora` while `fast_lora` is importing `utils`."""
    outer = make_package(package_dir, "from . import inner\nDONE = True\n")
    package = outer.split(".")[0]
    (package_dir / package / "inner.py").write_text("VALUE = 1\n")
    (package_dir / package / "later.py").write_text("")
    seen: list[bool] = []

    def on_inner(module: ModuleType) -> None:
        hooks.when_imported(outer, lambda module: seen.append(module.DONE))
        assert seen == []  # `outer` is still executing: not yet

    hooks.when_imported(f"{package}.inner", on_inner)
    importlib.import_module(outer)
    assert seen == []
    importlib.import_module(f"{package}.later")  # any later import notices `outer` has finished
    assert seen == [True]
    importlib.import_module(f"{package}.later")
    assert seen == [True]


def test_one_finder_per_process_even_after_a_reload(package_dir: Path) -> None:
    module_name = make_package(package_dir)
    hooks.when_imported(module_name, lambda module: None, key="before-reload")
    reloaded = importlib.reload(hooks)
    reloaded.when_imported(module_name, lambda module: None, key="after-reload")
    finders = [finder for finder in sys.meta_path if getattr(finder, "fork_sidecar_post_import_finder", False)]
    assert len(finders) == 1
    assert reloaded.watched_modules()[module_name] == ["before-reload", "after-reload"]


def run_child(code: str, tmp_path: Path, **env: str) -> dict[str, object]:
    """Run `code` in a fresh interpreter that can import the repo's `sidecar`; it prints one JSON line."""
    environ = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{tmp_path}", **env}
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=environ,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    result["stderr"] = done.stderr
    return result


CHILD_STATE = """
import importlib, json, sys
from sidecar.preload import hooks
finders = [f for f in sys.meta_path if getattr(f, "fork_sidecar_post_import_finder", False)]
print(json.dumps({
    "finders": len(finders),
    "watched": hooks.watched_modules() if finders else {},
    "loaded": sorted(m for m in sys.modules if m.startswith(("sidecar", "torch", "unsloth", "art"))),
}))
"""


def test_bootstrap_arms_every_table_entry_lazily_and_twice_is_once(tmp_path: Path) -> None:
    code = "import importlib, sidecar.preload.bootstrap as b; importlib.reload(b); b.arm()\n" + CHILD_STATE
    state = run_child(code, tmp_path)
    assert state["finders"] == 1
    assert state["watched"] == {module: [target] for module, target in POST_IMPORT_HOOKS.items()}
    # Arming imports none of the hook targets, and nothing heavy.
    assert {"sidecar.preload.dtype_patch", "sidecar.preload.art", "torch"}.isdisjoint(state["loaded"])  # type: ignore[arg-type]


def test_bootstrap_does_nothing_when_disabled(tmp_path: Path) -> None:
    code = "import sidecar.preload.bootstrap as b; assert b.arm() is False\n" + CHILD_STATE
    state = run_child(code, tmp_path, FORK_SIDECAR_PRELOAD="0")
    assert state["finders"] == 0


def test_a_table_target_that_cannot_be_imported_is_logged_once(tmp_path: Path) -> None:
    (tmp_path / "watched_by_test.py").write_text("VALUE = 1\n")
    code = (
        "import sys, sidecar.preload.bootstrap as b\n"
        "from sidecar.preload import hooks\n"
        "hooks.when_imported('watched_by_test', b._lazy_target('no_such_module:hook'), key='no_such_module:hook')\n"
        "import watched_by_test\n"
        "del sys.modules['watched_by_test']\n"
        "import watched_by_test\n"
        "assert watched_by_test.VALUE == 1\n" + CHILD_STATE
    )
    state = run_child(code, tmp_path)
    stderr = str(state["stderr"])
    assert stderr.count("post-import hook no_such_module:hook for watched_by_test failed") == 1
    assert "ModuleNotFoundError" in stderr
