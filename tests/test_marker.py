"""Marker parsing, reading (without following links or blocking on FIFOs) and outcome files."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.marker import (
    DONE,
    FAILED,
    MarkerError,
    MarkerRequest,
    bounded_outcome,
    parse_marker,
    read_json_object,
    read_marker_file,
    write_outcome,
)

WHERE = Path("/art/p/models/m/.fork")


@pytest.mark.parametrize(
    ("text", "request_"),
    [
        ("", MarkerRequest("latest")),
        ("  \n\t\n", MarkerRequest("latest")),
        ("source: ../other/0003\n", MarkerRequest("source", source="../other/0003")),
        ("step: 12", MarkerRequest("step", step=12)),
        ("from_model: base", MarkerRequest("from_model", from_model="base")),
        (
            "from_model: base\nfrom_project: p2\nnot_after_step: 30\n",
            MarkerRequest("from_model", from_model="base", from_project="p2", not_after_step=30),
        ),
        ("request_id: abc-1\n", MarkerRequest("latest", request_id="abc-1")),
        ('{"step": 4}', MarkerRequest("step", step=4)),
    ],
)
def test_valid_markers(text: str, request_: MarkerRequest) -> None:
    assert parse_marker(text.encode(), WHERE) == request_


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("step: [1", "not valid YAML"),
        ("- 1\n- 2\n", "must be empty or a YAML mapping, not a list"),
        ("just words", "must be empty or a YAML mapping, not a string"),
        ("stepp: 3", "unknown key 'stepp'"),
        ("step: 3\nsource: x", "names both 'source' and 'step'"),
        ("step: -1", "non-negative whole number"),
        ("step: 1.5", "non-negative whole number"),
        ("step: true", "non-negative whole number"),
        ("step: '3'", "non-negative whole number"),
        ("source: ''", "empty 'source'"),
        ("source: 5", "must be a string"),
        ("from_model: a/b", "model name, not a path"),
        ("not_after_step: 3", "without from_model"),
        ("step: 3\nfrom_project: x", "without from_model"),
        ("request_id: 'has spaces'", "request_id"),
    ],
)
def test_bad_markers_give_one_sentence_naming_the_file(text: str, problem: str) -> None:
    with pytest.raises(MarkerError) as e:
        parse_marker(text.encode(), WHERE)
    assert str(e.value).startswith(str(WHERE))
    assert problem in str(e.value)
    assert "\n" not in str(e.value)


def test_non_utf8_marker() -> None:
    with pytest.raises(MarkerError, match="not UTF-8"):
        parse_marker(b"step: \xff\xfe", WHERE)


@settings(deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_parse_or_fail_cleanly(data: bytes) -> None:
    try:
        request = parse_marker(data, WHERE)
    except MarkerError as e:
        assert str(e).startswith(str(WHERE))
    else:
        assert request.kind in ("latest", "source", "step", "from_model")


@settings(deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["source", "step", "from_model", "from_project", "not_after_step", "x"]),
        st.one_of(st.integers(-5, 50), st.text(max_size=10), st.none(), st.booleans()),
        max_size=4,
    )
)
def test_any_mapping_parses_or_fails_cleanly(data: dict[str, object]) -> None:
    try:
        request = parse_marker(json.dumps(data).encode(), WHERE)
    except MarkerError:
        return
    assert sum(getattr(request, k) is not None for k in ("source", "step", "from_model")) <= 1


def test_read_refuses_symlink_fifo_directory_and_big_files(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("step: 3")
    os.symlink(target, tmp_path / "link")
    with pytest.raises(MarkerError, match="is a symlink"):
        read_marker_file(tmp_path / "link")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(MarkerError, match="not a regular file"):
        read_marker_file(tmp_path / "fifo")  # must not block: nobody writes to it
    (tmp_path / "dir").mkdir()
    with pytest.raises(MarkerError, match="is a directory"):
        read_marker_file(tmp_path / "dir")
    (tmp_path / "big").write_bytes(b"#" * (64 * 1024 + 1))
    with pytest.raises(MarkerError, match="larger than 64 KiB"):
        read_marker_file(tmp_path / "big")
    (tmp_path / "ok").write_text("step: 3")
    assert read_marker_file(tmp_path / "ok") == b"step: 3"


def test_outcome_replaces_the_other_kind_and_is_not_world_writable(tmp_path: Path) -> None:
    old_umask = os.umask(0)
    try:
        write_outcome(tmp_path, {"status": "failed", "error": "x"})
        assert (tmp_path / FAILED).exists()
        path = write_outcome(tmp_path, {"status": "done"})
    finally:
        os.umask(old_umask)
    assert path == tmp_path / DONE
    assert not (tmp_path / FAILED).exists()
    assert json.loads(path.read_text()) == {"status": "done"}
    assert not os.stat(path).st_mode & stat.S_IWOTH
    assert sorted(p.name for p in tmp_path.iterdir()) == [DONE]


def test_read_json_object_reads_claims_bigger_than_a_marker_and_nothing_odd(tmp_path: Path) -> None:
    claim = tmp_path / "claim"
    # A claim embeds the marker (up to 64 KiB) beside its own fields, so it must read past the marker limit.
    claim.write_text(json.dumps({"fork_id": "x", "marker": "#" * (64 * 1024)}))
    assert (read_json_object(claim) or {}).get("fork_id") == "x"
    assert read_json_object(claim, limit=1024) is None
    (tmp_path / "list").write_text("[1, 2]")
    assert read_json_object(tmp_path / "list") is None
    (tmp_path / "torn").write_text('{"fork_id": ')
    assert read_json_object(tmp_path / "torn") is None
    os.symlink(claim, tmp_path / "link")
    assert read_json_object(tmp_path / "link") is None
    os.mkfifo(tmp_path / "fifo")
    assert read_json_object(tmp_path / "fifo") is None  # returns at once: never blocks on a FIFO
    assert read_json_object(tmp_path / "missing") is None


def test_an_outcome_stays_readable_whatever_a_fork_puts_in_it(tmp_path: Path) -> None:
    """100,000 file names or a huge error text must not make an outcome larger than read_json_object accepts."""
    outcome = {"status": "done", "swap": {"files": [f"junk/{i:06d}" for i in range(100_000)]}, "error": "x" * 2_000_000}
    write_outcome(tmp_path, outcome)
    back = read_json_object(tmp_path / DONE)
    assert back is not None and back["trimmed"] is True and back["status"] == "done"
    assert len(back["swap"]["files"]) <= 21 and len(back["error"]) < 5000
    small = {"status": "failed", "error": "one sentence."}
    assert bounded_outcome(small) is small
