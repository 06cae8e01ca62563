"""Test-only: the crash tests' SIGKILL after a journaled state (tests/support/crash.py)."""

from tests.support.crash import install

install()
