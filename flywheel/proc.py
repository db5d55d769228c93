"""Is a process alive? One answer for the job launcher and the agent's run table."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path


def pid_alive(pid: int, argv_has: Sequence[str] = ()) -> bool:
    """Whether `pid` is a live (not zombie) process whose argv holds every item of `argv_has`.

    /proc tells on Linux, where the argv check guards against pid reuse; elsewhere only whether the pid
    exists (callers keep a heartbeat as a backstop)."""
    proc = Path(f"/proc/{pid}")
    if Path("/proc/self").exists():
        try:
            stat = (proc / "stat").read_text()
            argv = (proc / "cmdline").read_bytes().split(b"\0") if argv_has else []
        except OSError:
            return False
        if stat.rsplit(")", 1)[-1].split()[0] in ("Z", "X"):
            return False
        return all(item.encode() in argv for item in argv_has)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
