"""Fail when an installed package (pip freeze on stdin) is missing from the lock or differs from its pin.

Used by .ci/run after the README's set-up command: a dependency added to pyproject.toml without running
tools/lock.sh would otherwise be installed at whatever version the registry has that day.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path


def _pins(lines: list[str]) -> dict[str, str]:
    pins = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
    return pins


def main() -> int:
    lock = _pins(Path(sys.argv[1]).read_text(encoding="utf-8").splitlines())
    installed = _pins(sys.stdin.read().splitlines())
    wrong = [f"{n}=={v} (lock: {lock.get(n, 'missing')})" for n, v in sorted(installed.items()) if lock.get(n) != v]
    if wrong:
        print(f"{sys.argv[1]} is stale; run tools/lock.sh. Not as locked: " + ", ".join(wrong), file=sys.stderr)
        return 1
    print(f"lock holds: {len(installed)} installed packages match {sys.argv[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
