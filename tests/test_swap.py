"""Staging and atomically installing checkpoints/0000, on real filesystems.

Filesystems this machine cannot offer in tmp_path (xfs/btrfs for reflinks, a FUSE filesystem without
RENAME_EXCHANGE, a tiny tmpfs for ENOSPC) are mounted for the test when we are root and the tools exist;
otherwise those tests skip and say why.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from sidecar.adapter import TreeLimits, adapter_digest, read_header
from sidecar.fsops import exchange_dirs
from sidecar.fsops import rename_noreplace_at as rename_noreplace
from sidecar.swap import (
    StagingCopy,
    SwapError,
    abort_staging,
    copy_to_staging,
    discard_retired,
    install_staging,
    leftovers,
    retired_name,
    settle_leftover,
    staging_name,
)
from sidecar.swap.copy_digest import CopyDigest, CopyStopped
from sidecar.swap.install import _plan_install
from tests.support.adapters import write_adapter, write_big_adapter
from tests.support.mounts import fuse_without_exchange, loop_filesystem, mounted, require_root

FORK = "f1"
STAGE, RETIRED = staging_name(FORK), retired_name(FORK)


def tree(directory: Path) -> dict[str, bytes]:
    """Every regular file below `directory` (relative path -> bytes); fails on anything else."""
    found = {}
    for path in sorted(directory.rglob("*")):
        info = path.lstat()
        if stat.S_ISDIR(info.st_mode):
            continue
        assert stat.S_ISREG(info.st_mode), path
        found[path.relative_to(directory).as_posix()] = path.read_bytes()
    return found


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.fixture
def checkpoints(tmp_path: Path) -> Path:
    """checkpoints/ of an ART run: 0000 (seed 0) and a step 0005 (seed 5, with a nested file) to fork from."""
    directory = tmp_path / "run" / "checkpoints"
    write_adapter(directory / "0000", seed=0)
    write_adapter(directory / "0005", seed=5, extra_files={"extra/notes.txt": "step 5\n"})
    return directory


def fork(checkpoints: Path, copy_mode: str = "auto", source: str = "0005") -> StagingCopy:
    staged = copy_to_staging(checkpoints / source, checkpoints, FORK, copy_mode=copy_mode)
    install_staging(checkpoints, FORK, staged.digest, stage_inode=staged.inode)
    return staged


# ------------------------------------------------------------------------------------------ mounts


# ------------------------------------------------------------------------------------------ the happy paths


@pytest.mark.parametrize("copy_mode", ["auto", "copy", "hardlink"])
def test_fork_replaces_0000_byte_for_byte(checkpoints: Path, copy_mode: str) -> None:
    old, new = tree(checkpoints / "0000"), tree(checkpoints / "0005")
    staged = copy_to_staging(checkpoints / "0005", checkpoints, FORK, copy_mode=copy_mode)

    assert staged.path == checkpoints / STAGE
    assert staged.digest == adapter_digest(checkpoints / "0005")
    assert staged.files == tuple(sorted(new))
    assert staged.bytes == sum(len(b) for b in new.values())
    assert staged.method == ("hardlink" if copy_mode == "hardlink" else "copy")  # ext4/tmpfs cannot reflink
    assert tree(checkpoints / "0000") == old  # staging alone changes nothing visible

    result = install_staging(checkpoints, FORK, staged.digest, stage_inode=staged.inode)

    assert (result.how, result.resumed) == ("exchange", False)
    assert result.live == checkpoints / "0000"
    assert tree(checkpoints / "0000") == new
    assert tree(checkpoints / RETIRED) == old
    assert names(checkpoints) == [RETIRED, "0000", "0005"]
    assert adapter_digest(checkpoints / "0000") == staged.digest

    discard_retired(checkpoints, FORK)

    assert names(checkpoints) == ["0000", "0005"]


def test_fork_without_an_existing_0000(checkpoints: Path) -> None:
    shutil.rmtree(checkpoints / "0000")
    staged = copy_to_staging(checkpoints / "0005", checkpoints, FORK)

    result = install_staging(checkpoints, FORK, staged.digest, stage_inode=staged.inode)

    assert (result.how, result.retired) == ("rename", None)
    assert tree(checkpoints / "0000") == tree(checkpoints / "0005")
    assert names(checkpoints) == ["0000", "0005"]


def test_installing_again_changes_nothing(checkpoints: Path) -> None:
    staged = fork(checkpoints)
    before = tree(checkpoints)

    again = install_staging(checkpoints, FORK, staged.digest, stage_inode=staged.inode)
    by_digest = install_staging(checkpoints, FORK, staged.digest)

    assert (again.how, again.resumed) == ("none", False)
    assert by_digest.how == "none"
    assert tree(checkpoints) == before


def test_hardlink_mode_shares_inodes(checkpoints: Path) -> None:
    fork(checkpoints, "hardlink")

    for name in ("adapter_model.safetensors", "adapter_config.json", "extra/notes.txt"):
        live, source = (checkpoints / "0000" / name).stat(), (checkpoints / "0005" / name).stat()
        assert (live.st_ino, live.st_dev) == (source.st_ino, source.st_dev)
        assert live.st_nlink == 2


def test_copy_mode_makes_independent_files_with_the_source_permissions(checkpoints: Path) -> None:
    (checkpoints / "0005" / "README.md").chmod(0o640)
    (checkpoints / "0005").chmod(0o750)

    fork(checkpoints, "copy")

    live = checkpoints / "0000"
    assert (live / "README.md").stat().st_ino != (checkpoints / "0005" / "README.md").stat().st_ino
    assert stat.S_IMODE((live / "README.md").stat().st_mode) == 0o640
    assert stat.S_IMODE(live.stat().st_mode) == 0o750
    assert stat.S_IMODE((live / "extra").stat().st_mode) == stat.S_IMODE((checkpoints / "0005/extra").stat().st_mode)


def test_root_keeps_the_source_owner(checkpoints: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root can give files away")
    for path in [checkpoints / "0005", *(checkpoints / "0005").rglob("*")]:
        os.chown(path, 1234, 4321)

    fork(checkpoints, "copy")

    for path in [checkpoints / "0000", *(checkpoints / "0000").rglob("*")]:
        assert (path.stat().st_uid, path.stat().st_gid) == (1234, 4321), path


def test_progress_reports_every_byte(checkpoints: Path) -> None:
    seen: list[tuple[int, int]] = []

    staged = copy_to_staging(
        checkpoints / "0005", checkpoints, FORK, copy_mode="copy", progress=lambda d, t: seen.append((d, t))
    )

    assert seen[-1] == (staged.bytes, staged.bytes)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_a_stale_stage_of_the_same_fork_is_replaced(checkpoints: Path) -> None:
    (checkpoints / STAGE / "junk").mkdir(parents=True)
    (checkpoints / STAGE / "adapter_model.safetensors").write_bytes(b"half a file")

    fork(checkpoints)

    assert tree(checkpoints / "0000") == tree(checkpoints / "0005")


def test_big_adapter_digest_is_computed_while_copying(tmp_path: Path) -> None:
    checkpoints = tmp_path / "checkpoints"
    write_adapter(checkpoints / "0000")
    write_big_adapter(checkpoints / "0001", 24 << 20)

    staged = fork(checkpoints, "copy", source="0001")

    assert staged.method == "copy"  # hashed from the staged copy's pages as they landed (copy_digest)
    assert staged.digest == adapter_digest(checkpoints / "0001") == adapter_digest(checkpoints / "0000")
    assert tree(checkpoints / "0000") == tree(checkpoints / "0001")


def copy_with_digest(source: Path, target: Path, *, flip_at: int | None = None, stop_at: int | None = None) -> str:
    """Copies `source` into a new `target` in 1 MiB steps the way the stage does, reporting each landed prefix to a
    CopyDigest, optionally writing one byte different from the source (at `flip_at`) or stopping early."""
    data = source.read_bytes()
    with open(source, "rb") as f:
        header = read_header(f.fileno(), source)
    fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        digest = CopyDigest(fd, header)
        try:
            for position in range(0, stop_at if stop_at is not None else len(data), 1 << 20):
                piece = bytearray(data[position : position + (1 << 20)])
                if flip_at is not None and position <= flip_at < position + len(piece):
                    piece[flip_at - position] ^= 0xFF
                os.pwrite(fd, piece, position)
                digest.copied(position + len(piece))
        finally:
            digest.stop()
        return digest.result()
    finally:
        os.close(fd)


def test_copy_digest_is_of_the_bytes_written_not_of_the_source(tmp_path: Path) -> None:
    source = write_big_adapter(tmp_path / "src", 6 << 20) / "adapter_model.safetensors"
    last_byte = source.stat().st_size - 1  # inside the last tensor's data

    assert copy_with_digest(source, tmp_path / "same") == adapter_digest(source)
    flipped = copy_with_digest(source, tmp_path / "flipped", flip_at=last_byte)
    assert flipped == adapter_digest(tmp_path / "flipped") != adapter_digest(source)


def test_copy_digest_of_a_copy_that_stopped_fails_at_once(tmp_path: Path) -> None:
    source = write_big_adapter(tmp_path / "src", 6 << 20) / "adapter_model.safetensors"

    # Hashing threads wait for bytes that never land; stop() wakes them, and the digest says why it has none.
    with pytest.raises(CopyStopped, match="the copy stopped before byte"):
        copy_with_digest(source, tmp_path / "half", stop_at=2 << 20)


# ------------------------------------------------------------------------------------------ crashes


def fd_of(directory: Path) -> int:
    return os.open(directory, os.O_RDONLY | os.O_DIRECTORY)


def exchange(c: int) -> None:
    exchange_dirs(c, STAGE, "0000")


def retire_stage(c: int) -> None:
    rename_noreplace(c, STAGE, RETIRED)


def aside(c: int) -> None:
    rename_noreplace(c, "0000", RETIRED)


def promote(c: int) -> None:
    rename_noreplace(c, STAGE, "0000")


# The filesystem operations install_staging performs on each path, in order; a crash after the first k.
PATHS: dict[str, list[Callable[[int], None]]] = {
    "exchange": [exchange, retire_stage],
    "aside": [aside, promote],
}


@pytest.mark.parametrize("by_inode", [True, False], ids=["by-inode", "by-digest"])
@pytest.mark.parametrize(("path", "k"), [("exchange", 1), ("exchange", 2), ("aside", 1), ("aside", 2)])
def test_install_finishes_after_a_crash_at_any_point(checkpoints: Path, path: str, k: int, by_inode: bool) -> None:
    old, new = tree(checkpoints / "0000"), tree(checkpoints / "0005")
    staged = copy_to_staging(checkpoints / "0005", checkpoints, FORK)
    c = fd_of(checkpoints)
    try:
        for operation in PATHS[path][:k]:
            operation(c)
    finally:
        os.close(c)

    result = install_staging(checkpoints, FORK, staged.digest, stage_inode=staged.inode if by_inode else None)

    assert tree(checkpoints / "0000") == new
    assert tree(checkpoints / RETIRED) == old
    assert names(checkpoints) == [RETIRED, "0000", "0005"]
    assert result.resumed == (k < len(PATHS[path]))
    assert install_staging(checkpoints, FORK, staged.digest).how == "none"


def test_install_finishes_after_a_crash_without_0000(checkpoints: Path) -> None:
    shutil.rmtree(checkpoints / "0000")
    staged = copy_to_staging(checkpoints / "0005", checkpoints, FORK)
    c = fd_of(checkpoints)
    try:
        promote(c)
    finally:
        os.close(c)

    result = install_staging(checkpoints, FORK, staged.digest, stage_inode=staged.inode)

    assert result.how == "none"
    assert tree(checkpoints / "0000") == tree(checkpoints / "0005")


def test_identical_weights_count_as_installed(checkpoints: Path) -> None:
    # Forking to a checkpoint with the same tensors: without the inode the digests cannot tell old from new.
    shutil.rmtree(checkpoints / "0000")
    shutil.copytree(checkpoints / "0005", checkpoints / "0000")
    staged = copy_to_staging(checkpoints / "0005", checkpoints, FORK)

    install_staging(checkpoints, FORK, staged.digest)

    assert tree(checkpoints / "0000") == tree(checkpoints / "0005")
    assert names(checkpoints) == [RETIRED, "0000", "0005"]


# Every input of the install planner against the action it must take: (0000 present, stage present, retired
# present, which of 0000 / stage holds the new adapter) -> next action. 24 rows, all of them.
PLAN = [
    # 0000  stage  retired new      action
    (True, True, True, "stage", "error:conflict"),
    (True, True, True, "live", "error:conflict"),
    (True, True, True, None, "error:conflict"),
    (True, True, False, "stage", "exchange"),
    (True, True, False, "live", "retire"),
    (True, True, False, None, "error:neither"),
    (True, False, True, "stage", "error:stage-gone"),
    (True, False, True, "live", "done"),
    (True, False, True, None, "error:stage-gone"),
    (True, False, False, "stage", "error:stage-gone"),
    (True, False, False, "live", "done"),
    (True, False, False, None, "error:stage-gone"),
    (False, True, True, "stage", "promote"),
    (False, True, True, "live", "error:neither"),
    (False, True, True, None, "error:neither"),
    (False, True, False, "stage", "promote"),
    (False, True, False, "live", "error:neither"),
    (False, True, False, None, "error:neither"),
    (False, False, True, "stage", "error:retired-only"),
    (False, False, True, "live", "error:retired-only"),
    (False, False, True, None, "error:retired-only"),
    (False, False, False, "stage", "error:nothing"),
    (False, False, False, "live", "error:nothing"),
    (False, False, False, None, "error:nothing"),
]


def test_plan_table_is_complete() -> None:
    assert len({row[:4] for row in PLAN}) == 2 * 2 * 2 * 3


@pytest.mark.parametrize(("live", "staged", "retired", "new", "action"), PLAN)
def test_plan_takes_the_expected_action(live: bool, staged: bool, retired: bool, new: str | None, action: str) -> None:
    assert _plan_install(live, staged, retired, new) == action


@pytest.mark.parametrize(
    ("setup", "fragment"),
    [
        (lambda c: shutil.rmtree(c / STAGE), "is gone"),
        (lambda c: (shutil.rmtree(c / STAGE), shutil.rmtree(c / "0000")), "is missing"),
        (lambda c: (shutil.rmtree(c / STAGE), (c / "0000").rename(c / RETIRED)), "rename it back"),
        (lambda c: shutil.copytree(c / "0000", c / RETIRED), "used before"),
        (lambda c: (c / STAGE / "adapter_model.safetensors").write_bytes(b"x" * 100), "neither it nor 0000"),
    ],
)
def test_install_refuses_states_it_cannot_explain(
    checkpoints: Path, setup: Callable[[Path], object], fragment: str
) -> None:
    staged = copy_to_staging(checkpoints / "0005", checkpoints, FORK)
    setup(checkpoints)
    before = tree(checkpoints)

    with pytest.raises(SwapError, match=fragment):
        install_staging(checkpoints, FORK, staged.digest)

    assert tree(checkpoints) == before


KILLER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from sidecar.swap import copy_to_staging, install_staging
    checkpoints = Path(sys.argv[1])
    print("ready", flush=True)
    staged = copy_to_staging(checkpoints / "0001", checkpoints, "k1", copy_mode="copy")
    install_staging(checkpoints, "k1", staged.digest, stage_inode=staged.inode)
    print("done", flush=True)
    """
)


def test_sigkill_at_any_moment_leaves_a_whole_0000(tmp_path: Path) -> None:
    """A real SIGKILL somewhere in stage + install; settle_leftover (start-up cleanup) then leaves one whole 0000."""
    checkpoints = tmp_path / "checkpoints"
    write_adapter(checkpoints / "0000", seed=0)
    write_big_adapter(checkpoints / "0001", 16 << 20)
    old, new = tree(checkpoints / "0000"), tree(checkpoints / "0001")
    outcomes = set()
    for delay in (0.0, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.3):
        process = subprocess.Popen(
            [sys.executable, "-c", KILLER, str(checkpoints)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).parents[1],
        )
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "ready"
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()

        for kind, fork_id in leftovers(checkpoints):
            settle_leftover(checkpoints, fork_id)
            outcomes.add(kind)

        assert names(checkpoints) == ["0000", "0001"]
        live = tree(checkpoints / "0000")
        assert live in (old, new)
        outcomes.add("new" if live == new else "old")
        if live == new:  # go back to the old 0000 for the next round
            shutil.rmtree(checkpoints / "0000")
            write_adapter(checkpoints / "0000", seed=0)
    assert "old" in outcomes, outcomes  # the first kills land before the install


# ------------------------------------------------------------------------------------------ rename-aside


def test_rename_aside_on_a_filesystem_without_exchange(tmp_path: Path) -> None:
    with fuse_without_exchange(tmp_path) as root:
        checkpoints = root / "checkpoints"
        write_adapter(checkpoints / "0000", seed=0)
        write_adapter(checkpoints / "0005", seed=5)
        old, new = tree(checkpoints / "0000"), tree(checkpoints / "0005")
        (checkpoints / "a").mkdir()
        c = fd_of(checkpoints)
        try:
            with pytest.raises(OSError) as caught:
                exchange_dirs(c, "a", "0000")
        finally:
            os.close(c)
        assert caught.value.errno == errno.EINVAL  # the premise: this filesystem cannot exchange
        (checkpoints / "a").rmdir()

        staged = copy_to_staging(checkpoints / "0005", checkpoints, FORK)
        result = install_staging(checkpoints, FORK, staged.digest, stage_inode=staged.inode)

        assert result.how == "aside"
        assert tree(checkpoints / "0000") == new
        assert tree(checkpoints / RETIRED) == old
        assert install_staging(checkpoints, FORK, staged.digest).how == "none"


def test_rename_aside_when_exchange_is_not_allowed(checkpoints: Path) -> None:
    old, new = tree(checkpoints / "0000"), tree(checkpoints / "0005")
    staged = copy_to_staging(checkpoints / "0005", checkpoints, FORK)

    result = install_staging(checkpoints, FORK, staged.digest, stage_inode=staged.inode, allow_exchange=False)

    assert result.how == "aside"
    assert (tree(checkpoints / "0000"), tree(checkpoints / RETIRED)) == (new, old)


# ------------------------------------------------------------------------------------------ failures


def test_disk_full_while_staging(tmp_path: Path) -> None:
    require_root()
    with mounted(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(tmp_path / "small")], tmp_path / "small"):
        checkpoints = tmp_path / "small" / "checkpoints"
        write_adapter(checkpoints / "0000", seed=0)
        write_big_adapter(tmp_path / "big", 4 << 20)
        before = tree(checkpoints)

        with pytest.raises(SwapError, match="no space left") as caught:
            copy_to_staging(tmp_path / "big", checkpoints, FORK, copy_mode="copy")

        assert "\n" not in str(caught.value)
        assert tree(checkpoints) == before
        assert names(checkpoints) == ["0000"]


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (lambda s: s.joinpath("adapter_model.safetensors").open("ab").write(b"\0" * 8), "was modified"),
        (lambda s: s.joinpath("adapter_model.safetensors").unlink(), "was deleted"),
        (lambda s: s.joinpath("new-file").write_text("x"), "new-file appeared"),
        (lambda s: s.joinpath("extra", "notes.txt").write_text("rewritten"), "was modified"),
    ],
)
@pytest.mark.parametrize("copy_mode", ["copy", "hardlink"])
def test_source_changed_during_the_copy(
    checkpoints: Path, change: Callable[[Path], object], fragment: str, copy_mode: str
) -> None:
    source = checkpoints / "0005"
    before = tree(checkpoints / "0000")
    changed = []

    def progress(done: int, total: int) -> None:  # runs between the copy of a file and its checks
        if done == total and not changed:
            changed.append(change(source))

    with pytest.raises(SwapError, match=fragment) as caught:
        copy_to_staging(source, checkpoints, FORK, copy_mode=copy_mode, progress=progress)

    assert str(caught.value).startswith(str(source))
    assert tree(checkpoints / "0000") == before
    assert STAGE not in names(checkpoints)


def test_invalid_source_is_refused_before_copying(checkpoints: Path) -> None:
    (checkpoints / "0005" / "adapter_config.json").write_text("{")

    with pytest.raises(SwapError, match=r"0005/adapter_config\.json: adapter_config\.json is not JSON"):
        copy_to_staging(checkpoints / "0005", checkpoints, FORK)

    assert names(checkpoints) == ["0000", "0005"]


def test_symlinked_0000_is_refused(checkpoints: Path) -> None:
    staged = copy_to_staging(checkpoints / "0005", checkpoints, FORK)
    (checkpoints / "0000").rename(checkpoints / "real0000")
    (checkpoints / "0000").symlink_to("real0000")

    # Refused before a copy is made (no stage left behind), and by install if it turns into a symlink later.
    with pytest.raises(SwapError, match=r"shutil\.rmtree"):
        copy_to_staging(checkpoints / "0005", checkpoints, "other-fork")
    assert ".fork-stage-other-fork" not in names(checkpoints)
    with pytest.raises(SwapError, match=r"shutil\.rmtree"):
        install_staging(checkpoints, FORK, staged.digest, stage_inode=staged.inode)

    assert (checkpoints / "0000").is_symlink()


def test_symlinked_checkpoints_dir_is_refused(checkpoints: Path, tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to(checkpoints)

    with pytest.raises(SwapError, match="link: is a symlink"):
        copy_to_staging(checkpoints / "0005", tmp_path / "link", FORK)
    with pytest.raises(SwapError, match="link: is a symlink"):
        install_staging(tmp_path / "link", FORK, "sha256:" + "0" * 64)

    assert STAGE not in names(checkpoints)


def test_symlinks_and_special_files_in_the_source_are_refused(checkpoints: Path, tmp_path: Path) -> None:
    (tmp_path / "link-to-0005").symlink_to(checkpoints / "0005")
    with pytest.raises(SwapError, match="link-to-0005: is a symlink"):
        copy_to_staging(tmp_path / "link-to-0005", checkpoints, FORK)

    (checkpoints / "0005" / "tokenizer.json").symlink_to("/etc/hostname")
    with pytest.raises(SwapError, match=r"tokenizer\.json: is a symlink"):
        copy_to_staging(checkpoints / "0005", checkpoints, FORK)

    (checkpoints / "0005" / "tokenizer.json").unlink()
    os.mkfifo(checkpoints / "0005" / "fifo")
    with pytest.raises(SwapError, match="fifo: is not a regular file"):
        copy_to_staging(checkpoints / "0005", checkpoints, FORK)

    assert names(checkpoints) == ["0000", "0005"]


def test_the_stage_cannot_be_its_own_source(checkpoints: Path) -> None:
    staged = copy_to_staging(checkpoints / "0005", checkpoints, FORK)

    with pytest.raises(SwapError, match="staging directory itself"):
        copy_to_staging(staged.path, checkpoints, FORK)

    assert tree(staged.path) == tree(checkpoints / "0005")


def test_reflink_mode_fails_clearly_where_unsupported(checkpoints: Path) -> None:
    with pytest.raises(SwapError, match=r"cannot reflink.*copy_mode auto or copy"):
        copy_to_staging(checkpoints / "0005", checkpoints, FORK, copy_mode="reflink")

    assert names(checkpoints) == ["0000", "0005"]


def test_hardlink_mode_across_filesystems_fails_clearly(tmp_path: Path) -> None:
    require_root()
    with mounted(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(tmp_path / "other")], tmp_path / "other"):
        checkpoints = tmp_path / "other" / "checkpoints"
        write_adapter(checkpoints / "0000")
        write_adapter(tmp_path / "src", seed=3)

        with pytest.raises(SwapError, match=r"cannot be hardlinked.*copy_mode auto or copy"):
            copy_to_staging(tmp_path / "src", checkpoints, FORK, copy_mode="hardlink")

        assert names(checkpoints) == ["0000"]


@pytest.mark.parametrize("kind", ["xfs", "btrfs"])
@pytest.mark.parametrize("copy_mode", ["reflink", "auto"])
def test_reflink_on_a_filesystem_that_can(tmp_path: Path, kind: str, copy_mode: str) -> None:
    with loop_filesystem(tmp_path, kind) as root:
        checkpoints = root / "checkpoints"
        write_adapter(checkpoints / "0000", seed=0)
        write_adapter(checkpoints / "0005", seed=5, extra_files={"extra/notes.txt": "x"})

        staged = fork(checkpoints, copy_mode)

        assert staged.method == "reflink"
        assert staged.digest == adapter_digest(checkpoints / "0005")
        assert tree(checkpoints / "0000") == tree(checkpoints / "0005")


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="fork id"):
        staging_name("../x")
    with pytest.raises(ValueError, match="copy_mode"):
        copy_to_staging(Path("/nonexistent"), Path("/nonexistent"), FORK, copy_mode="rsync")


# ------------------------------------------------------------------------------------------ cleanup


def test_abort_and_discard_are_idempotent(checkpoints: Path) -> None:
    copy_to_staging(checkpoints / "0005", checkpoints, FORK)

    abort_staging(checkpoints, FORK)
    abort_staging(checkpoints, FORK)
    discard_retired(checkpoints, FORK)

    assert names(checkpoints) == ["0000", "0005"]


def test_abort_refuses_to_leave_the_run_without_0000(checkpoints: Path) -> None:
    copy_to_staging(checkpoints / "0005", checkpoints, FORK)
    (checkpoints / "0000").rename(checkpoints / RETIRED)  # a crash in the middle of a rename-aside

    with pytest.raises(SwapError, match="install_staging"):
        abort_staging(checkpoints, FORK)

    assert names(checkpoints) == [RETIRED, STAGE, "0005"]


@pytest.mark.parametrize(
    ("ops", "expect"),
    [
        ([], "old"),  # staged only
        ([exchange], "new"),
        ([exchange, retire_stage], "new"),
        ([aside], "new"),
        ([aside, promote], "new"),
    ],
)
def test_settle_leftover_leaves_one_whole_0000(
    checkpoints: Path, ops: list[Callable[[int], None]], expect: str
) -> None:
    old, new = tree(checkpoints / "0000"), tree(checkpoints / "0005")
    copy_to_staging(checkpoints / "0005", checkpoints, FORK)
    c = fd_of(checkpoints)
    try:
        for operation in ops:
            operation(c)
    finally:
        os.close(c)

    assert leftovers(checkpoints)
    settle_leftover(checkpoints, FORK)

    assert names(checkpoints) == ["0000", "0005"]
    assert tree(checkpoints / "0000") == (new if expect == "new" else old)
    assert leftovers(checkpoints) == []


def test_settle_leftover_puts_a_lone_retired_copy_back(checkpoints: Path) -> None:
    old = tree(checkpoints / "0000")
    (checkpoints / "0000").rename(checkpoints / RETIRED)

    assert settle_leftover(checkpoints, FORK) == f"put {RETIRED} back as 0000"
    assert tree(checkpoints / "0000") == old


def test_leftovers_lists_only_our_names(checkpoints: Path) -> None:
    for name in (".fork-stage-a1", ".fork-retired-b2", ".fork-a1", ".fork-stage-", ".fork-stage-a b", "0007"):
        (checkpoints / name).mkdir(parents=True, exist_ok=True)

    assert leftovers(checkpoints) == [("retired", "b2"), ("stage", "a1")]
    assert leftovers(checkpoints / "missing") == []


# ------------------------------------------------------------------------------------------ tenants (issue 18)


@pytest.mark.parametrize(
    ("limits", "grow", "words"),
    [
        (TreeLimits(max_files=50), lambda s: [(s / f"junk{i}").write_bytes(b"x") for i in range(60)], "max_files"),
        (TreeLimits(max_bytes=1 << 20), lambda s: os.truncate(s / "extra/notes.txt", 2 << 20), "max_bytes"),
        (TreeLimits(max_depth=2), lambda s: (s / "a/b/c").mkdir(parents=True), "too deeply"),
    ],
)
def test_a_source_over_its_bounds_is_refused_before_anything_is_written(
    checkpoints: Path, limits: TreeLimits, grow: Callable[[Path], object], words: str
) -> None:
    grow(checkpoints / "0005")
    before = tree(checkpoints / "0000")
    with pytest.raises(SwapError, match=words) as caught:
        copy_to_staging(checkpoints / "0005", checkpoints, FORK, limits=limits)
    assert "\n" not in str(caught.value)
    assert names(checkpoints) == ["0000", "0005"] and tree(checkpoints / "0000") == before


def test_a_sparse_file_counts_at_its_full_size_against_the_free_space(tmp_path: Path) -> None:
    require_root()
    with mounted(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(tmp_path / "small")], tmp_path / "small"):
        checkpoints = tmp_path / "small" / "checkpoints"
        write_adapter(checkpoints / "0000", seed=0)
        write_adapter(checkpoints / "0004", seed=4)
        with open(checkpoints / "0004" / "optimizer.pt", "wb") as f:
            f.truncate(100 << 30)  # 100 GiB apparent, no blocks used
        free = os.statvfs(checkpoints).f_bavail
        with pytest.raises(SwapError, match="no space left"):
            copy_to_staging(checkpoints / "0004", checkpoints, FORK, copy_mode="copy")
        assert os.statvfs(checkpoints).f_bavail == free  # refused before a block was written
        assert names(checkpoints) == ["0000", "0004"]


def test_steps_work_through_the_run_fd_not_the_path(tmp_path: Path) -> None:
    """The model dir is swapped for a symlink to another run after it was opened: every step stays in the first."""
    mine, other = tmp_path / "art/p/models/m", tmp_path / "art/q/models/other"
    write_adapter(mine / "checkpoints/0000", seed=0)
    write_adapter(mine / "checkpoints/0005", seed=5)
    write_adapter(other / "checkpoints/0000", seed=9)
    others = tree(other)
    run_fd = os.open(mine, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.rename(mine, mine.with_name("m.moved"))
        os.symlink(other, mine)
        checkpoints = mine / "checkpoints"
        staged = copy_to_staging(mine.with_name("m.moved") / "checkpoints/0005", checkpoints, FORK, run_fd=run_fd)
        install_staging(checkpoints, FORK, staged.digest, stage_inode=staged.inode, run_fd=run_fd)
        discard_retired(checkpoints, FORK, run_fd=run_fd)
        assert leftovers(checkpoints, run_fd=run_fd) == []
    finally:
        os.close(run_fd)
    moved = mine.with_name("m.moved") / "checkpoints"
    assert tree(moved / "0000") == tree(moved / "0005")
    assert tree(other) == others
