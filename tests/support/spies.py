"""Spies: the real function runs, and what each call was given is noted (never a stand-in for the function)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest


def spy(
    monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, note: Callable[..., Any] = lambda *args, **kwargs: None
) -> list[Any]:
    """Wrap `owner.name`; the list returned gets `note(*args, **kwargs)` for every call, in order."""
    calls: list[Any] = []
    real = getattr(owner, name)

    def noted(*args: Any, **kwargs: Any) -> Any:
        calls.append(note(*args, **kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, noted)
    return calls
