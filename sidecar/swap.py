"""Replacing `checkpoints/0000` with a forked checkpoint, atomically (the etcd / Prometheus TSDB recipe).

1. stage_checkpoint: copy every file of the source into `checkpoints/.fork-stage-<id>` (same filesystem;
   a hidden, never all-digit name, because ART treats all-digit names as steps), by reflink where the
   filesystem can, else by copy (hardlinks only when asked); fsync each file and directory; check the
   staged adapter; compute its digest.
2. install_staged: `renameat2(RENAME_EXCHANGE)` the stage with `0000`, fsync `checkpoints/`, then rename
   the stage name (now holding the old checkpoint) to `.fork-retired-<id>` and fsync again. Readers see
   the old directory or the new one, never a mix. Where the filesystem cannot exchange (vfat, NFS,
   most FUSE filesystems answer EINVAL), rename `0000` aside to `.fork-retired-<id>` and the stage to
   `0000`: there is a moment without `0000`, which install_staged completes when called again.
3. discard_retired: remove `.fork-retired-<id>` once nothing needs it.

Every step is a function of (checkpoints dir, fork id, expected digest) that looks at which names
exist and brings the directory to its end state, so a journaled caller resumes after a SIGKILL by
calling the step it recorded again. `leftovers` and `settle_leftover` clean up after forks that no
journal knows. Every failure is a SwapError with one sentence naming the path and what to do; before
install nothing in `checkpoints/` but the stage changes, and a failed stage is removed.

All work happens through directory file descriptors opened with O_NOFOLLOW, so a symlink swapped in
after a check is never followed. `0000` stays a real directory: ART deletes checkpoints with
`shutil.rmtree`, which refuses symlinks.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import re
import shutil
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sidecar.adapter import (
    ADAPTER_FILE,
    AdapterError,
    CheckpointEntry,
    TreeLimits,
    adapter_digest,
    check_adapter,
    digest_open_file,
    open_checkpoint_dir,
    printable,
    read_header,
    walk_checkpoint,
)
from sidecar.fsops import exchange_dirs, lstat_at
from sidecar.fsops import libc as _libc
from sidecar.fsops import rename_noreplace_at as rename_noreplace
from sidecar.journal import FORK_ID
from sidecar.protocol.atomic_write import fsync_dir_fd as _fsync_dir

__all__ = [
    "COPY_MODES",
    "LIVE_NAME",
    "Progress",
    "StagedCheckpoint",
    "SwapError",
    "SwapResult",
    "abort_staged",
    "discard_retired",
    "exchange_dirs",
    "install_staged",
    "leftovers",
    "rename_noreplace",
    "retired_name",
    "settle_leftover",
    "stage_checkpoint",
    "stage_name",
]

log = logging.getLogger(__name__)

LIVE_NAME = "0000"
STAGE_PREFIX = ".fork-stage-"
RETIRED_PREFIX = ".fork-retired-"
COPY_MODES = ("auto", "reflink", "hardlink", "copy")
COPY_CHUNK = 64 << 20  # per copy_file_range call; also the progress granularity

_LEFTOVER = re.compile(rf"({re.escape(STAGE_PREFIX)}|{re.escape(RETIRED_PREFIX)})({FORK_ID.pattern})")
_SYNC_FILE_RANGE_WRITE = 2
_FICLONE = 0x40049409  # _IOW(0x94, 9, int); fcntl.FICLONE only exists from Python 3.12
# Errors meaning "this filesystem (or kernel) cannot do that", as opposed to a real failure.
_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV})

Progress = Callable[[int, int], None]  # (bytes done, bytes total)


class SwapError(Exception):
    """A swap step failed; the message is one sentence naming the path and what to do."""

    def __init__(self, path: str | os.PathLike[str], message: str) -> None:
        self.path = Path(path)
        super().__init__(message)


@dataclass(frozen=True)
class StagedCheckpoint:
    path: Path  # checkpoints/.fork-stage-<id>
    fork_id: str
    digest: str  # adapter digest of the staged adapter_model.safetensors
    files: tuple[str, ...]  # relative paths, sorted
    bytes: int  # total size of the files
    method: str  # "reflink", "copy" or "hardlink"
    inode: int  # of the stage directory: lets install_staged tell old from new without reading them
    digest_s: float = 0.0  # how long staging waited for the digest once the bytes were in place (copies overlap it)


@dataclass(frozen=True)
class SwapResult:
    live: Path  # checkpoints/0000, now the new checkpoint
    digest: str
    how: str  # "exchange", "aside", "rename", or "none" when 0000 was already the new checkpoint
    retired: Path | None  # where the previous 0000 now is, if it still exists
    resumed: bool  # this call found and finished an install interrupted earlier


def stage_name(fork_id: str) -> str:
    return STAGE_PREFIX + _checked_fork_id(fork_id)


def retired_name(fork_id: str) -> str:
    return RETIRED_PREFIX + _checked_fork_id(fork_id)


def _checked_fork_id(fork_id: str) -> str:
    if not isinstance(fork_id, str) or not FORK_ID.fullmatch(fork_id):
        raise ValueError(f"fork id {fork_id!r} must be 1-64 characters of A-Z, a-z, 0-9, '_' and '-'")
    return fork_id


# ------------------------------------------------------------------------------------------ syscalls


def _remove_entry(dir_fd: int, name: str) -> bool:
    """Removes `name` (a tree, a file or a symlink) from `dir_fd`; False if it was not there."""
    info = lstat_at(dir_fd, name)
    if info is None:
        return False
    if stat.S_ISDIR(info.st_mode):
        shutil.rmtree(name, dir_fd=dir_fd)  # the fd-based variant: it never follows a symlink
    else:
        os.unlink(name, dir_fd=dir_fd)
    return True


def _open_checkpoints_dir(checkpoints_dir: Path, run_fd: int | None = None) -> int:
    """`checkpoints_dir`, or with `run_fd` the `checkpoints` entry of the run directory open as `run_fd` (the
    path then only names it in messages: nothing is resolved by name again)."""
    shown = printable(checkpoints_dir)
    where, dir_fd = (checkpoints_dir, None) if run_fd is None else (Path(checkpoints_dir.name), run_fd)
    try:
        return os.open(where, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        raise SwapError(checkpoints_dir, f"{shown}: no such directory; is this an ART run directory?") from None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) and _is_symlink(where, dir_fd):
            raise SwapError(
                checkpoints_dir,
                f"{shown}: is a symlink; the checkpoints directory must be real so 0000 is swapped where ART "
                f"looks — replace the link with the directory.",
            ) from None
        if exc.errno == errno.ENOTDIR:
            raise SwapError(checkpoints_dir, f"{shown}: is not a directory; is this an ART run directory?") from None
        raise SwapError(checkpoints_dir, f"{shown}: cannot open ({exc.strerror}); check its permissions.") from None


def _is_symlink(path: Path, dir_fd: int | None) -> bool:
    try:
        return stat.S_ISLNK(os.stat(path, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _check_live_is_dir(checkpoints_dir: Path, info: os.stat_result | None) -> None:
    if info is None or stat.S_ISDIR(info.st_mode):
        return
    shown = printable(checkpoints_dir / LIVE_NAME)
    if stat.S_ISLNK(info.st_mode):
        raise SwapError(
            checkpoints_dir / LIVE_NAME,
            f"{shown}: is a symlink; ART deletes checkpoints with shutil.rmtree, which refuses symlinks — "
            f"replace it with a real directory.",
        )
    raise SwapError(checkpoints_dir / LIVE_NAME, f"{shown}: is not a directory; move it away and fork again.")


# ------------------------------------------------------------------------------------------ staging


@dataclass(frozen=True)
class _Fingerprint:
    """What must not change in a source file while we copy and digest it.

    Since Linux 6.13, ext4, xfs, btrfs and tmpfs give a file a fine-grained timestamp when it changes after
    its times were queried, so any write after our fstat moves mtime/ctime. Older kernels tick at jiffy
    granularity: a same-size rewrite within one tick of our fstat could go unseen there.
    """

    ino: int
    dev: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, info: os.stat_result, *, with_ctime: bool = True) -> _Fingerprint:
        # link() bumps the inode's ctime, so hardlink mode compares everything else.
        return cls(info.st_ino, info.st_dev, info.st_size, info.st_mtime_ns, info.st_ctime_ns if with_ctime else 0)


class _ReflinkUnsupported(Exception):
    pass


def _reflink(src_fd: int, dst_fd: int) -> None:
    try:
        fcntl.ioctl(dst_fd, _FICLONE, src_fd)
    except OSError as exc:
        if exc.errno in _UNSUPPORTED:
            raise _ReflinkUnsupported from None
        raise


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Starts writing a copied range to disk now (sync_file_range WRITE, no waiting), so the final
    fsync has little left to do: writeback overlaps the rest of the copy and the digest."""
    function = getattr(_libc(), "sync_file_range", None)
    if function is None:
        return
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function(fd, offset, length, _SYNC_FILE_RANGE_WRITE)  # advisory: an error here leaves the fsync to do it


def _copy_data(src_fd: int, dst_fd: int, size: int, on_bytes: Callable[[int], None], label: str) -> None:
    """Copies `size` bytes in the kernel (copy_file_range), falling back to read/write where it can't."""
    position = 0
    use_kernel = True
    while position < size:
        count = min(COPY_CHUNK, size - position)
        if use_kernel:
            try:
                done = os.copy_file_range(src_fd, dst_fd, count, position, position)
            except OSError as exc:
                if exc.errno not in _UNSUPPORTED or position:
                    raise
                use_kernel = False
                continue
        else:
            data = os.pread(src_fd, min(count, 8 << 20), position)
            written = 0
            while written < len(data):
                written += os.pwrite(dst_fd, memoryview(data)[written:], position + written)
            done = len(data)
        if done == 0:
            raise _SourceChanged(f"{label} shrank while it was copied")
        _start_writeback(dst_fd, position, done)
        position += done
        on_bytes(done)


class _SourceChanged(Exception):
    """The source checkpoint changed under us; the message says how."""


def _copy_owner_and_mode(info: os.stat_result, dst_fd: int) -> None:
    """Gives a staged file or directory the source's permission bits and, when we run as root, its owner:
    the trainer's user must be able to delete 0000 again (ART prunes old steps with shutil.rmtree)."""
    if os.geteuid() == 0:
        try:
            os.fchown(dst_fd, info.st_uid, info.st_gid)
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EINVAL, errno.ENOTSUP):  # vfat-like filesystems have no owners
                raise
    os.fchmod(dst_fd, stat.S_IMODE(info.st_mode) & 0o777)


class _DigestThread(threading.Thread):
    """Digests the source adapter file while the main thread copies it, so its bytes are read once
    from disk (the readers share the page cache); the digest's own pool then hashes on every core."""

    def __init__(self, fd: int, display: Path) -> None:
        super().__init__(name="fork-sidecar-digest", daemon=True)
        self._fd, self._display = fd, display
        self.digest: str | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.digest = digest_open_file(self._fd, self._display)
        except BaseException as exc:  # handed to the main thread, which re-raises it
            self.error = exc

    def result(self) -> str:
        self.join()
        if self.error is not None:
            raise self.error
        assert self.digest is not None
        return self.digest


class _Stager:
    """Copies one checkpoint tree from `src_fd` into `stage_fd`, checking the source stays put."""

    def __init__(
        self, source: Path, src_fd: int, stage: Path, stage_fd: int, copy_mode: str, progress: Progress | None
    ) -> None:
        self.source, self.src_fd = source, src_fd
        self.stage, self.stage_fd = stage, stage_fd
        self.mode = copy_mode
        self.progress = progress
        self.methods: set[str] = set()
        self.digest: str | None = None  # of the adapter file, computed while it was staged
        self.digest_wait_s = 0.0  # how long the digest kept the stage waiting after the bytes were in place
        self.total = 0
        self.done = 0

    def _advance(self, n: int) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(self.done, self.total)

    def copy_tree(self, entries: list[CheckpointEntry]) -> dict[str, _Fingerprint]:
        self.total = sum(e.stat.st_size for e in entries if not e.is_dir)
        dir_fds = {"": (self.src_fd, self.stage_fd)}
        fingerprints: dict[str, _Fingerprint] = {}
        try:
            for entry in entries:
                parent, _, name = entry.relpath.rpartition("/")
                src_dir, dst_dir = dir_fds[parent]
                if entry.is_dir:
                    dir_fds[entry.relpath] = self._make_dir(name, src_dir, dst_dir, entry)
                else:
                    fingerprints[entry.relpath] = self._copy_file(entry, name, src_dir, dst_dir)
            for relpath in sorted(dir_fds, key=len, reverse=True):  # children before parents
                _fsync_dir(dir_fds[relpath][1])
        finally:
            for relpath, (src_dir, dst_dir) in dir_fds.items():
                if relpath:
                    os.close(src_dir)
                    os.close(dst_dir)
        return fingerprints

    def _make_dir(self, name: str, src_dir: int, dst_dir: int, entry: CheckpointEntry) -> tuple[int, int]:
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        src = os.open(name, flags, dir_fd=src_dir)
        try:
            if os.fstat(src).st_ino != entry.stat.st_ino:
                raise _SourceChanged(f"directory {entry.relpath} was replaced")
            os.mkdir(name, 0o700, dir_fd=dst_dir)
            dst = os.open(name, flags, dir_fd=dst_dir)
        except BaseException:
            os.close(src)
            raise
        try:
            _copy_owner_and_mode(entry.stat, dst)
        except BaseException:
            os.close(src)
            os.close(dst)
            raise
        return src, dst

    def _open_source_file(self, name: str, src_dir: int, entry: CheckpointEntry) -> int:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # NONBLOCK: never hang on a FIFO
        try:
            fd = os.open(name, flags, dir_fd=src_dir)
        except FileNotFoundError:
            raise _SourceChanged(f"{entry.relpath} was deleted") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise _SourceChanged(f"{entry.relpath} became a symlink") from None
            raise
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_ino != entry.stat.st_ino:
            os.close(fd)
            raise _SourceChanged(f"{entry.relpath} was replaced")
        return fd

    def _copy_file(self, entry: CheckpointEntry, name: str, src_dir: int, dst_dir: int) -> _Fingerprint:
        src = self._open_source_file(name, src_dir, entry)
        try:
            before = _Fingerprint.of(os.fstat(src), with_ctime=self.mode != "hardlink")
            digester = self._start_digest(entry, src)
            try:
                if self.mode == "hardlink":
                    self._link_file(entry, name, src, (src_dir, dst_dir), before)
                else:
                    self._write_copy(entry, name, src, dst_dir, before.size)
            finally:
                if digester is not None:  # wait even on failure: the thread reads `src`, closed below
                    started = time.perf_counter()
                    digester.join()
                    self.digest_wait_s = time.perf_counter() - started
            if digester is not None:
                self.digest = digester.result()
            self._check_unchanged(entry, name, src, src_dir, before)
            return before
        finally:
            os.close(src)

    def _start_digest(self, entry: CheckpointEntry, src: int) -> _DigestThread | None:
        """Starts digesting the adapter file from the source while its bytes are put in place.

        Whatever the method, the digest reads the source: its bytes are read from disk once (or come from the
        page cache, where a just-written checkpoint usually is; a clone would be cold, page cache being per
        inode) and hashing overlaps the copy and its fsync. The source's fingerprint, taken before and checked
        after the digest, shows the bytes did not change meanwhile, so the digest is the staged file's too.
        """
        if entry.relpath != ADAPTER_FILE:
            return None
        read_header(src, self.source / ADAPTER_FILE)  # fail before copying gigabytes of a bad file
        thread = _DigestThread(src, self.source / ADAPTER_FILE)
        thread.start()
        return thread

    def _write_copy(self, entry: CheckpointEntry, name: str, src: int, dst_dir: int, size: int) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        dst = os.open(name, flags, 0o600, dir_fd=dst_dir)
        try:
            self.methods.add(self._fill(src, dst, size, entry.relpath))
            _copy_owner_and_mode(entry.stat, dst)
            os.fsync(dst)  # meanwhile the digest thread finishes: hashing overlaps the writeback
        finally:
            os.close(dst)

    def _fill(self, src: int, dst: int, size: int, relpath: str) -> str:
        """Puts the source bytes into `dst`; returns the method used."""
        if self.mode in ("reflink", "auto"):
            try:
                _reflink(src, dst)
                self._advance(size)
                return "reflink"
            except _ReflinkUnsupported:
                if self.mode == "reflink":
                    raise
                self.mode = "copy"  # decided once: the other files live on the same filesystem
        _copy_data(src, dst, size, self._advance, relpath)
        return "copy"

    def _link_file(
        self, entry: CheckpointEntry, name: str, src: int, dirs: tuple[int, int], before: _Fingerprint
    ) -> None:
        src_dir, dst_dir = dirs
        try:
            os.link(name, name, src_dir_fd=src_dir, dst_dir_fd=dst_dir, follow_symlinks=False)
        except OSError as exc:
            if exc.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                raise SwapError(
                    self.source / entry.relpath,
                    f"{printable(self.source / entry.relpath)}: cannot be hardlinked into {printable(self.stage)} "
                    f"({exc.strerror}); use copy_mode auto or copy.",
                ) from None
            raise
        linked = os.stat(name, dir_fd=dst_dir, follow_symlinks=False)
        if (linked.st_ino, linked.st_dev) != (before.ino, before.dev):
            raise _SourceChanged(f"{entry.relpath} was replaced while it was linked")
        os.fsync(src)  # the shared inode's data, which the trainer may not have synced
        self.methods.add("hardlink")
        self._advance(before.size)

    def _check_unchanged(self, entry: CheckpointEntry, name: str, src: int, src_dir: int, before: _Fingerprint) -> None:
        with_ctime = self.mode != "hardlink"
        if _Fingerprint.of(os.fstat(src), with_ctime=with_ctime) != before:
            raise _SourceChanged(f"{entry.relpath} was modified")
        named = lstat_at(src_dir, name)
        if named is None:
            raise _SourceChanged(f"{entry.relpath} was deleted")
        if (named.st_ino, named.st_dev) != (before.ino, before.dev):
            raise _SourceChanged(f"{entry.relpath} was replaced")

    def recheck(
        self, entries: list[CheckpointEntry], fingerprints: dict[str, _Fingerprint], limits: TreeLimits | None
    ) -> None:
        """After the copy (and the digest): the source tree still holds exactly the files we copied, unchanged."""
        with_ctime = self.mode != "hardlink"
        again = _walk(self.source, self.src_fd, limits)
        now = {e.relpath: _Fingerprint.of(e.stat, with_ctime=with_ctime) for e in again if not e.is_dir}
        for relpath, before in fingerprints.items():
            if relpath not in now:
                raise _SourceChanged(f"{relpath} was deleted")
            if now[relpath] != before:
                raise _SourceChanged(f"{relpath} was modified")
        added = sorted({e.relpath for e in again} - {e.relpath for e in entries})
        if added:
            raise _SourceChanged(f"{added[0]} appeared")


def _walk(source: Path, src_fd: int, limits: TreeLimits | None) -> list[CheckpointEntry]:
    try:
        return walk_checkpoint(src_fd, source, limits)
    except AdapterError as exc:
        raise SwapError(exc.path, str(exc)) from None


def _check_free_space(
    cfd: int, checkpoints_dir: Path, source: Path, entries: list[CheckpointEntry], copy_mode: str
) -> None:
    """Refuses a copy that would not fit in what unprivileged users may still use (f_bavail, f_favail): the
    blocks the filesystem reserves for root stay untouched, whoever the fork runs as. Sizes are apparent sizes,
    so a sparse file counts as the bytes a copy writes. Hardlinks copy nothing; reflinks may fall back to a copy
    in auto mode, so they are counted like one."""
    if copy_mode == "hardlink":
        return
    needed = sum(e.stat.st_size for e in entries if not e.is_dir)
    fs = os.fstatvfs(cfd)
    free = fs.f_bavail * fs.f_frsize
    if needed > free or (fs.f_files and len(entries) + 1 > fs.f_favail):
        raise SwapError(
            checkpoints_dir,
            f"{printable(checkpoints_dir)}: no space left for a copy of {printable(source)} ({_human(needed)} in "
            f"{len(entries) + 1} inodes, {_human(free)} free for users); free space there or use copy_mode reflink "
            f"or hardlink.",
        )


def _human(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    size = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        size /= 1024
        if size < 1024 or unit == "TiB":
            break
    return f"{size:.1f} {unit}"


def _open_source(source: Path) -> int:
    try:
        return open_checkpoint_dir(source)
    except AdapterError as exc:
        raise SwapError(source, str(exc)) from None


def stage_checkpoint(
    source: Path,
    checkpoints_dir: Path,
    fork_id: str,
    *,
    copy_mode: str = "auto",
    progress: Progress | None = None,
    source_fd: int | None = None,
    run_fd: int | None = None,
    limits: TreeLimits | None = None,
) -> StagedCheckpoint:
    """Copies the checkpoint `source` to `checkpoints_dir/.fork-stage-<fork_id>`, durably, and checks it.

    copy_mode: "auto" (reflink where the filesystem can, else copy), "reflink" (fail if it can't),
    "copy", or "hardlink" (the stage shares the source's inodes: later writes to the source change
    0000 too). A stale stage of the same id is removed first. On failure the stage is removed and
    nothing else in `checkpoints_dir` has changed.

    `source_fd`: the source as the resolver opened (and checked) it; `source` then only names it. `run_fd`: see
    _open_checkpoints_dir. `limits`: bounds on the source tree, checked (with the free space) before copying.
    """
    name = stage_name(fork_id)
    if copy_mode not in COPY_MODES:
        raise ValueError(f"copy_mode {copy_mode!r} is not one of {', '.join(COPY_MODES)}")
    stage = checkpoints_dir / name
    cfd = _open_checkpoints_dir(checkpoints_dir, run_fd)
    try:
        # A 0000 that install would refuse (a symlink, a file) is refused before a whole adapter is copied.
        _check_live_is_dir(checkpoints_dir, lstat_at(cfd, LIVE_NAME))
        src_fd = _open_source(source) if source_fd is None else os.dup(source_fd)
        try:
            src_stat = os.fstat(src_fd)
            stale = lstat_at(cfd, name)
            if stale is not None and (stale.st_ino, stale.st_dev) == (src_stat.st_ino, src_stat.st_dev):
                raise SwapError(source, f"{printable(source)}: is the staging directory itself; fork from a step.")
            try:
                # Bounds first: a tree of 100,000 files or a sparse 100 GB file is refused before anything
                # reads it whole or writes a byte of it.
                entries = walk_checkpoint(src_fd, source, limits)
                _check_free_space(cfd, checkpoints_dir, source, entries, copy_mode)
                check_adapter(source, dir_fd=src_fd, limits=limits)
            except AdapterError as exc:
                raise SwapError(exc.path, str(exc)) from None
            try:
                _remove_entry(cfd, name)
                os.mkdir(name, 0o700, dir_fd=cfd)  # private until its contents are complete
            except OSError as exc:
                raise _staging_error(exc, source, stage) from None
            try:
                return _fill_stage(source, src_fd, stage, cfd, copy_mode, progress, limits)
            except BaseException:
                _remove_quietly(cfd, name)
                raise
        finally:
            os.close(src_fd)
    finally:
        os.close(cfd)


def _fill_stage(
    source: Path,
    src_fd: int,
    stage: Path,
    cfd: int,
    copy_mode: str,
    progress: Progress | None,
    limits: TreeLimits | None = None,
) -> StagedCheckpoint:
    stage_fd = os.open(stage.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=cfd)
    try:
        stager = _Stager(source, src_fd, stage, stage_fd, copy_mode, progress)
        try:
            entries = _walk(source, src_fd, limits)
            fingerprints = stager.copy_tree(entries)
            _copy_owner_and_mode(os.fstat(src_fd), stage_fd)
            _fsync_dir(stage_fd)
            # Nothing in the source changed while it was copied and digested, so the digest is the stage's.
            stager.recheck(entries, fingerprints, limits)
            info = check_adapter(stage, dir_fd=stage_fd, limits=limits)
            if stager.digest is None:  # check_adapter saw the file, so the walk did too: not expected
                raise SwapError(stage, f"{printable(stage)}: the adapter was not digested while staged; report a bug.")
        except AdapterError as exc:  # the message names the source or the staged file
            raise SwapError(exc.path, str(exc)) from None
        except _SourceChanged as exc:
            raise SwapError(
                source,
                f"{printable(source)}: {exc} during the fork; wait until the checkpoint is completely written "
                f"and fork again.",
            ) from None
        except _ReflinkUnsupported:
            raise SwapError(
                stage,
                f"{printable(stage.parent)}: the filesystem cannot reflink (copy_mode reflink); use copy_mode "
                f"auto or copy.",
            ) from None
        except OSError as exc:
            raise _staging_error(exc, source, stage) from None
        methods = stager.methods or {"copy"}
        method = methods.pop() if len(methods) == 1 else "copy"
        log.info("staged %s into %s: %d bytes by %s", source, stage, info.total_bytes, method)
        return StagedCheckpoint(
            path=stage,
            fork_id=stage.name[len(STAGE_PREFIX) :],
            digest=stager.digest,
            files=info.files,
            bytes=info.total_bytes,
            method=method,
            inode=os.fstat(stage_fd).st_ino,
            digest_s=stager.digest_wait_s,
        )
    finally:
        os.close(stage_fd)


def _staging_error(exc: OSError, source: Path, stage: Path) -> SwapError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return SwapError(
            stage,
            f"{printable(stage.parent)}: no space left while copying {printable(source)} into it; free space "
            f"there or use copy_mode reflink or hardlink.",
        )
    where = printable(exc.filename) if isinstance(exc.filename, str) else printable(source)
    return SwapError(
        stage, f"{where}: {exc.strerror or exc} while staging {printable(source)}; check permissions and disk."
    )


def _remove_quietly(dir_fd: int, name: str) -> None:
    try:
        _remove_entry(dir_fd, name)
    except OSError as exc:  # the original error matters more; the next stage removes it anyway
        log.warning("could not remove %s after a failed stage: %s", name, exc)


# ------------------------------------------------------------------------------------------ install


def _digest_matches(cfd: int, checkpoints_dir: Path, name: str, new_digest: str) -> bool:
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=cfd)
    try:
        return adapter_digest(checkpoints_dir / name, dir_fd=fd) == new_digest
    except (AdapterError, OSError):
        return False
    finally:
        os.close(fd)


def _which_is_new(
    cfd: int, checkpoints_dir: Path, candidates: dict[str, os.stat_result], new_digest: str, stage_inode: int | None
) -> str | None:
    """Which of the candidate entries holds the staged checkpoint.

    The stage directory's inode travels with it through renames and exchanges, so when the caller
    passes it, one fstatat answers. Without it, or on a filesystem whose inode numbers changed (some
    FUSE and network filesystems after a remount), the adapter digests decide; if both hold the same
    tensors, 0000 counts as new (the fork changed no weights).
    """
    if stage_inode is not None:
        for name, info in candidates.items():
            if info.st_ino == stage_inode:
                return name
    for name in candidates:
        if _digest_matches(cfd, checkpoints_dir, name, new_digest):
            return name
    return None


def _plan_install(has_live: bool, has_stage: bool, has_retired: bool, new: str | None) -> str:
    """Pure: the next operation for the names present and which entry holds the new adapter ("live" is 0000,
    "stage", or None for neither).

    Returns one of: "exchange" (stage <-> 0000), "retire" (stage -> retired), "promote" (stage -> 0000),
    "done", or "error:<reason>".
    """
    if has_stage and has_live:
        if has_retired:
            return "error:conflict"
        if new == "stage":
            return "exchange"
        if new == "live":
            return "retire"  # exchanged earlier; the stage name holds the old checkpoint
        return "error:neither"
    if has_stage:
        return "promote" if new == "stage" else "error:neither"
    if has_live:
        return "done" if new == "live" else "error:stage-gone"
    return "error:retired-only" if has_retired else "error:nothing"


def install_staged(
    checkpoints_dir: Path,
    fork_id: str,
    new_digest: str,
    *,
    stage_inode: int | None = None,
    allow_exchange: bool = True,
    run_fd: int | None = None,
) -> SwapResult:
    """Brings `checkpoints_dir` to: 0000 is the staged checkpoint, the previous 0000 at .fork-retired-<id>.

    Idempotent: after a crash at any point inside it, call it again with the same arguments. Pass
    `stage_inode` (StagedCheckpoint.inode) so it can tell old from new without reading adapters;
    without it the adapter digests decide, which reads them. `allow_exchange=False` forces the
    rename-aside path, which leaves a moment without 0000.
    """
    stage, retired = stage_name(fork_id), retired_name(fork_id)
    cfd = _open_checkpoints_dir(checkpoints_dir, run_fd)
    try:
        how, resumed = "none", False
        for step in range(4):  # the longest path is aside, promote, done
            present = _present(cfd, checkpoints_dir, (LIVE_NAME, stage, retired))
            candidates = {n: i for n, i in present.items() if i is not None and n != retired}
            new_name = _which_is_new(cfd, checkpoints_dir, candidates, new_digest, stage_inode)
            action = _plan_install(
                present[LIVE_NAME] is not None,
                present[stage] is not None,
                present[retired] is not None,
                {LIVE_NAME: "live", stage: "stage"}.get(new_name or ""),
            )
            if step == 0:
                resumed = action == "retire" or (action == "promote" and present[retired] is not None)
            if action == "done":
                _fsync_dir(cfd)  # a crash may have come between the last rename and its fsync
                left = checkpoints_dir / retired if lstat_at(cfd, retired) is not None else None
                return SwapResult(checkpoints_dir / LIVE_NAME, new_digest, how, left, resumed)
            if action.startswith("error:"):
                raise _install_error(action, checkpoints_dir, stage, retired, new_digest)
            used = _apply(action, cfd, stage, retired, allow_exchange=allow_exchange)
            if how == "none" and used != "retire":
                how = used
        raise SwapError(checkpoints_dir, f"{printable(checkpoints_dir)}: the install did not settle; report a bug.")
    except OSError as exc:
        raise SwapError(
            checkpoints_dir,
            f"{printable(checkpoints_dir)}: {exc.strerror or exc} while installing fork {fork_id}; fix the cause "
            f"and install again (the step is safe to repeat).",
        ) from None
    finally:
        os.close(cfd)


def _present(cfd: int, checkpoints_dir: Path, names: tuple[str, ...]) -> dict[str, os.stat_result | None]:
    """lstat of each name; anything but a real directory under our names is refused."""
    present = {name: lstat_at(cfd, name) for name in names}
    _check_live_is_dir(checkpoints_dir, present.get(LIVE_NAME))
    for name, info in present.items():
        if info is not None and not stat.S_ISDIR(info.st_mode):
            shown = printable(checkpoints_dir / name)
            raise SwapError(checkpoints_dir / name, f"{shown}: is not a directory; remove it and fork again.")
    return present


def _apply(action: str, cfd: int, stage: str, retired: str, *, allow_exchange: bool) -> str:
    """Performs one planned rename (then fsyncs checkpoints/); returns how: exchange, aside, rename, retire."""
    if action == "exchange":
        if allow_exchange:
            try:
                exchange_dirs(cfd, stage, LIVE_NAME)
                _fsync_dir(cfd)
                return "exchange"
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                log.info("this filesystem cannot exchange directories (%s); renaming 0000 aside", exc.strerror)
        # Rename-aside: 0000 is missing until the next step (promote), which a re-run also performs.
        rename_noreplace(cfd, LIVE_NAME, retired)
        return "aside"
    if action == "retire":
        rename_noreplace(cfd, stage, retired)
        _fsync_dir(cfd)
        return "retire"
    if action == "promote":
        rename_noreplace(cfd, stage, LIVE_NAME)
        _fsync_dir(cfd)
        return "rename"
    raise AssertionError(action)


def _install_error(action: str, checkpoints_dir: Path, stage: str, retired: str, digest: str) -> SwapError:
    live = printable(checkpoints_dir / LIVE_NAME)
    reasons = {
        "error:conflict": (
            f"{printable(checkpoints_dir / retired)}: already exists beside {stage} and 0000, so this fork id was "
            f"used before; remove that directory after checking it, then install again."
        ),
        "error:neither": (
            f"{printable(checkpoints_dir / stage)}: neither it nor 0000 holds the staged adapter ({digest}); "
            f"stage the checkpoint again."
        ),
        "error:stage-gone": (
            f"{live}: does not hold the staged adapter ({digest}) and {stage} is gone; stage the checkpoint again."
        ),
        "error:retired-only": (
            f"{live}: is missing and only {retired} (the previous checkpoint) is left; rename it back to 0000 "
            f"and fork again."
        ),
        "error:nothing": f"{live}: is missing and so is {stage}; stage the checkpoint again.",
    }
    return SwapError(checkpoints_dir, reasons[action])


# ------------------------------------------------------------------------------------------ cleanup


def _remove_named(checkpoints_dir: Path, name: str, run_fd: int | None) -> None:
    cfd = _open_checkpoints_dir(checkpoints_dir, run_fd)
    try:
        if _remove_entry(cfd, name):
            _fsync_dir(cfd)
    except OSError as exc:
        shown = printable(checkpoints_dir / name)
        raise SwapError(
            checkpoints_dir / name, f"{shown}: cannot remove ({exc.strerror}); remove it by hand."
        ) from None
    finally:
        os.close(cfd)


def discard_retired(checkpoints_dir: Path, fork_id: str, *, run_fd: int | None = None) -> None:
    """Removes .fork-retired-<id> (the checkpoint 0000 held before the fork); nothing if it is gone."""
    _remove_named(checkpoints_dir, retired_name(fork_id), run_fd)


def abort_staged(checkpoints_dir: Path, fork_id: str, *, run_fd: int | None = None) -> None:
    """Removes the stage of a fork that failed before install_staged was called; nothing if it is gone.

    Once install_staged has started, a fork can only go forward: call install_staged again instead.
    Refuses when 0000 is missing and the retired copy exists (a half-done rename-aside), because
    removing the stage then would leave the run without 0000.
    """
    cfd = _open_checkpoints_dir(checkpoints_dir, run_fd)
    try:
        missing_live = lstat_at(cfd, LIVE_NAME) is None
        has_retired = lstat_at(cfd, retired_name(fork_id)) is not None
    finally:
        os.close(cfd)
    if missing_live and has_retired:
        shown = printable(checkpoints_dir / LIVE_NAME)
        raise SwapError(
            checkpoints_dir,
            f"{shown}: is missing because fork {fork_id} was half installed; finish it with install_staged "
            f"instead of aborting.",
        )
    _remove_named(checkpoints_dir, stage_name(fork_id), run_fd)


def leftovers(checkpoints_dir: Path, *, run_fd: int | None = None) -> list[tuple[str, str]]:
    """(kind, fork id) for each .fork-stage-* ("stage") and .fork-retired-* ("retired") entry, sorted."""
    try:
        cfd = _open_checkpoints_dir(checkpoints_dir, run_fd)
    except SwapError:
        return []
    try:
        names = os.listdir(cfd)
    finally:
        os.close(cfd)
    found = []
    for name in names:
        match = _LEFTOVER.fullmatch(name)
        if match:
            found.append(("stage" if match.group(1) == STAGE_PREFIX else "retired", match.group(2)))
    return sorted(found)


def settle_leftover(checkpoints_dir: Path, fork_id: str, *, run_fd: int | None = None) -> str:
    """Cleans up after a fork no journal knows: leaves 0000 a complete checkpoint and removes the rest.

    If 0000 is missing, a half-done rename-aside is completed (the stage had been checked before
    install began) or, with no stage, the retired copy is put back. Then the stage and the retired
    copy are removed. Returns what it did, for the log.
    """
    stage, retired = stage_name(fork_id), retired_name(fork_id)
    cfd = _open_checkpoints_dir(checkpoints_dir, run_fd)
    try:
        present = _present(cfd, checkpoints_dir, (LIVE_NAME, stage, retired))
        done = []
        if present[LIVE_NAME] is None:
            if present[stage] is not None and present[retired] is not None:
                rename_noreplace(cfd, stage, LIVE_NAME)
                done.append(f"completed the install of {stage}")
            elif present[retired] is not None:
                rename_noreplace(cfd, retired, LIVE_NAME)
                done.append(f"put {retired} back as 0000")
            _fsync_dir(cfd)
        for name in (stage, retired):
            if _remove_entry(cfd, name):
                done.append(f"removed {name}")
        _fsync_dir(cfd)
        return "; ".join(done) or "nothing to do"
    except OSError as exc:
        raise SwapError(
            checkpoints_dir,
            f"{printable(checkpoints_dir)}: {exc.strerror or exc} while cleaning up fork {fork_id}; "
            f"check the directory by hand.",
        ) from None
    finally:
        os.close(cfd)
