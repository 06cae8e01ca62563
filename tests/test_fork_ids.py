"""Fork ids (sidecar/fork_ids.py): what the daemon makes is what every reader accepts, and nothing that leaves a dir."""

from __future__ import annotations

import pytest

from sidecar.fork_ids import checked_fork_id, is_fork_id, new_fork_id
from sidecar.swap import retired_name, staging_name


def test_new_ids_are_accepted_everywhere_and_differ() -> None:
    ids = {new_fork_id() for _ in range(50)}
    assert len(ids) == 50
    for fork_id in ids:
        assert is_fork_id(fork_id) and checked_fork_id(fork_id) == fork_id
        assert staging_name(fork_id) == f".fork-stage-{fork_id}" and retired_name(fork_id) == f".fork-retired-{fork_id}"


@pytest.mark.parametrize("bad", ["", "-x", "_x", "a/b", "..", "a.b", "a b", "x" * 65, None, 7])
def test_anything_else_is_refused(bad: object) -> None:
    assert not is_fork_id(bad)
    with pytest.raises(ValueError, match="fork id"):
        checked_fork_id(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fork id"):
        staging_name(bad)  # type: ignore[arg-type]


def test_the_longest_id_is_64_characters() -> None:
    assert is_fork_id("a" * 64) and not is_fork_id("a" * 65)
