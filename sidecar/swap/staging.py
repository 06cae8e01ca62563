"""Staging: copying a source checkpoint into `checkpoints/.fork-stage-<id>` (reflink, copy or hardlink), fsynced and
checked, its adapter digest computed while the bytes are copied (in copy mode from the copy itself: copy_digest)."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
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
    check_adapter,
    digest_open_file,
    open_checkpoint_dir,
    printable,
    read_header,
    walk_checkpoint,
)
from sidecar.fsops import libc as _libc
from sidecar.fsops import lstat_at
from sidecar.protocol.atomic_write import fsync_dir_fd as _fsync_dir
from sidecar.swap.copy_digest import CopyDigest
from sidecar.swap.dirs import (
    LIVE_NAME,
    STAGING_PREFIX,
    SwapError,
    check_live_is_dir,
    open_checkpoints_dir,
    remove_entry,
    staging_name,
)

__all__ = ["COPY_CHUNK", "COPY_MODES", "Progress", "StagingCopy", "copy_to_staging"]

log = logging.getLogger("sidecar.swap")

COPY_MODES = ("auto", "reflink", "hardlink", "copy")
# Per copy_file_range call; also the progress granularity, and how far copy_digest's hashing trails the copy: 64 MiB
# left a quarter of a 256 MiB adapter to hash after the copy; with 8 MiB a copy-mode swap of 256 MiB was 12-20 %
# faster, warm and cold, on the loaded 2-core machine (4 MiB no better), the syscalls costing nothing measurable.
COPY_CHUNK = 8 << 20

_SYNC_FILE_RANGE_WRITE = 2
_FICLONE = 0x40049409  # _IOW(0x94, 9, int); fcntl.FICLONE only exists from Python 3.12
# Errors meaning "this filesystem (or kernel) cannot do that", as opposed to a real failure.
_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV})

Progress = Callable[[int, int], None]  # (bytes done, bytes total)


@dataclass(frozen=True)
class StagingCopy:
    path: Path  # checkpoints/.fork-stage-<id>
    fork_id: str
    digest: str  # adapter digest of the staged adapter_model.safetensors
    files: tuple[str, ...]  # relative paths, sorted
    bytes: int  # total size of the files
    method: str  # "reflink", "copy" or "hardlink"
    inode: int  # of the stage directory: lets install_staging tell old from new without reading them
    digest_s: float = 0.0  # how long staging waited for the digest once the bytes were in place (copies overlap it)


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


def _copy_data(
    src_fd: int,
    dst_fd: int,
    size: int,
    on_bytes: Callable[[int], None],
    label: str,
    landed: Callable[[int], None] | None = None,
) -> None:
    """Copies `size` bytes in the kernel (copy_file_range), falling back to read/write where it can't.
    `landed` is told each prefix of `dst` that now holds its final bytes."""
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
        if landed is not None:
            landed(position)
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
    """Digests the source adapter file while the main thread links or clones it, so its bytes are read once
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

    def stop(self) -> None:
        self.join()

    def result(self) -> str:
        if self.error is not None:
            raise self.error
        assert self.digest is not None
        return self.digest


_Digester = _DigestThread | CopyDigest


class _StagingCopier:
    """Copies one checkpoint tree from `src_fd` into `stage_fd`, checking the source stays put."""

    def __init__(
        self, source: Path, src_fd: int, staging: Path, staging_fd: int, copy_mode: str, progress: Progress | None
    ) -> None:
        self.source, self.src_fd = source, src_fd
        self.staging, self.staging_fd = staging, staging_fd
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
        dir_fds = {"": (self.src_fd, self.staging_fd)}
        fingerprints: dict[str, _Fingerprint] = {}
        try:
            for entry in entries:
                parent, _, name = entry.relpath.rpartition("/")
                src_dir, dst_dir = dir_fds[parent]
                if entry.is_dir:
                    dir_fds[entry.relpath] = self._make_dir(name, src_dir, dst_dir, entry)
                else:
                    fingerprints[entry.relpath] = self._copy_file(entry, name, src_dir, dst_dir)
            # Children before parents. The stage directory itself is fsynced by _fill_staging, once, after its owner
            # and mode are set: an fsync of it here too would cost one more journal commit and disk flush (4-8 ms
            # on the 2-core machine's ext4) for nothing the second one does not cover.
            for relpath in sorted((r for r in dir_fds if r), key=len, reverse=True):
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
            if self.mode == "hardlink":
                digester = self._start_digest(entry, src)
                try:
                    self._link_file(entry, name, src, (src_dir, dst_dir), before)
                finally:
                    self._wait_digest(digester)  # even on failure: the thread reads `src`, closed below
                self._keep_digest(digester)
            else:
                self._write_copy(entry, name, src, dst_dir, before.size)
            self._check_unchanged(entry, name, src, src_dir, before)
            return before
        finally:
            os.close(src)

    def _start_digest(self, entry: CheckpointEntry, src: int, dst: int | None = None) -> _Digester | None:
        """Starts digesting the adapter file while its bytes are put in place.

        A copy (`dst` given, copy mode decided) is hashed from its own pages as they land (copy_digest): one read of
        the source, no second pass. A link or a clone is hashed from the source: its bytes are read from disk once
        (or come from the page cache, where a just-written checkpoint usually is; a clone would be cold, page cache
        being per inode), and hashing overlaps the link or clone and the fsync. Either way the source's
        fingerprint, taken before and checked after the digest, shows the bytes did not change meanwhile, so the
        digest is of one consistent state of the source, and it is the staged file's.
        """
        if entry.relpath != ADAPTER_FILE:
            return None
        header = read_header(src, self.source / ADAPTER_FILE)  # fail before copying gigabytes of a bad file
        if dst is not None and self.mode == "copy":
            try:
                return CopyDigest(dst, header)
            except (OSError, ValueError) as exc:  # a filesystem that cannot mmap (some FUSE ones): read the source
                log.info("cannot map the staged %s (%s); digesting the source instead", ADAPTER_FILE, exc)
        thread = _DigestThread(src, self.source / ADAPTER_FILE)
        thread.start()
        return thread

    def _wait_digest(self, digester: _Digester | None) -> None:
        if digester is not None:
            started = time.perf_counter()
            digester.stop()
            self.digest_wait_s = time.perf_counter() - started

    def _keep_digest(self, digester: _Digester | None) -> None:
        if digester is not None:
            self.digest = digester.result()

    def _write_copy(self, entry: CheckpointEntry, name: str, src: int, dst_dir: int, size: int) -> None:
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC  # RDWR: copy_digest maps it
        dst = os.open(name, flags, 0o600, dir_fd=dst_dir)
        try:
            digester = self._start_digest(entry, src, dst if self.mode == "copy" else None)
            try:
                self.methods.add(self._fill(src, dst, size, entry.relpath, digester))
                _copy_owner_and_mode(entry.stat, dst)
                # Meanwhile the digest's last pieces are hashed: hashing overlaps the writeback. Per file, not one
                # syncfs of the staging filesystem: syncfs also waits for every other writer there (other runs'
                # checkpoints, gigabytes that are none of this fork's business), and it reports writeback errors
                # per filesystem (any tenant's failed write would fail this fork) or, before Linux 5.8, not at all
                # (a lost write of ours would go unseen). The fsyncs of the small files cost a few ms in all.
                os.fsync(dst)
            finally:
                self._wait_digest(digester)  # even on failure: it reads `dst` (and maybe `src`), closed below
            self._keep_digest(digester)
        finally:
            os.close(dst)

    def _fill(self, src: int, dst: int, size: int, relpath: str, digester: _Digester | None) -> str:
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
        landed = digester.copied if isinstance(digester, CopyDigest) else None
        _copy_data(src, dst, size, self._advance, relpath, landed)
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
                    f"{printable(self.source / entry.relpath)}: cannot be hardlinked into {printable(self.staging)} "
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


def copy_to_staging(
    source: Path,
    checkpoints_dir: Path,
    fork_id: str,
    *,
    copy_mode: str = "auto",
    progress: Progress | None = None,
    source_fd: int | None = None,
    run_fd: int | None = None,
    limits: TreeLimits | None = None,
) -> StagingCopy:
    """Copies the checkpoint `source` to `checkpoints_dir/.fork-stage-<fork_id>`, durably, and checks it.

    copy_mode: "auto" (reflink where the filesystem can, else copy), "reflink" (fail if it can't),
    "copy", or "hardlink" (the stage shares the source's inodes: later writes to the source change
    0000 too). A stale stage of the same id is removed first. On failure the stage is removed and
    nothing else in `checkpoints_dir` has changed.

    `source_fd`: the source as the resolver opened (and checked) it; `source` then only names it. `run_fd`: see
    open_checkpoints_dir. `limits`: bounds on the source tree, checked (with the free space) before copying.
    """
    name = staging_name(fork_id)
    if copy_mode not in COPY_MODES:
        raise ValueError(f"copy_mode {copy_mode!r} is not one of {', '.join(COPY_MODES)}")
    staging = checkpoints_dir / name
    cfd = open_checkpoints_dir(checkpoints_dir, run_fd)
    try:
        # A 0000 that install would refuse (a symlink, a file) is refused before a whole adapter is copied.
        check_live_is_dir(checkpoints_dir, lstat_at(cfd, LIVE_NAME))
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
                remove_entry(cfd, name)
                os.mkdir(name, 0o700, dir_fd=cfd)  # private until its contents are complete
            except OSError as exc:
                raise _staging_error(exc, source, staging) from None
            try:
                return _fill_staging(source, src_fd, staging, cfd, copy_mode, progress, entries, limits)
            except BaseException:
                _remove_quietly(cfd, name)
                raise
        finally:
            os.close(src_fd)
    finally:
        os.close(cfd)


def _fill_staging(
    source: Path,
    src_fd: int,
    staging: Path,
    cfd: int,
    copy_mode: str,
    progress: Progress | None,
    entries: list[CheckpointEntry],
    limits: TreeLimits | None = None,
) -> StagingCopy:
    """Copy `entries`, the source as it was walked and checked (check_adapter): a file deleted since is a source
    that changed. Walked again here, a checkpoint being deleted was copied as the part of it still there, and the
    fork failed on the stage ("adapter_model.safetensors: missing; the directory is not a LoRA checkpoint")."""
    staging_fd = os.open(staging.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=cfd)
    try:
        copier = _StagingCopier(source, src_fd, staging, staging_fd, copy_mode, progress)
        try:
            fingerprints = copier.copy_tree(entries)
            _copy_owner_and_mode(os.fstat(src_fd), staging_fd)
            _fsync_dir(staging_fd)  # its entries and its owner and mode, before install renames it
            # Nothing in the source changed while it was copied and digested, so the digest is the stage's.
            copier.recheck(entries, fingerprints, limits)
            info = check_adapter(staging, dir_fd=staging_fd, limits=limits)
            if copier.digest is None:  # check_adapter saw the file, so the walk did too: not expected
                raise SwapError(
                    staging, f"{printable(staging)}: the adapter was not digested while staged; report a bug."
                )
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
                staging,
                f"{printable(staging.parent)}: the filesystem cannot reflink (copy_mode reflink); use copy_mode "
                f"auto or copy.",
            ) from None
        except OSError as exc:
            raise _staging_error(exc, source, staging) from None
        methods = copier.methods or {"copy"}
        method = methods.pop() if len(methods) == 1 else "copy"
        log.info("staged %s into %s: %d bytes by %s", source, staging, info.total_bytes, method)
        return StagingCopy(
            path=staging,
            fork_id=staging.name[len(STAGING_PREFIX) :],
            digest=copier.digest,
            files=info.files,
            bytes=info.total_bytes,
            method=method,
            inode=os.fstat(staging_fd).st_ino,
            digest_s=copier.digest_wait_s,
        )
    finally:
        os.close(staging_fd)


def _staging_error(exc: OSError, source: Path, staging: Path) -> SwapError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return SwapError(
            staging,
            f"{printable(staging.parent)}: no space left while copying {printable(source)} into it; free space "
            f"there or use copy_mode reflink or hardlink.",
        )
    where = printable(exc.filename) if isinstance(exc.filename, str) else printable(source)
    return SwapError(
        staging, f"{where}: {exc.strerror or exc} while staging {printable(source)}; check permissions and disk."
    )


def _remove_quietly(dir_fd: int, name: str) -> None:
    try:
        remove_entry(dir_fd, name)
    except OSError as exc:  # the original error matters more; the next stage removes it anyway
        log.warning("could not remove %s after a failed stage: %s", name, exc)
