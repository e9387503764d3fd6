"""Unit-tier fixtures: every test starts with no sandboxed program left running, and one
that leaves a program behind fails itself, so a leak is named where it happened instead of
failing every sandbox test after it."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.unit.sandboxed import sandboxed_programs


def _kill(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(autouse=True)
def no_sandboxed_program_left(request):
    before = sandboxed_programs()
    if before:  # left by an earlier test, which failed for it; not this test's doing
        _kill(before)
        deadline = time.monotonic() + 5
        while sandboxed_programs() and time.monotonic() < deadline:
            time.sleep(0.05)
    yield
    deadline = time.monotonic() + 5  # a killed sandbox's processes go within moments
    while (left := sandboxed_programs()) and time.monotonic() < deadline:
        time.sleep(0.05)
    if left:
        _kill(left)
        pytest.fail(f"{request.node.nodeid} left sandboxed programs running: {left}")
