"""Layouts: the ART run layout (sidecar/layout.py: run discovery, step dirs, latest step), and the layout of this
code itself: every module of `sidecar/` has a test module named after it (or one named in COVERED_BY, which says
where its tests are), and no module is over MAX_MODULE_LINES lines."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

from sidecar.layout import RunDir, checkpoint_dir, iter_run_dirs, latest_step, run_dir_of, step_dirs


def make_steps(checkpoints: Path, *names: str) -> None:
    for name in names:
        (checkpoints / name).mkdir(parents=True)


def test_iter_run_dirs_finds_models_and_skips_hidden_and_files(tmp_path: Path) -> None:
    for p in ("p1/models/a", "p1/models/b", "p2/models/c", "p2/models/.hidden", "p3/other/x"):
        (tmp_path / p).mkdir(parents=True)
    (tmp_path / "p2/models/file").write_text("")
    os.symlink(tmp_path / "p1/models/a", tmp_path / "p2/models/link")
    assert [str(r) for r in iter_run_dirs(tmp_path)] == ["p1/a", "p1/b", "p2/c"]


def test_steps_are_all_digit_dirs_only(tmp_path: Path) -> None:
    cp = tmp_path / "checkpoints"
    make_steps(cp, "0000", "0003", "0010", ".fork-stage-x", "0005-tmp", "10000")
    (cp / "0007").write_text("not a dir")
    assert sorted(step_dirs(cp)) == [0, 3, 10, 10000]
    assert latest_step(cp) == 10000
    assert latest_step(cp, not_after=9) == 3
    assert latest_step(cp, not_after=0) is None
    assert latest_step(cp, not_after=0, exclude_served=False) == 0
    assert latest_step(tmp_path / "missing") is None


def test_checkpoint_dir_pads_like_art(tmp_path: Path) -> None:
    assert checkpoint_dir(tmp_path, 5).name == "0005"
    assert checkpoint_dir(tmp_path, 12345).name == "12345"


def test_run_dir_of(tmp_path: Path) -> None:
    run = run_dir_of(tmp_path / "proj/models/m", (tmp_path / "other", tmp_path))
    assert run == RunDir(tmp_path, "proj", "m")
    assert run is not None and run.path == tmp_path / "proj/models/m"
    assert run_dir_of(tmp_path / "proj/m", (tmp_path,)) is None
    assert run_dir_of(tmp_path / "proj/models/m/checkpoints", (tmp_path,)) is None


# --- the layout of the code -------------------------------------------------------------------------------------
REPO = Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = 600

# Modules whose tests do not carry their name: where they are tested instead. A new module goes here only with the
# test module that really exercises it.
COVERED_BY = {
    "sidecar/__main__.py": "tests/test_daemon.py",  # `python -m sidecar` is how every daemon test starts it
    "sidecar/protocol/pool_work.py": "tests/test_worker_threads.py",  # the kept pools and the work shared on them
    "sidecar/protocol/hasher.py": "tests/test_digest_library.py",  # finding blake3, in real venvs (and test_digest)
    "sidecar/cli.py": "tests/test_daemon.py",
    "sidecar/checks/__init__.py": "tests/test_doctor.py",
    "sidecar/checks/dirs.py": "tests/test_doctor.py",
    "sidecar/checks/findings.py": "tests/test_doctor.py",
    "sidecar/checks/host.py": "tests/test_doctor.py",
    "sidecar/checks/trainers.py": "tests/test_doctor.py",
    "sidecar/checks/vllm.py": "tests/test_doctor.py",
    "sidecar/claims/__init__.py": "tests/test_claims_filesystem.py",
    "sidecar/claims/base.py": "tests/test_claims_filesystem.py",
    "sidecar/claims/etcd.py": "tests/test_etcd_coordination.py",
    "sidecar/claims/etcd_client.py": "tests/test_etcd_coordination.py",
    "sidecar/claims/etcd_serves.py": "tests/test_etcd_fanout.py",
    "sidecar/claims/etcd_health.py": "tests/test_etcd_coordination.py",
    "sidecar/claims/etcd_keys.py": "tests/test_etcd_coordination.py",
    "sidecar/claims/etcd_watch.py": "tests/test_etcd_fanout.py",
    "sidecar/fanout.py": "tests/test_etcd_fanout.py",
    "sidecar/fork_steps.py": "tests/test_daemon.py",  # the steps run in the daemon each fork test starts
    "sidecar/fsops.py": "tests/test_swap.py",
    "sidecar/owner_worker.py": "tests/reliability/test_tenants.py",
    "sidecar/pipeline.py": "tests/test_pipeline_claims.py",
    "sidecar/run_io.py": "tests/reliability/test_tenants.py",
    "sidecar/rundir.py": "tests/reliability/test_tenant_binding.py",
    "sidecar/sdnotify.py": "tests/test_systemd_unit.py",
    "sidecar/stages.py": "tests/test_trainers.py",
    "sidecar/preload/__init__.py": "tests/test_agent.py",
    "sidecar/preload/art_compat.py": "tests/test_preload_install.py",
    "sidecar/preload/art_probe.py": "tests/test_preload_install.py",
    "sidecar/preload/bootstrap.py": "tests/test_preload_install.py",
    "sidecar/preload/hook_table.py": "tests/test_hooks.py",
    "sidecar/preload/preload_cli.py": "tests/test_preload_install.py",
    "sidecar/preload/probe.py": "tests/test_preload_install.py",
    "sidecar/preload/step_gate.py": "tests/test_agent.py",
    "sidecar/preload/rollback.py": "tests/test_peft_load.py",
    "sidecar/preload/checkpoint_read.py": "tests/test_peft_load.py",
    "sidecar/preload/agent_replies.py": "tests/test_agent.py",
    "sidecar/preload/rank_join.py": "tests/test_ranks.py",  # DDP's Join needs a real multi-rank job
    "sidecar/preload/rank_exit.py": "tests/test_rank_agreement.py",  # drained by the agreement, on a real group
}


def sidecar_modules() -> list[str]:
    return sorted(p.relative_to(REPO).as_posix() for p in (REPO / "sidecar").rglob("*.py"))


def all_test_modules() -> list[str]:
    return sorted(p.relative_to(REPO).as_posix() for p in (REPO / "tests").rglob("test_*.py"))


def mirrors(module: str) -> list[str]:
    """The test module names that count as `module`'s: test_<name>, test_<package>_<name>, test_<package>."""
    parts = Path(module).with_suffix("").parts[1:]  # without "sidecar"
    if parts[-1] == "__init__":
        parts = parts[:-1]
    names = {f"test_{'_'.join(parts)}.py", f"test_{parts[-1]}.py"} if parts else set()
    if len(parts) > 1:
        names.add(f"test_{parts[0]}.py")  # the package's test module covers its modules
    return sorted(names)


def test_every_module_has_a_test_module_named_after_it() -> None:
    tests = {Path(t).name for t in all_test_modules()}
    missing = [
        m
        for m in sidecar_modules()
        if m != "sidecar/__init__.py" and m not in COVERED_BY and not tests.intersection(mirrors(m))
    ]
    assert missing == [], f"modules without a test module ({' or '.join(['tests/test_<name>.py', 'COVERED_BY'])})"


def test_covered_by_names_real_modules_and_tests() -> None:
    modules, tests = set(sidecar_modules()), set(all_test_modules())
    assert [m for m in COVERED_BY if m not in modules] == []
    assert [t for t in COVERED_BY.values() if t not in tests] == []


# Over the limit and not split yet, each with why: the list may only shrink (the test below fails for an entry that
# is back under the limit, so it is removed then).
OVER_THE_LIMIT: dict[str, str] = {}


def test_no_module_is_over_the_line_limit() -> None:
    long = {m: n for m in sidecar_modules() if (n := len((REPO / m).read_text().splitlines())) > MAX_MODULE_LINES}
    unlisted = {m: n for m, n in long.items() if m not in OVER_THE_LIMIT}
    assert unlisted == {}, f"split these along their concerns (not by line count): {unlisted}"
    assert sorted(m for m in OVER_THE_LIMIT if m not in long) == [], "under the limit now: remove from OVER_THE_LIMIT"


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        ("sidecar/watch/tree.py", ["test_tree.py", "test_watch.py", "test_watch_tree.py"]),
        ("sidecar/vllm/__init__.py", ["test_vllm.py"]),
        ("sidecar/journal.py", ["test_journal.py"]),
    ],
)
def test_the_mirror_rule(module: str, expected: list[str]) -> None:
    assert mirrors(module) == expected


# --- tests import helpers from tests/support/, never from another test module --------------------------------------
def imported_test_modules(source: str) -> list[str]:
    """The test modules (`test_*`) that `source` imports, however it spells the import."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[-1].startswith("test_")]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[-1].startswith("test_"):
                found.append(node.module)
            found += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("test_")]
    return found


def test_no_test_module_imports_another() -> None:
    """Shared helpers live in tests/support/: a test module imported by another runs its tests' imports and
    fixtures twice and hides what is shared. Scripts written out for a subprocess count too."""
    offenders = {}
    for path in sorted((REPO / "tests").rglob("*.py")):
        text = path.read_text()
        imported = imported_test_modules(text)
        imported += [line.strip() for line in text.splitlines() if "from tests." in line and ".test_" in line]
        if imported:
            offenders[path.relative_to(REPO).as_posix()] = imported
    offenders.pop("tests/test_layout.py", None)  # this file's own examples below
    assert offenders == {}, f"move what these import into tests/support/: {offenders}"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from tests.test_swap import fuse_without_exchange", ["tests.test_swap"]),
        ("from tests.reliability.test_tenants import alice", ["tests.reliability.test_tenants"]),
        ("import tests.test_vllm as tv", ["tests.test_vllm"]),
        ("from tests import test_vllm", ["tests.test_vllm"]),
        ("from tests.support.mounts import mounted", []),
    ],
)
def test_the_import_rule(source: str, expected: list[str]) -> None:
    assert imported_test_modules(source) == expected
