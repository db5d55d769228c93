"""`flywheel demo --quick`: the whole loop, as CI runs it, through the real CLI in a child process.

Also a second intent dataset in the same shape (`--data DIR`), to show nothing is Banking77-specific, and
the no-terminal path that leaves the approval pending.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from demo_helpers import pack_test_texts, run_demo, tiny_pack

from flywheel.demo.pack import default_pack_dir

pytestmark = pytest.mark.slow


def test_quick_demo_improves_the_targeted_problem_and_promotes(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    done = run_demo("--quick", "--yes", "--json", "--workdir", str(work), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    _check_quick_demo(json.loads(done.stdout.strip().splitlines()[-1]), work)


def _check_quick_demo(result: dict[str, Any], work: Path) -> None:
    before, after = result["before"], result["after"]
    assert set(result) >= {"before", "after", "promoted", "report"}
    assert before["version"] == "v1" and before["task_success"] is not None
    # the cycle targets the policy-breaking promise (the pack's demo.toml): it must fall clearly ...
    assert before["problem_rates"]["over_promise"] > 0.05
    if result["promoted"]:
        assert after["version"] == result["promoted"] == "v2"
        assert after["problem_rates"]["over_promise"] <= 0.7 * before["problem_rates"]["over_promise"]
        # ... and nothing else may get worse by more than the gate's margin (5 points in the demo)
        for name, rate in after["problem_rates"].items():
            assert rate <= before["problem_rates"][name] + 0.05 + 1e-9, name
        assert after["task_success"] >= before["task_success"] - 0.05
    else:  # the gate or the canary refused it: then nothing changed, and the report says why
        assert after == before
    report = Path(result["report"])
    assert report.is_file() and "<svg" in report.read_text(encoding="utf-8")
    # nothing the loop trained on comes from test.csv
    held_out = pack_test_texts(default_pack_dir())
    for rows in (work / ".flywheel" / "artifacts" / "datasets").glob("*/train.jsonl"):
        for line in rows.read_text(encoding="utf-8").splitlines():
            users = [m["content"].strip() for m in json.loads(line)["messages"] if m["role"] == "user"]
            assert not held_out.intersection(users)


@pytest.mark.postgres
def test_quick_demo_runs_on_postgresql(tmp_path: Path, pg_url: str) -> None:
    """The documented production store: the whole quick demo with the store, the registry, the approvals
    and the agent's checkpoints on PostgreSQL (a database of its own, so it starts empty)."""
    import psycopg

    server = pg_url.rsplit("/", 1)[0]
    name = "flywheel_demo_" + os.urandom(4).hex()
    url = f"{server}/{name}"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        work = tmp_path / "demo"
        on_pg = {"FLYWHEEL_STORE__URL": url}
        done = run_demo("--quick", "--yes", "--json", "--workdir", str(work), cwd=tmp_path, extra_env=on_pg)
        assert done.returncode == 0, done.stderr[-3000:]
        result = json.loads(done.stdout.strip().splitlines()[-1])
        _check_quick_demo(result, work)
        assert not list((work / ".flywheel").glob("*.db"))  # nothing went to a SQLite file
        with psycopg.connect(url) as conn:
            held = conn.execute("SELECT count(*) FROM interactions").fetchone()
            champion = conn.execute("SELECT version FROM aliases WHERE name = 'champion'").fetchone()
            checkpoints = conn.execute("SELECT count(*) FROM checkpoints").fetchone()
        assert held is not None and held[0] > 0
        assert champion is not None and champion[0] == (result["promoted"] or "v1")
        assert checkpoints is not None and checkpoints[0] > 0  # the agent's run was checkpointed there too
        # a second demo on the same database is refused before it builds anything: it never clears a server's store
        again = run_demo("--quick", "--yes", "--json", "--workdir", str(tmp_path / "again"), cwd=tmp_path, extra_env=on_pg)
        assert again.returncode == 2 and "already holds" in again.stderr, again.stderr[-500:]
    finally:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_another_dataset_runs_with_the_same_command_and_waits_for_approval_without_a_terminal(tmp_path: Path) -> None:
    data = tiny_pack(tmp_path / "airline")
    work = tmp_path / "demo"
    done = run_demo("--quick", "--json", "--data", str(data), "--workdir", str(work), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["before"]["version"] == "v1" and result["promoted"] is None
    assert result["state"] in ("waiting_approval", "gate_failed", "canary_rolled_back")
    if result["state"] == "waiting_approval":
        assert "approve v2" in done.stderr


def _derived_pack(folder: Path) -> Path:
    """bench/packs.py's second pack: 40 Banking77 intents picked with another seed, no kb.jsonl, no demo.toml."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_packs", Path(__file__).resolve().parents[1] / "bench" / "packs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.derive_pack(default_pack_dir(), folder, intents=40, seed=11)


def test_a_pack_without_kb_learns_from_the_labels(tmp_path: Path) -> None:
    data = _derived_pack(tmp_path / "bank40")
    assert not (data / "kb.jsonl").exists() and not (data / "demo.toml").exists()
    work = tmp_path / "demo"
    done = run_demo("--quick", "--yes", "--json", "--data", str(data), "--workdir", str(work), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # the labels are what it learns from: on the same test items, wrong_intent falls and task success
    # rises by at least 10 points, by a paired test that rules out chance
    paired = result["paired"]
    assert paired["task_success"]["fixed"] > paired["task_success"]["broken"] and paired["task_success"]["p_value"] < 0.01
    assert paired["task_success"]["change"] >= 0.10, paired["task_success"]
    assert result["candidate"]["problem_rates"]["wrong_intent"] <= result["before"]["problem_rates"]["wrong_intent"] - 0.10
    # The gate decides, as strict as ever (30% relative drop, no intent significantly worse): over seeds
    # it does not pass every time (docs/learning.md, bench/loop.py), so either outcome is checked for
    # what it must leave behind.
    assert result["state"] in ("promoted", "gate_failed"), result["state"]
    if result["state"] == "promoted":
        assert result["promoted"] == "v2" and result["after"] == result["candidate"]
    else:
        assert result["promoted"] is None and result["after"] == result["before"]
    # the snapshot says where its rows came from: most from the labels
    manifest = json.loads(next((work / ".flywheel" / "artifacts" / "datasets").glob("*/manifest.json")).read_text(encoding="utf-8"))
    assert manifest["by_source"]["label"]["train"] >= 100
    assert manifest["labels"]["used"] >= 0.8 * manifest["labels"]["labelled"]
    # `flywheel failures` lists the labelled failures as judged wrong_intent
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ANONYMIZED_TELEMETRY": "False"}
    listed = subprocess.run(
        [sys.executable, "-m", "flywheel", "-C", str(work), "failures", "--problem-type", "wrong_intent", "--limit", "1000", "--json"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert listed.returncode == 0, listed.stderr
    assert len(json.loads(listed.stdout)) >= 100
    held_out = pack_test_texts(data)
    for rows in (work / ".flywheel" / "artifacts" / "datasets").glob("*/train.jsonl"):
        for line in rows.read_text(encoding="utf-8").splitlines():
            users = [m["content"].strip() for m in json.loads(line)["messages"] if m["role"] == "user"]
            assert not held_out.intersection(users)


def test_cycles_serve_new_traffic_through_each_champion_and_keep_the_store_consistent(tmp_path: Path) -> None:
    """Two cycles on the small pack (fewer rows than the cycles need: its rows are served again, as new
    interactions of the champion of the moment)."""
    data = tiny_pack(tmp_path / "airline")
    work = tmp_path / "demo"
    done = run_demo("--quick", "--yes", "--json", "--cycles", "2", "--data", str(data), "--workdir", str(work), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    cycles = result["cycles"]
    assert 1 <= len(cycles) <= 2 and result["stop_reason"]
    first = cycles[0]
    assert first["cycle"] == 1 and first["champion_before"] == "v1"
    if first["state"] != "promoted":  # nothing graduates from a cycle whose candidate was not promoted
        assert first["champion"] == "v1" and first["graduated"] == 0 and first["tiers"]["candidate_baseline"] == 0
    if len(cycles) == 2:
        second = cycles[1]
        # the second cycle starts from the champion the first one left, and its traffic came from it
        assert second["champion_before"] == first["champion"]
        served = [json.loads(line) for line in (work / "logs" / "production-cycle-2.jsonl").read_text(encoding="utf-8").splitlines()]
        assert served and {r["model_version"] for r in served} == {first["champion"]}
        assert result["after"]["version"] in (second["champion"], second["candidate"])
        # a baseline never skips a tier: secondary samples need a confirmed promotion after their graduation
        assert second["tiers"]["core_baseline"] == 0
        if second["tiers"]["secondary_baseline"]:
            assert first["state"] == "promoted" and second["state"] == "promoted" and second["confirmed"] > 0
    assert result["before"]["version"] == "v1"


def test_a_wrong_cycles_value_is_refused_before_anything_runs(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    for value in ("0", "-2", "many"):
        done = run_demo("--quick", "--cycles", value, "--workdir", str(work), cwd=tmp_path)
        assert done.returncode == 2 and "--cycles" in done.stderr, done.stderr[-500:]
    assert not work.exists()
