"""The demo as the tests run it: the real CLI in a child process, and a second small intent pack.

Shared by tests/test_demo.py and the tests that need a real quick cycle behind them (the console's).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path


def run_demo(*args: str, cwd: Path, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ANONYMIZED_TELEMETRY": "False", **(extra_env or {})}
    return subprocess.run(
        [sys.executable, "-m", "flywheel", "demo", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=1800,
    )


def pack_test_texts(folder: Path) -> set[str]:
    with (folder / "test.csv").open(encoding="utf-8") as handle:
        return {row["text"].strip() for row in csv.DictReader(handle)}


def tiny_pack(folder: Path) -> Path:
    """Another intent dataset in the same shape: 4 intents, no kb.jsonl, no demo.toml."""
    folder.mkdir(parents=True)
    phrasing = {
        "book_flight": ["I want to fly to {}", "book me a flight to {}", "get a plane ticket for {}", "flights to {} please"],
        "cancel_booking": ["cancel my trip to {}", "I need to cancel the {} booking", "drop my reservation in {}", "undo the {} order"],
        "baggage_allowance": [
            "how many bags can I take to {}",
            "luggage limit for {}",
            "what is the baggage rule to {}",
            "can I bring two suitcases to {}",
        ],
        "seat_upgrade": [
            "upgrade my seat to {}",
            "can I get business class to {}",
            "better seat on the {} flight",
            "move me to first class for {}",
        ],
    }
    places = [
        "Paris",
        "Oslo",
        "Rome",
        "Lima",
        "Cairo",
        "Tokyo",
        "Quito",
        "Accra",
        "Dubai",
        "Hanoi",
        "Perth",
        "Sofia",
        "Riga",
        "Bern",
        "Kyiv",
    ]
    (folder / "categories.json").write_text(json.dumps(list(phrasing)), encoding="utf-8")
    for name, cities in (("train.csv", places[:12]), ("test.csv", places[12:])):
        with (folder / name).open("w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "category"])
            for intent, templates in phrasing.items():
                for city in cities:
                    for template in templates:
                        writer.writerow([template.format(city), intent])
    return folder
