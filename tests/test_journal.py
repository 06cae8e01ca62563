"""The state dir: lock with the holder's pid, atomic fork records, corrupt records named, history."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sidecar.journal import ForkRecord, Journal, JournalError, StateDirLocked, read_history
from sidecar.states import ForkState, IllegalTransition


def record(fork_id: str = "20260101T000000Z-abcdef") -> ForkRecord:
    return ForkRecord(fork_id, "/art/p/models/m", ForkState.CLAIMED, {"kind": "latest"}, time.time())


def test_second_holder_is_refused_with_the_pid(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.lock()
    # A real second process: what a second daemon started by mistake would be.
    code = f"from pathlib import Path; from sidecar.journal import Journal; Journal(Path({str(tmp_path)!r})).lock()"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0
    assert f"pid {os.getpid()}" in proc.stderr
    assert "StateDirLocked" in proc.stderr
    journal.unlock()
    Journal(tmp_path).lock()  # free again once released


def test_lock_in_same_process_twice(tmp_path: Path) -> None:
    Journal(tmp_path).lock()
    with pytest.raises(StateDirLocked, match=f"pid {os.getpid()}"):
        Journal(tmp_path).lock()


def test_records_round_trip_and_transitions_are_checked(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.lock()
    rec = record()
    journal.create(rec)
    journal.advance(rec, ForkState.STAGED, digest="sha256:00")
    with pytest.raises(IllegalTransition):
        journal.advance(rec, ForkState.VLLM)
    (loaded,) = list(Journal(tmp_path).unfinished())
    assert loaded == rec
    assert loaded.state is ForkState.STAGED
    journal.finish(rec)
    assert list(journal.unfinished()) == []
    assert read_history(tmp_path)[-1]["fork_id"] == rec.fork_id
    assert oct(os.stat(tmp_path / "forks").st_mode & 0o777) == "0o700"


def test_a_record_written_before_sections_were_named_so_keeps_them(tmp_path: Path) -> None:
    """A daemon upgraded mid-fork resumes from a journal whose step results are under the old key, `stages`."""
    journal = Journal(tmp_path)
    journal.lock()
    rec = record()
    rec.sections["swap"] = {"status": "ok", "stage_inode": 42}
    journal.create(rec)
    path = next((tmp_path / "forks").iterdir())
    data = json.loads(path.read_text())
    data["stages"] = data.pop("sections")
    path.write_text(json.dumps(data))
    (loaded,) = list(Journal(tmp_path).unfinished())
    assert loaded.sections == {"swap": {"status": "ok", "stage_inode": 42}}


@pytest.mark.parametrize("content", [b"", b'{"fork_id": "x"', b'{"fork_id": "x", "state": "warp"}', b"[]"])
def test_corrupt_record_names_the_file_to_remove(tmp_path: Path, content: bytes) -> None:
    journal = Journal(tmp_path)
    journal.lock()
    bad = tmp_path / "forks" / "20260101T000000Z-000000.json"
    bad.write_bytes(content)
    with pytest.raises(JournalError) as e:
        list(journal.unfinished())
    assert str(bad) in str(e.value)
    assert "remove that file" in str(e.value)


def test_history_skips_torn_lines_and_keeps_the_newest(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.lock()
    for i in range(5):
        journal.finish(record(f"20260101T000000Z-00000{i}"))
    with open(tmp_path / "history.jsonl", "a") as f:
        f.write('{"torn": ')
    ids = [h["fork_id"] for h in read_history(tmp_path, limit=3) if "fork_id" in h]
    assert ids == ["20260101T000000Z-000003", "20260101T000000Z-000004"]
