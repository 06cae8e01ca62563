"""MarkerWatcher against real inotify and real files, parametrised over both backends.

Nothing here asserts on time: waits poll for a condition with a deadline, and "nothing was reported" is checked by
writing a sentinel marker afterwards and waiting for it (events are handled in order, and a scan that finds the
sentinel has also seen what was written before it).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sidecar.watch import NETWORK_FILESYSTEMS, MarkerWatcher, WatchMode, fs_type_of, needs_polling
from sidecar.watch import inotify as watch_inotify
from sidecar.watch import loop as watch_loop
from tests.support.threads import threads_since

WAIT_S = 30.0  # a hang guard only (see above); also how long a test may hold the watcher thread in a callback
WriteSoon = Callable[[Callable[[], object]], None]


class Recorder:
    """An on_marker callback that remembers each report and what the marker held at that moment."""

    def __init__(self) -> None:
        self.calls: list[Path] = []
        self.contents: dict[Path, list[bytes | str]] = {}
        self._cond = threading.Condition()

    def __call__(self, model_dir: Path) -> None:
        marker = model_dir / ".fork"
        content: bytes | str
        if marker.is_symlink():
            content = "symlink"
        elif marker.is_file():
            content = marker.read_bytes()
        else:
            content = "fifo" if marker.is_fifo() else "dir" if marker.is_dir() else "gone"
        with self._cond:
            self.calls.append(model_dir)
            self.contents.setdefault(model_dir, []).append(content)
            self._cond.notify_all()

    @property
    def reported(self) -> set[Path]:
        with self._cond:
            return set(self.calls)

    def wait_for(self, *model_dirs: Path, timeout: float = WAIT_S) -> None:
        with self._cond:
            ok = self._cond.wait_for(lambda: set(model_dirs) <= set(self.calls), timeout)
        assert ok, f"not reported within {timeout}s: {sorted(set(model_dirs) - self.reported)}"


def make_run(root: Path, project: str, model: str) -> Path:
    run = root / project / "models" / model
    (run / "checkpoints" / "0000").mkdir(parents=True)
    return run


def backdate(path: Path) -> None:
    """Make a marker look long written, as one left before the daemon started would."""
    old = time.time() - 60
    os.utime(path, (old, old), follow_symlinks=False)


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def open_fds() -> int:
    return sum(1 for _ in Path("/proc/self/fd").iterdir())


def inotify_watched_inodes() -> list[int]:
    """Inode numbers of every inotify watch this process holds, as the kernel lists them in /proc/self/fdinfo."""
    inodes = []
    for fd in Path("/proc/self/fd").iterdir():
        try:
            if str(fd.readlink()) != "anon_inode:inotify":
                continue
            lines = Path(f"/proc/self/fdinfo/{fd.name}").read_text().splitlines()
        except OSError:
            continue
        inodes += [int(line.split("ino:")[1].split()[0], 16) for line in lines if line.startswith("inotify wd:")]
    return inodes


@pytest.fixture(params=["inotify", "poll"])
def mode(request: pytest.FixtureRequest) -> WatchMode:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    art = tmp_path / "art"
    art.mkdir()
    return art


@pytest.fixture
def made() -> Iterator[list[MarkerWatcher]]:
    watchers: list[MarkerWatcher] = []
    yield watchers
    for watcher in watchers:
        watcher.stop()


def _factory(mode: WatchMode, made: list[MarkerWatcher]) -> Callable[..., MarkerWatcher]:
    def make(roots: list[Path], on_marker: Callable[[Path], None], **kwargs: object) -> MarkerWatcher:
        # A long rescan_interval: with inotify, every report in these tests must come from an event (or the one scan
        # a test asks for), never from the periodic rescan covering for a missed event.
        options: dict[str, object] = {"mode": mode, "poll_interval": 0.05, "rescan_interval": 3600.0, **kwargs}
        watcher = MarkerWatcher(roots, on_marker, **options)  # type: ignore[arg-type]
        made.append(watcher)
        return watcher

    return make


@pytest.fixture
def make_watcher(mode: WatchMode, made: list[MarkerWatcher]) -> Callable[..., MarkerWatcher]:
    """MarkerWatcher on both backends (the test runs once per backend)."""
    return _factory(mode, made)


@pytest.fixture
def make_inotify_watcher(made: list[MarkerWatcher]) -> Callable[..., MarkerWatcher]:
    """MarkerWatcher for what only inotify has: watches, lost events, queue overflow, the watch limit."""
    return _factory("inotify", made)


@pytest.fixture
def write_soon() -> Iterator[WriteSoon]:
    """Run a filesystem change from another thread shortly after, while the watcher thread is waiting."""
    threads: list[threading.Thread] = []

    def schedule(change: Callable[[], object]) -> None:
        def run() -> None:
            time.sleep(0.02)
            change()

        thread = threading.Thread(target=run)
        thread.start()
        threads.append(thread)

    yield schedule
    for thread in threads:
        thread.join()


# Markers in existing runs ----------------------------------------------------------------------------------------


def test_start_reports_markers_already_there(root: Path, make_watcher: Callable[..., MarkerWatcher]) -> None:
    with_marker, without = make_run(root, "p", "a"), make_run(root, "p", "b")
    (with_marker / ".fork").write_text("step: 2\n")
    backdate(with_marker / ".fork")
    rec = Recorder()
    watcher = make_watcher([root], rec)
    watcher.start()
    assert rec.calls == [with_marker]  # before start() returned, and nothing for the run without one
    assert watcher.run_dirs() == [with_marker, without]


def test_marker_written_just_before_start_is_reported_once_settled(
    root: Path, make_watcher: Callable[..., MarkerWatcher]
) -> None:
    run = make_run(root, "p", "a")
    (run / ".fork").write_text("step: 2\n")
    rec = Recorder()
    make_watcher([root], rec).start()
    rec.wait_for(run)
    assert set(rec.contents[run]) == {b"step: 2\n"}


def test_touch_in_existing_run(root: Path, make_watcher: Callable[..., MarkerWatcher], write_soon: WriteSoon) -> None:
    run = make_run(root, "p", "a")
    rec = Recorder()
    make_watcher([root], rec).start()
    write_soon((run / ".fork").touch)
    rec.wait_for(run)
    assert set(rec.contents[run]) == {b""}


def test_shell_redirect_is_reported_with_its_content(
    root: Path, make_watcher: Callable[..., MarkerWatcher], write_soon: WriteSoon
) -> None:
    run = make_run(root, "p", "a")
    rec = Recorder()
    make_watcher([root], rec).start()
    write_soon(lambda: subprocess.run(["sh", "-c", "echo step: 3 > .fork"], cwd=run, check=True))
    rec.wait_for(run)
    assert set(rec.contents[run]) == {b"step: 3\n"}  # never the empty file that exists between create and write


def test_slow_writer_is_not_reported_half_written(
    root: Path, make_watcher: Callable[..., MarkerWatcher], write_soon: WriteSoon
) -> None:
    run = make_run(root, "p", "a")
    rec = Recorder()
    make_watcher([root], rec).start()

    def write_in_two_parts() -> None:
        with open(run / ".fork", "w") as f:
            f.write("step: ")
            f.flush()
            time.sleep(0.05)
            f.write("4\n")

    write_soon(write_in_two_parts)
    rec.wait_for(run)
    assert set(rec.contents[run]) == {b"step: 4\n"}


def test_atomic_rename_into_place(
    root: Path, make_watcher: Callable[..., MarkerWatcher], write_soon: WriteSoon
) -> None:
    run = make_run(root, "p", "a")
    rec = Recorder()
    make_watcher([root], rec).start()

    def write_atomically() -> None:
        staged = run / ".fork.tmp-1234"
        staged.write_text("from_model: base\n")
        staged.rename(run / ".fork")

    write_soon(write_atomically)
    rec.wait_for(run)
    assert set(rec.contents[run]) == {b"from_model: base\n"}


def test_many_runs_each_touched_once(root: Path, make_watcher: Callable[..., MarkerWatcher]) -> None:
    runs = [make_run(root, f"p{i % 5}", f"m{i}") for i in range(500)]
    rec = Recorder()
    watcher = make_watcher([root], rec)
    watcher.start()
    assert len(watcher.run_dirs()) == 500
    for run in runs:
        (run / ".fork").touch()
    rec.wait_for(*runs)


def test_non_regular_markers_are_reported(
    root: Path, tmp_path: Path, make_watcher: Callable[..., MarkerWatcher], write_soon: WriteSoon
) -> None:
    # None of these is ever closed after writing, so no IN_CLOSE_WRITE comes; the daemon must still see them to
    # fail them with a reason.
    fifo, directory, symlink, hardlink = (make_run(root, "p", name) for name in ("fifo", "dir", "symlink", "hardlink"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("step: 1\n")
    rec = Recorder()
    make_watcher([root], rec).start()

    def create() -> None:
        os.mkfifo(fifo / ".fork")
        (directory / ".fork").mkdir()
        (symlink / ".fork").symlink_to(elsewhere)
        os.link(elsewhere, hardlink / ".fork")

    write_soon(create)
    rec.wait_for(fifo, directory, symlink, hardlink)
    assert rec.contents[fifo][0] == "fifo"
    assert rec.contents[directory][0] == "dir"
    assert rec.contents[symlink][0] == "symlink"
    assert rec.contents[hardlink][0] == b"step: 1\n"


# What must not be reported ---------------------------------------------------------------------------------------


def test_writes_below_and_beside_the_marker_are_ignored(root: Path, make_watcher: Callable[..., MarkerWatcher]) -> None:
    busy, sentinel = make_run(root, "p", "busy"), make_run(root, "p", "sentinel")
    rec = Recorder()
    watcher = make_watcher([root], rec)
    watcher.start()
    step = busy / "checkpoints" / "0001"
    step.mkdir()
    (step / "adapter_model.safetensors").write_bytes(b"x" * 4096)
    (busy / "trajectories" / "train").mkdir(parents=True)
    for i in range(50):
        (busy / "trajectories" / "train" / f"{i:04d}.jsonl").write_text("{}\n")
    (busy / "history.jsonl").write_text("{}\n")
    for name in (".fork.inprogress", ".fork.done", ".fork.failed", ".fork.tmp-1"):
        (busy / name).write_text("{}")
    (sentinel / ".fork").touch()
    rec.wait_for(sentinel)
    assert rec.reported == {sentinel}
    assert watcher.run_dirs() == [busy, sentinel]


def test_hidden_and_symlinked_dirs_are_not_runs(
    root: Path, tmp_path: Path, make_watcher: Callable[..., MarkerWatcher], write_soon: WriteSoon
) -> None:
    outside = make_run(tmp_path / "outside", "p", "real")
    (outside / ".fork").touch()
    (root / "p" / "models").mkdir(parents=True)
    (root / "p" / "models" / "linked").symlink_to(outside)
    (root / "linkedproject").symlink_to(outside.parent.parent)
    hidden = make_run(root, ".trash", "m")
    (hidden / ".fork").touch()
    sentinel = make_run(root, "p", "sentinel")
    rec = Recorder()
    watcher = make_watcher([root], rec)
    watcher.start()
    write_soon((sentinel / ".fork").touch)
    rec.wait_for(sentinel)
    assert rec.reported == {sentinel}
    assert watcher.run_dirs() == [sentinel]


# Directories appearing, moving and leaving -----------------------------------------------------------------------


def test_project_and_model_created_after_start(
    root: Path, make_watcher: Callable[..., MarkerWatcher], write_soon: WriteSoon
) -> None:
    rec = Recorder()
    watcher = make_watcher([root], rec)
    watcher.start()
    (root / "p" / "models").mkdir(parents=True)
    model = root / "p" / "models" / "m"
    write_soon(model.mkdir)
    wait_until(lambda: watcher.run_dirs() == [model], "the new model dir to be known")
    (model / ".fork").write_text("step: 5\n")
    rec.wait_for(model)
    assert set(rec.contents[model]) == {b"step: 5\n"}


def test_mkdir_p_then_marker_at_once(root: Path, make_watcher: Callable[..., MarkerWatcher]) -> None:
    # The classic race: the whole tree and the marker are written before the watcher handles the first IN_CREATE,
    # so the marker is found by listing the new dirs, possibly while it is still being written.
    rec = Recorder()
    make_watcher([root], rec).start()
    runs = []
    for i in range(20):
        run = root / f"new{i}" / "models" / "m"
        run.mkdir(parents=True)
        (run / ".fork").write_text(f"step: {i}\n")
        runs.append(run)
    rec.wait_for(*runs)
    for i, run in enumerate(runs):
        assert set(rec.contents[run]) == {f"step: {i}\n".encode()}


def test_moved_and_recreated_model_dirs(root: Path, make_watcher: Callable[..., MarkerWatcher]) -> None:
    a = make_run(root, "p", "a")
    rec = Recorder()
    watcher = make_watcher([root], rec)
    watcher.start()
    b = a.parent / "b"
    a.rename(b)
    wait_until(lambda: watcher.run_dirs() == [b], "the renamed model dir")
    (b / ".fork").touch()
    rec.wait_for(b)
    shutil.rmtree(b)
    b.mkdir()  # same name, a new directory: it needs its own watch
    (b / ".fork").write_text("step: 1\n")
    wait_until(lambda: b"step: 1\n" in rec.contents[b], "the marker in the recreated dir")
    assert a not in rec.reported


def test_removed_dirs_drop_their_watches(root: Path, make_inotify_watcher: Callable[..., MarkerWatcher]) -> None:
    for i in range(5):
        make_run(root, "gone", f"m{i}")
    kept = make_run(root, "kept", "m")
    before = len(inotify_watched_inodes())
    rec = Recorder()
    watcher = make_inotify_watcher([root], rec)
    watcher.start()
    assert len(inotify_watched_inodes()) - before == 1 + 2 * (1 + 1) + 5 + 1  # root, 2 projects + models, 6 runs
    shutil.rmtree(root / "gone")
    wait_until(lambda: watcher.run_dirs() == [kept], "the removed project to be forgotten")
    wait_until(lambda: len(inotify_watched_inodes()) - before == 4, "the removed dirs' watches to go")


def test_root_that_appears_after_start(tmp_path: Path, make_watcher: Callable[..., MarkerWatcher]) -> None:
    root = tmp_path / "not-yet"
    rec = Recorder()
    watcher = make_watcher([root], rec)
    watcher.start()
    assert watcher.run_dirs() == []
    run = make_run(root, "p", "m")
    (run / ".fork").write_text("step: 9\n")
    rec.wait_for(run)
    later = make_run(root, "p", "later")  # and it is watched (or polled) from then on
    (later / ".fork").touch()
    rec.wait_for(later)


def test_root_removed_and_recreated(root: Path, make_watcher: Callable[..., MarkerWatcher]) -> None:
    make_run(root, "p", "m")
    rec = Recorder()
    watcher = make_watcher([root], rec)
    watcher.start()
    shutil.rmtree(root)
    wait_until(lambda: watcher.run_dirs() == [], "the removed root to be forgotten")
    run = make_run(root, "p", "again")
    (run / ".fork").touch()
    rec.wait_for(run)


def test_set_roots_adds_and_removes_roots(
    root: Path, tmp_path: Path, make_watcher: Callable[..., MarkerWatcher]
) -> None:
    second = tmp_path / "second"
    first_run, second_run = make_run(root, "p", "a"), make_run(second, "p", "b")
    (second_run / ".fork").touch()
    backdate(second_run / ".fork")
    rec = Recorder()
    watcher = make_watcher([root], rec)
    watcher.start()
    assert rec.reported == set()
    watcher.set_roots([root, second])
    rec.wait_for(second_run)  # a marker already in the new root
    assert watcher.run_dirs() == [first_run, second_run]
    watcher.set_roots([second])
    wait_until(lambda: watcher.run_dirs() == [second_run], "the dropped root to be forgotten")
    (first_run / ".fork").touch()
    sentinel = make_run(second, "p", "sentinel")
    (sentinel / ".fork").touch()
    rec.wait_for(sentinel)
    assert first_run not in rec.reported


# Claims ----------------------------------------------------------------------------------------------------------


def claim_like_the_daemon(model_dir: Path) -> None:
    """What `claims.filesystem.take_marker_at` and the claim record do on a local filesystem: rename the marker to
    `.fork.inprogress`, then replace the claim with its record by rename."""
    os.rename(model_dir / ".fork", model_dir / ".fork.inprogress")
    (model_dir / ".fork.inprogress.tmp").write_text('{"fork_id": "x"}')
    os.replace(model_dir / ".fork.inprogress.tmp", model_dir / ".fork.inprogress")


def test_claims_are_reported_at_start_when_made_and_on_every_rescan(
    root: Path, make_watcher: Callable[..., MarkerWatcher]
) -> None:
    # The daemon adopts a claim whose claimer died from these reports alone (it no longer walks every run for them),
    # so they follow the markers' guarantees: the first scan, an event (or the poll) for a new one, every rescan.
    left, made, unclaimed, sentinel = (make_run(root, "p", name) for name in ("left", "made", "unclaimed", "sentinel"))
    (left / ".fork.inprogress").write_text("step: 1\n")
    markers, claims = Recorder(), Recorder()
    watcher = make_watcher([root], markers, on_claim=claims)
    watcher.start()
    assert claims.calls == [left]  # before start() returned
    (made / ".fork").write_text("step: 2\n")
    (unclaimed / ".fork").write_text("step: 3\n")
    markers.wait_for(made, unclaimed)
    claim_like_the_daemon(made)
    claims.wait_for(made)
    (sentinel / ".fork.inprogress").write_text("{}")
    claims.wait_for(sentinel)
    assert unclaimed not in claims.reported  # a marker is not a claim
    seen = claims.calls.count(left)
    watcher.rescan()
    wait_until(lambda: claims.calls.count(left) > seen, "the rescan to report the claim again")
    assert left in claims.reported and made in claims.reported


def test_owners_follow_new_runs_removed_runs_and_chown(root: Path, mode: WatchMode, made: list[MarkerWatcher]) -> None:
    # The daemon makes each owner's agent directory from owners() alone (no stat of every run every minute).
    if os.geteuid() != 0:
        pytest.skip("handing a directory to another uid needs root")
    other, third = 4242, 4343
    kept, handed = make_run(root, "p", "kept"), make_run(root, "p", "handed")
    os.chown(kept, other, -1)
    watcher = _factory(mode, made)([root], Recorder())
    watcher.start()
    assert watcher.owners() == {other, 0}
    os.chown(handed, third, -1)  # created by root, then handed over
    if mode == "poll":
        watcher.rescan()  # no events there: every full rescan reads a polled run's owner again
    wait_until(lambda: watcher.owners() == {other, third}, "the chown to be seen")
    make_run(root, "q", "late")
    wait_until(lambda: watcher.owners() == {other, third, 0}, "a new run's owner")
    shutil.rmtree(root / "p")
    wait_until(lambda: watcher.owners() == {0}, "the removed runs' owners to be forgotten")


# Recovery: rescans -----------------------------------------------------------------------------------------------


def test_rescan_finds_a_marker_whose_event_never_came(
    root: Path, make_inotify_watcher: Callable[..., MarkerWatcher]
) -> None:
    # A file created by an open(O_CREAT) for reading gives IN_CREATE (a fresh regular file: wait for its close) and
    # then IN_CLOSE_NOWRITE, which is not a "marker ready" event. A real way to lose the event; rescan() recovers.
    silent, sentinel = make_run(root, "p", "silent"), make_run(root, "p", "sentinel")
    rec = Recorder()
    watcher = make_inotify_watcher([root], rec)
    watcher.start()
    os.close(os.open(silent / ".fork", os.O_CREAT | os.O_RDONLY, 0o644))
    (sentinel / ".fork").touch()
    rec.wait_for(sentinel)
    assert silent not in rec.reported
    watcher.rescan()
    rec.wait_for(silent)


def test_queue_overflow_is_reported_and_rescanned(
    root: Path, make_inotify_watcher: Callable[..., MarkerWatcher]
) -> None:
    queue_limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    if queue_limit > 100_000:
        pytest.skip(f"fs.inotify.max_queued_events is {queue_limit}; too many files to overflow it quickly")
    blocker, noisy, missed = (make_run(root, "p", name) for name in ("blocker", "noisy", "missed"))
    rec = Recorder()
    inside, release = threading.Event(), threading.Event()

    def on_marker(model_dir: Path) -> None:
        rec(model_dir)
        if model_dir == blocker:
            inside.set()
            release.wait(WAIT_S)

    overflows: list[int] = []
    claims = Recorder()
    watcher = make_inotify_watcher([root], on_marker, on_overflow=lambda: overflows.append(1), on_claim=claims)
    watcher.start()
    try:
        (blocker / ".fork").touch()
        assert inside.wait(WAIT_S)
        # The watcher thread is held in on_marker (a slow callback), so nobody drains the kernel queue: fill it past
        # its limit with real events, then write a marker whose event is lost. Each open-for-write + close of an
        # existing file queues one IN_CLOSE_WRITE; alternating two names keeps the kernel from merging them.
        noise = [noisy / "history.jsonl", noisy / "metrics.jsonl"]
        for path in noise:
            path.touch()
        for i in range(queue_limit + 1000):
            os.close(os.open(noise[i % 2], os.O_WRONLY))
        (missed / ".fork").write_text("step: 8\n")
        (noisy / ".fork.inprogress").write_text("{}")
    finally:
        release.set()
    rec.wait_for(missed)
    claims.wait_for(noisy)
    assert overflows == [1]
    assert set(rec.contents[missed]) == {b"step: 8\n"}


def test_watch_limit_falls_back_to_scanning(
    root: Path,
    make_inotify_watcher: Callable[..., MarkerWatcher],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # ENOSPC from inotify_add_watch is injected: producing it for real means lowering fs.inotify.max_user_watches,
    # a host-wide setting tests must not touch.
    real_add_watch = watch_inotify.Inotify.add_watch

    def add_watch(self: watch_inotify.Inotify, path: str, mask: int) -> int:
        if "/full" in path:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real_add_watch(self, path, mask)

    monkeypatch.setattr(watch_inotify.Inotify, "add_watch", add_watch)
    unwatched, watched = make_run(root, "full", "a"), make_run(root, "p", "b")
    make_run(root, "full", "c")
    rec = Recorder()
    with caplog.at_level(logging.WARNING, logger="sidecar.watch"):
        make_inotify_watcher([root], rec).start()
        (unwatched / ".fork").touch()
        (watched / ".fork").touch()
        rec.wait_for(unwatched, watched)
        later = make_run(root, "full", "later")  # a new run below an unwatched dir is found by the periodic scan
        (later / ".fork").touch()
        rec.wait_for(later)
    limit_warnings = [r for r in caplog.records if "watch limit" in r.getMessage()]
    assert len(limit_warnings) == 1


# Modes, lifecycle, errors ----------------------------------------------------------------------------------------


def test_auto_mode_polls_roots_on_network_filesystems(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_inotify_watcher: Callable[..., MarkerWatcher]
) -> None:
    # No NFS mount can be made here, so the filesystem type is faked; the rest (watches, scans) is real.
    local, remote = tmp_path / "local", tmp_path / "remote"
    monkeypatch.setattr(watch_loop, "needs_polling", lambda path: "nfs4" if str(path) == str(remote) else None)
    local_run, remote_run = make_run(local, "p", "a"), make_run(remote, "p", "b")
    rec = Recorder()
    watcher = make_inotify_watcher([local, remote], rec, mode="auto")
    watcher.start()
    assert watcher.backend == "inotify"
    watched = set(inotify_watched_inodes())
    assert local_run.stat().st_ino in watched
    assert remote.stat().st_ino not in watched
    assert remote_run.stat().st_ino not in watched
    (local_run / ".fork").touch()
    (remote_run / ".fork").touch()
    rec.wait_for(local_run, remote_run)


def test_backend_names(root: Path) -> None:
    for mode, expected in (("auto", "inotify"), ("inotify", "inotify"), ("poll", "poll")):
        watcher = MarkerWatcher([root], lambda _: None, mode=mode)  # type: ignore[arg-type]
        assert watcher.backend == expected
        watcher.stop()


def test_bad_arguments_are_refused(root: Path) -> None:
    with pytest.raises(ValueError, match="not one of auto, inotify, poll"):
        MarkerWatcher([root], lambda _: None, mode="fanotify")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive"):
        MarkerWatcher([root], lambda _: None, poll_interval=0)


def test_stop_joins_closes_and_is_idempotent(root: Path, mode: WatchMode) -> None:
    make_run(root, "p", "a")
    fds_before, threads_before = open_fds(), set(threading.enumerate())
    watcher = MarkerWatcher([root], lambda _: None, mode=mode)
    assert not watcher.alive()
    watcher.start()
    assert watcher.alive()
    [watching] = threads_since(threads_before)
    watcher.stop()
    watcher.stop()
    assert not watcher.alive()
    assert threads_since(threads_before) == [] and not watching.is_alive()
    assert open_fds() == fds_before
    never_started = MarkerWatcher([root], lambda _: None, mode=mode)
    never_started.stop()
    assert open_fds() == fds_before
    with pytest.raises(RuntimeError):
        never_started.start()


def test_stop_from_inside_on_marker(root: Path, mode: WatchMode) -> None:
    run = make_run(root, "p", "a")
    fds_before = open_fds()
    stopped = threading.Event()

    def on_marker(model_dir: Path) -> None:
        watcher.stop()  # on the watcher thread: must not join itself
        stopped.set()

    watcher = MarkerWatcher([root], on_marker, mode=mode, poll_interval=0.05)
    watcher.start()
    (run / ".fork").touch()
    assert stopped.wait(WAIT_S)
    wait_until(lambda: not watcher.alive() and open_fds() == fds_before, "the thread to end and close its fds")


def test_reported_paths_keep_the_configured_root(
    tmp_path: Path, make_watcher: Callable[..., MarkerWatcher], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The daemon maps a reported model dir back to its root with Path.relative_to: no resolving of symlinks.
    real = tmp_path / "real-art"
    run = make_run(real, "p", "a")
    (tmp_path / "link-art").symlink_to(real)
    monkeypatch.chdir(tmp_path)
    rec = Recorder()
    watcher = make_watcher([Path("link-art")], rec)
    watcher.start()
    (run / ".fork").touch()
    expected = tmp_path / "link-art" / "p" / "models" / "a"
    rec.wait_for(expected)
    assert watcher.run_dirs() == [expected]


def test_failing_callback_does_not_stop_the_watcher(
    root: Path, make_watcher: Callable[..., MarkerWatcher], caplog: pytest.LogCaptureFixture
) -> None:
    first, second = make_run(root, "p", "a"), make_run(root, "p", "b")
    rec = Recorder()

    def on_marker(model_dir: Path) -> None:
        rec(model_dir)
        if model_dir == first:
            raise RuntimeError("daemon queue is broken")

    make_watcher([root], on_marker).start()
    (first / ".fork").touch()
    rec.wait_for(first)
    (second / ".fork").touch()
    rec.wait_for(second)
    assert any("on_marker failed" in r.getMessage() for r in caplog.records)


def test_fs_type_of_takes_the_longest_mount_point() -> None:
    mountinfo = "\n".join(
        [
            "22 1 253:1 / / rw,relatime shared:1 - ext4 /dev/vda rw",
            "40 22 0:40 / /mnt/shared rw,relatime shared:20 - nfs4 server:/export rw,vers=4.2",
            "41 40 0:41 / /mnt/shared/local rw - tmpfs tmpfs rw",
            r"42 22 0:42 / /mnt/my\040data rw - fuse.sshfs host:/d rw",
            "43 22 0:43 / /scratch rw - lustre 10.0.0.1@tcp:/fs rw",
            "44 22 0:44 / /scratch rw - ext4 /dev/vdb rw",
        ]
    )
    assert fs_type_of("/home/u/.art", mountinfo) == "ext4"
    assert fs_type_of("/mnt/shared/art", mountinfo) == "nfs4"
    assert fs_type_of("/mnt/shared", mountinfo) == "nfs4"
    assert fs_type_of("/mnt/sharedother", mountinfo) == "ext4"
    assert fs_type_of("/mnt/shared/local/art", mountinfo) == "tmpfs"
    assert fs_type_of("/mnt/my data/art", mountinfo) == "fuse.sshfs"
    assert fs_type_of("/scratch/art", mountinfo) == "ext4"  # mounted over the lustre mount


def test_needs_polling_on_this_machine(tmp_path: Path) -> None:
    fs_type = fs_type_of(str(tmp_path.resolve()), Path("/proc/self/mountinfo").read_text())
    assert fs_type is not None
    expected = fs_type if fs_type in NETWORK_FILESYSTEMS or fs_type.startswith("fuse.") else None
    assert needs_polling(tmp_path) == expected
    assert needs_polling(tmp_path / "does" / "not" / "exist") == expected
