"""`fork-sidecar preload install|uninstall|status` against real throwaway venvs, and the preload at work in them.

Every test makes a real venv (`python -m venv --without-pip`, ~0.1 s) and drives the CLI in a subprocess. The `slow`
ones give that venv the dev venv's packages (torch) through a plain path `.pth` line, which does not run the dev
venv's own `.pth` files, so `sidecar` there comes only from the installed preload, plus the Unsloth stand-in
(tests/support/fake_unsloth), and then check that the `.pth` alone makes the crash go away: in the process, in
multiprocessing spawn/forkserver children and in torchrun workers.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from sidecar import __version__
from sidecar.preload import install as preload_install
from tests.support.art_venvs import ART_VERSIONS, art_python
from tests.support.venvs import make_venv

REPO = Path(__file__).resolve().parents[1]
FAKE = REPO / "tests" / "support" / "fake_unsloth"
MISMATCH = "must have the same dtype"


def cli(*args: str, env: dict[str, str] | None = None, user: str | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "sidecar.preload.preload_cli", *args]
    if user is not None:
        account = pwd.getpwnam(user)
        command = ["setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}", "--clear-groups", *command]
    environ = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, env=environ, cwd="/", timeout=120, check=False)


def files_under(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def run_python(python: Path, code: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return subprocess.run(
        [python, "-c", code], capture_output=True, text=True, env={**environ, **env}, cwd=cwd, timeout=300, check=False
    )


def test_install_then_uninstall_leaves_site_packages_as_it_was(tmp_path: Path) -> None:
    python, purelib = make_venv(tmp_path / "venv")
    before = files_under(purelib)
    done = cli("install", "--python", str(python))
    assert done.returncode == 0, done.stderr
    pth, private = purelib / preload_install.PTH_NAME, purelib / preload_install.PRIVATE_DIR
    assert pth.read_text() == preload_install.pth_line(private)
    manifest = json.loads((private / "manifest.json").read_text())
    assert manifest["version"] == __version__
    assert "sidecar/preload/bootstrap.py" in manifest["files"] and "sidecar/__init__.py" in manifest["files"]
    library = set(manifest["library_files"])  # blake3, which this venv lacks (tests/test_digest_library.py)
    assert "_lib/blake3/__init__.py" in library
    for name in set(manifest["files"]) - library:  # copies, but for the copy's own package __init__
        assert name == "sidecar/__init__.py" or (private / name).read_bytes() == (REPO / name).read_bytes()
    assert list((private / "sidecar" / "preload" / "__pycache__").glob("bootstrap.*.pyc"))  # compiled at install
    state = json.loads(cli("status", "--python", str(python), "--json").stdout)
    assert state["installed"] is True and state["up_to_date"] is True and state["installed_version"] == __version__
    # The interpreter now starts with the hooks armed and nothing else loaded.
    code = "import sys; print(sorted(m for m in sys.modules if m.startswith('sidecar')))"
    loaded = run_python(python, code, tmp_path)
    assert loaded.returncode == 0 and loaded.stderr == ""
    expected = ["sidecar", "sidecar.preload", "sidecar.preload.bootstrap", "sidecar.preload.hook_table"]
    assert eval(loaded.stdout) == sorted([*expected, "sidecar.preload.hooks"])
    assert run_python(python, code, tmp_path, FORK_SIDECAR_PRELOAD="0").stdout.strip() == "[]"

    done = cli("uninstall", "--python", str(python))
    assert done.returncode == 0, done.stderr
    assert files_under(purelib) == before
    assert not private.exists()
    assert cli("uninstall", "--python", str(python)).stdout.strip() == "preload was not installed there"


def test_reinstall_replaces_the_copy_and_status_tells_an_outdated_one(tmp_path: Path) -> None:
    python, purelib = make_venv(tmp_path / "venv")
    assert cli("install", "--python", str(python)).returncode == 0
    manifest_path = purelib / preload_install.PRIVATE_DIR / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["version"] = "0.0.1"
    manifest_path.write_text(json.dumps(manifest))
    state = json.loads(cli("status", "--python", str(python), "--json").stdout)
    assert state["up_to_date"] is False and "older than this CLI" in state["version_note"]
    done = cli("install", "--python", str(python))
    assert done.returncode == 0 and "replaced 0.0.1" in done.stdout
    assert json.loads(cli("status", "--python", str(python), "--json").stdout)["up_to_date"] is True


def stub_unsloth(root: Path, version: str) -> Path:
    """Files only (never imported): what status reads without importing Unsloth."""
    kernels = root / "unsloth" / "kernels"
    kernels.mkdir(parents=True)
    (root / "unsloth" / "__init__.py").write_text("raise ImportError('status must not import unsloth')\n")
    (kernels / "utils.py").write_text("def matmul_lora(X): pass\ndef fast_linear_forward(proj, X): pass\n")
    (kernels / "fast_lora.py").write_text("class LoRA_MLP: pass\nclass LoRA_W: pass\n")
    (root / f"unsloth-{version}.dist-info").mkdir()
    (root / f"unsloth-{version}.dist-info" / "METADATA").write_text(f"Name: unsloth\nVersion: {version}\n")
    return root


@pytest.mark.parametrize(
    ("version", "env", "applies", "note"),
    [
        ("2026.3.3", {}, True, "Unsloth 2026.3.3 (a tested version): matmul_lora, fast_linear_forward, LoRA_MLP"),
        ("2027.1.1", {}, True, "Unsloth 2027.1.1 (an untested version)"),
        ("2026.3.3", {"FORK_SIDECAR_DTYPE_PATCH": "0"}, False, "FORK_SIDECAR_DTYPE_PATCH=0 in this environment"),
        ("2026.3.3", {"FORK_SIDECAR_PRELOAD": "0"}, False, "FORK_SIDECAR_PRELOAD=0 in this environment"),
        (None, {}, False, "Unsloth is not installed there"),
    ],
)
def test_status_says_whether_the_dtype_patch_would_apply(
    tmp_path: Path, version: str | None, env: dict[str, str], applies: bool, note: str
) -> None:
    packages = [stub_unsloth(tmp_path / "unsloth-site", version)] if version else []
    python, _ = make_venv(tmp_path / "venv", *packages)
    assert cli("install", "--python", str(python)).returncode == 0
    done = cli("status", "--python", str(python), "--json", env=env)
    assert done.returncode == 0, done.stderr
    state = json.loads(done.stdout)
    assert state["dtype_patch_applies"] is applies
    assert state["dtype_patch_note"].startswith(note)
    assert state["disabled_here"] is (env.get("FORK_SIDECAR_PRELOAD") == "0")
    assert state["unsloth_version"] == version
    text = cli("status", "--python", str(python), env=env).stdout
    assert f"dtype patch:   {'would apply' if applies else 'would not apply'}: {note}" in text


def test_status_of_an_environment_without_the_preload(tmp_path: Path) -> None:
    python, _ = make_venv(tmp_path / "venv")
    state = json.loads(cli("status", "--python", str(python), "--json").stdout)
    assert state["installed"] is False and state["partial"] is False and state["installed_version"] is None
    assert state["dtype_patch_applies"] is False and state["dtype_patch_note"] == "the preload is not installed there"


def test_a_broken_preload_never_stops_the_interpreter(tmp_path: Path) -> None:
    python, purelib = make_venv(tmp_path / "venv")
    assert cli("install", "--python", str(python)).returncode == 0
    private = purelib / preload_install.PRIVATE_DIR
    # A hook table that cannot be read: the bootstrap logs once and the process goes on.
    (private / "sidecar" / "preload" / "hook_table.py").write_text("POST_IMPORT_HOOKS = None\n")
    done = run_python(python, "print('started')", tmp_path)
    assert done.returncode == 0 and done.stdout == "started\n"
    assert done.stderr.count("fork-sidecar preload: preload disabled: arming failed") == 1
    # A copy that cannot even be imported: the .pth line swallows it silently.
    (private / "sidecar" / "__init__.py").write_text("raise SystemError('broken copy')\n")
    done = run_python(python, "print('started')", tmp_path)
    assert (done.returncode, done.stdout, done.stderr) == (0, "started\n", "")
    shutil.rmtree(private / "sidecar")
    done = run_python(python, "print('started')", tmp_path)
    assert (done.returncode, done.stdout, done.stderr) == (0, "started\n", "")


def test_bad_interpreters_exit_2_with_one_sentence(tmp_path: Path) -> None:
    not_executable = tmp_path / "python"
    not_executable.write_text("")
    cases = {
        str(tmp_path / "missing"): "is not a Python interpreter (no executable file by that name).",
        str(not_executable): "is not a Python interpreter (no executable file by that name).",
        shutil.which("true") or "/bin/true": "is not a Python interpreter (running it with -c did not print",
    }
    for action in ("install", "uninstall", "status"):
        for python, sentence in cases.items():
            done = cli(action, "--python", python)
            assert done.returncode == 2, (action, python)
            assert done.stdout == "" and done.stderr.count("\n") == 1
            assert done.stderr.startswith(f"fork-sidecar preload: {python} {sentence}")


def test_files_someone_else_put_there_are_left_alone(tmp_path: Path) -> None:
    python, purelib = make_venv(tmp_path / "venv")
    foreign = purelib / preload_install.PRIVATE_DIR
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    before = files_under(purelib)
    for action in ("install", "uninstall"):
        done = cli(action, "--python", str(python))
        assert done.returncode == 2 and "was not written by fork-sidecar: move it away" in done.stderr
        assert files_under(purelib) == before


SYSTEM_PYTHON = "/usr/bin/python3"  # one `nobody` may run (the dev interpreter can live under /root)


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None or not os.access(SYSTEM_PYTHON, os.X_OK),
    reason="needs root, setpriv and a system python3 to act as nobody",
)
def test_site_packages_not_writable_says_sudo_or_venv() -> None:
    venv_root = Path(os.environ.get("TMPDIR", "/tmp")) / f"preload-ro-{os.getpid()}"
    try:
        python, purelib = make_venv(venv_root, base=SYSTEM_PYTHON)
        for path in [venv_root, *venv_root.rglob("*")]:
            path.chmod(0o755 if path.is_dir() or os.access(path, os.X_OK) else 0o644)
        before = files_under(purelib)
        done = cli("install", "--python", str(python), user="nobody")
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip() == (
            f"fork-sidecar preload: site-packages {purelib} is not writable: run with sudo or pass a venv's python."
        )
        assert files_under(purelib) == before
    finally:
        shutil.rmtree(venv_root, ignore_errors=True)


# --- the preload at work: a trainer venv with torch and the Unsloth stand-in ------------------------------------

CHECKS = """
import json, sys
import unsloth, fake_unsloth_cases as cases
result = {
    "sidecar": getattr(sys.modules.get("sidecar"), "__file__", None),
    "patched": hasattr(unsloth.models.mistral.fast_linear_forward, "__fork_sidecar_original__"),
    "aliases": cases.check_aliases(),
    "autograd": cases.check_autograd(),
}
"""


@pytest.fixture(scope="module")
def trainer_venv(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    dev_site = Path(sysconfig.get_paths()["purelib"])
    root = tmp_path_factory.mktemp("trainer")
    python, purelib = make_venv(root / "venv", dev_site, FAKE)
    done = cli("install", "--python", str(python))
    assert done.returncode == 0, done.stderr
    return python, purelib


def all_match(results: dict[str, dict[str, Any]]) -> bool:
    return all(
        r["error"] is None
        and r.get("backward_error") is None
        and r["dtype"] == "torch.bfloat16"
        and max(r["rel_err"], r.get("grad_rel_err", 0.0)) <= 1e-2
        for r in results.values()
    )


def all_fail(results: dict[str, dict[str, Any]]) -> bool:
    return all(MISMATCH in (r["error"] or "") for r in results.values())


@pytest.mark.slow
@pytest.mark.trainer
def test_the_pth_alone_fixes_every_alias_and_the_autograd_functions(trainer_venv: tuple[Path, Path]) -> None:
    python, purelib = trainer_venv
    code = CHECKS + "print(json.dumps(result))\n"
    done = run_python(python, code, purelib.parent)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["sidecar"].startswith(str(purelib / preload_install.PRIVATE_DIR))
    assert result["patched"] is True
    assert all_match(result["aliases"]) and all_match(result["autograd"]), result
    assert done.stderr.count("mixed-dtype patch active") == 1 and "Unsloth 0+fake" in done.stderr
    for switch in ("FORK_SIDECAR_PRELOAD", "FORK_SIDECAR_DTYPE_PATCH"):
        done = run_python(python, code, purelib.parent, **{switch: "0"})
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout.strip().splitlines()[-1])
        assert result["patched"] is False and all_fail(result["aliases"]) and all_fail(result["autograd"]), switch
        assert (result["sidecar"] is None) is (switch == "FORK_SIDECAR_PRELOAD")


CHILDREN = """
import json, multiprocessing, os, sys

def check(_=None):
    exec(CHECKS, globals())
    return {key: result[key] for key in ("patched", "aliases", "autograd")}

if __name__ == "__main__":
    outcomes = {}
    for method in ("spawn", "forkserver"):
        with multiprocessing.get_context(method).Pool(1) as pool:
            outcomes[method] = pool.map(check, [0])[0]
    outcomes["parent_imported_unsloth"] = "unsloth" in sys.modules
    print(json.dumps(outcomes))
"""

WORKER = """
import json, os
exec(CHECKS)
path = os.path.join(os.environ["OUT_DIR"], f"rank{os.environ['RANK']}.json")
with open(path, "w") as f:
    json.dump({"patched": result["patched"], "ok": result["aliases"]}, f)
"""


@pytest.mark.slow
@pytest.mark.trainer
def test_spawn_forkserver_children_and_torchrun_workers_are_patched(
    trainer_venv: tuple[Path, Path], tmp_path: Path
) -> None:
    python, _ = trainer_venv
    script = tmp_path / "children.py"
    script.write_text(f"CHECKS = {CHECKS!r}\n" + CHILDREN)
    environ = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    done = subprocess.run(
        [python, str(script)], capture_output=True, text=True, env=environ, cwd=tmp_path, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    outcomes = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcomes.pop("parent_imported_unsloth") is False  # the children armed the preload themselves
    for method, outcome in outcomes.items():
        assert outcome["patched"] is True, method
        assert all_match(outcome["aliases"]) and all_match(outcome["autograd"]), method

    worker = tmp_path / "worker.py"
    worker.write_text(f"CHECKS = {CHECKS!r}\n" + WORKER)
    torchrun = [str(python), "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker)]
    done = subprocess.run(
        torchrun,
        capture_output=True,
        text=True,
        env={**environ, "OUT_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"},
        cwd=tmp_path,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    for rank in (0, 1):
        outcome = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert outcome["patched"] is True and all_match(outcome["ok"]), rank


@pytest.mark.slow
@pytest.mark.trainer
def test_arming_after_unsloth_was_imported_rebinds_the_aliases(trainer_venv: tuple[Path, Path]) -> None:
    """Unsloth imported first (preload off), the bootstrap armed afterwards: hooks run at once and rebind."""
    python, purelib = trainer_venv
    private = purelib / preload_install.PRIVATE_DIR
    code = textwrap.dedent(
        f"""
        import json, os, sys
        import unsloth, fake_unsloth_cases as cases
        before = cases.check_aliases()
        os.environ["FORK_SIDECAR_PRELOAD"] = "1"
        sys.path.append({str(private)!r})
        import sidecar.preload.bootstrap
        print(json.dumps({{"before": before, "after": cases.check_aliases(), "autograd": cases.check_autograd()}}))
        """
    )
    done = run_python(python, code, purelib.parent, FORK_SIDECAR_PRELOAD="0")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert all_fail(result["before"])
    assert all_match(result["after"]) and all_match(result["autograd"])
    assert "Unsloth was imported before the preload armed: 10 by-name aliases rebound" in done.stderr


# --- which openpipe-art is there ----------------------------------------------------------------------------------
ART_FILES = (("local", "backend.py"), ("model.py",), ("unsloth", "service.py"))


def art_as(version: str, root: Path, edits: dict[str, tuple[str, str]] | None = None) -> Path:
    """A venv whose openpipe-art is the real 0.5.23's source (the files the probe reads), claiming `version`, with
    `edits` (file -> (old, new)) applied: what a future or locally changed ART looks like to the probe."""
    real = purelib_of(art_python("0.5.23")) / "art"
    python, purelib = make_venv(root)
    for parts in ART_FILES:
        target = purelib.joinpath("art", *parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        text = real.joinpath(*parts).read_text()
        old, new = (edits or {}).get(parts[-1], ("", ""))
        assert old in text
        target.write_text(text.replace(old, new, 1) if old else text)
    (purelib / "art" / "__init__.py").write_text("")
    info = purelib / f"openpipe_art-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: openpipe-art\nVersion: {version}\n")
    return python


def purelib_of(python: Path) -> Path:
    out = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(out.stdout.strip())


def art_status(python: Path) -> tuple[dict[str, Any], str]:
    as_json = cli("status", "--python", str(python), "--json")
    assert as_json.returncode == 0, as_json.stderr
    return json.loads(as_json.stdout)["art"], cli("status", "--python", str(python)).stdout


def doctor_art(python: Path, tmp_path: Path) -> list[dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, "-m", "sidecar", "doctor", "--python", str(python), "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=tmp_path,
        timeout=120,
    )
    return [f for f in json.loads(done.stdout)["findings"] if f["check"] == "art"]


@pytest.mark.parametrize("version", ART_VERSIONS)
def test_status_names_a_tested_art(version: str, tmp_path: Path) -> None:
    art, text = art_status(art_python(version))
    assert (art["version"], art["tested"], art["problem"]) == (version, True, False)
    assert f"ART:           openpipe-art {version}: a tested version\n" in text
    assert "Model._storage_name" not in text  # the internals are listed for untested versions only
    storage = next(c for c in art["checks"] if c["name"] == "Model._storage_name")
    assert storage["found"] is (version != "0.5.18")  # 0.5.18 stores a run under model.name
    assert [f["level"] for f in doctor_art(art_python(version), tmp_path)] == ["ok"]


def test_status_of_an_untested_art_lists_each_internal(tmp_path: Path) -> None:
    art, text = art_status(art_as("0.5.99", tmp_path / "venv"))
    assert (art["tested"], art["problem"]) == (False, False)
    assert "untested (tested: 0.5.18, 0.5.23); every ART internal the preload uses is there" in text
    for line in (
        "ok      LocalBackend._experimental_fork_checkpoint: async def (self, model, from_model, from_project, "
        "from_s3_bucket, not_after_step, verbose, prefix)",
        "ok      Model._storage_name: defined on Model, TrainableModel",
        "ok      UnslothService._state: functools.cached_property",
        "ok      UnslothService._train_shared: async generator",
    ):
        assert f"  {line}\n" in text
    assert [f["level"] for f in doctor_art(art_as("0.5.99", tmp_path / "venv2"), tmp_path)] == ["info"]


def test_a_changed_art_is_a_doctor_problem_with_the_fix(tmp_path: Path) -> None:
    python = art_as(
        "0.6.0",
        tmp_path / "venv",
        {
            "service.py": ("@cached_property\n    def _state(", "@property\n    def _state("),
            "backend.py": ("async def _experimental_fork_checkpoint(", "async def fork_checkpoint("),
        },
    )
    art, text = art_status(python)
    assert art["problem"] is True
    assert "  MISSING UnslothService._state: not a cached_property\n" in text
    assert "  MISSING LocalBackend._experimental_fork_checkpoint: missing\n" in text
    (finding,) = doctor_art(python, tmp_path)
    assert finding["level"] == "problem"
    assert finding["message"].startswith(f"{python}: openpipe-art 0.6.0 lacks what the preload relies on (")
    assert f"`{python} -m pip install openpipe-art==0.5.23`" in finding["fix"]


def test_no_art_is_no_problem(tmp_path: Path) -> None:
    python, _ = make_venv(tmp_path / "venv")
    art, text = art_status(python)
    assert art == {
        "version": None,
        "tested": False,
        "problem": False,
        "note": "openpipe-art is not installed there",
        "checks": [],
    }
    assert "ART:           openpipe-art is not installed there\n" in text


DAEMON_MODULES = ("daemon.py", "pipeline.py", "swap", "watch", "doctor.py", "cli.py", "journal.py", "vllm")


@pytest.mark.slow
@pytest.mark.trainer
def test_the_copy_is_the_trainer_side_only_and_serves_forks_from_there(tmp_path: Path) -> None:
    """Only `sidecar/preload/` and `sidecar/protocol/` (under the copy's own __init__) go into a trainer venv, and a
    real trainer process started from that venv answers on its socket and loads a fork with nothing else."""
    pytest.importorskip("peft")
    from sidecar.adapter import adapter_digest
    from sidecar.protocol.client import call_agent
    from sidecar.protocol.messages import ForkRequest
    from sidecar.protocol.paths import agent_socket_path
    from tests.support.tiny_model import tiny_assets
    from tests.support.trainer_script import stop_trainer
    from tests.support.venvs import chained_venv, install_preload

    python = chained_venv(tmp_path / "venv")
    done = install_preload(python)
    assert done.returncode == 0, done.stderr
    copy = purelib_of(python) / preload_install.PRIVATE_DIR / "sidecar"
    assert sorted(p.name for p in copy.iterdir() if p.name != "__pycache__") == ["__init__.py", "preload", "protocol"]
    assert not [name for name in DAEMON_MODULES if list(copy.rglob(name))]

    assets = tiny_assets()
    run_dir = tmp_path / "art" / "proj" / "models" / "m"
    served = run_dir / "checkpoints" / "0000"
    shutil.copytree(assets.adapter_a, served)
    runtime_dir, control = tmp_path / "runtime", tmp_path / "control"
    runtime_dir.mkdir(mode=0o755)
    control.mkdir()
    args = ["--base", str(assets.base), "--adapter", str(served), "--run-dir", str(run_dir), "--control", str(control)]
    environ = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    with open(control / "stderr.log", "wb") as log:
        trainer = subprocess.Popen(
            [str(python), str(REPO / "tests" / "support" / "trainer_script.py"), *args],
            env={**environ, "FORK_SIDECAR_RUNTIME_DIR": str(runtime_dir)},
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd="/",
        )
    try:
        deadline = time.monotonic() + 120
        while not (control / "ready.json").exists():
            assert trainer.poll() is None, (control / "stderr.log").read_text(errors="replace")[-4000:]
            assert time.monotonic() < deadline, "the trainer did not register in 120 s"
            time.sleep(0.1)
        ready = json.loads((control / "ready.json").read_text())
        assert str(ready["sidecar"]).startswith(str(copy))
        socket_path = agent_socket_path(runtime_dir, os.geteuid(), trainer.pid)
        hello = call_agent(socket_path, {"op": "hello"}, timeout=10, pid=trainer.pid)
        assert hello["ok"] is True and hello["runs"] == [os.path.realpath(run_dir)], hello
        shutil.rmtree(served)
        shutil.copytree(assets.adapter_b, served)
        digest = adapter_digest(served)
        request = ForkRequest("copy-1", str(run_dir), str(served), digest, timeout=30.0)
        reply = call_agent(socket_path, request.to_message(), timeout=60, pid=trainer.pid)
        assert reply["ok"] is True, reply
        assert reply["result"] == "loaded" and reply["digest"] == digest, reply
    finally:
        stop_trainer(trainer, control, 30)
