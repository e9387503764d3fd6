"""The host processes that run a sandboxed program: any 'main.py' started with -B."""

from __future__ import annotations

import os
from pathlib import Path


def sandboxed_programs() -> dict[int, str]:
    """Host pid -> argv of every process still running a sandboxed program."""
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry.name}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"-B" in argv and any(a.endswith(b"/main.py") for a in argv):
            found[int(entry.name)] = b" ".join(argv).decode(errors="replace")
    return found
