"""The console in a real browser (Debian's Chromium, driven by Playwright) after a real quick cycle.

One module-scoped world, built once because the cycle takes a while: `flywheel demo --quick` on a small
airline pack (it ends waiting for a person's approval), new traffic ingested and triaged, and the
labelling queue filled by active learning (flywheel.data.labelling with the queue labeller, as a run's
`request_labels` step does without a labeller). The console runs as `flywheel console` in a child
process. Screenshots of every page land in test-artifacts/console/ (printed by the tests).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from demo_helpers import run_demo, tiny_pack

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "console"
EVIL = "<script>window.owned = true</script> my bag never arrived"


@dataclass
class World:
    project: Path
    url: str
    token: str


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "ANONYMIZED_TELEMETRY": "False"}


def flywheel(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "flywheel", "-C", str(project), *args], env=_env(), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"flywheel {' '.join(args)}: {done.stderr[-2000:]}"
    return done


def _new_traffic(path: Path) -> Path:
    asks = ["I lost my passport before the flight to {}", EVIL + " in {}", "is there wifi on the plane to {}", "can I bring my dog to {}"]
    rows = [
        {
            "id": f"new-{n}",
            "timestamp": f"2026-11-02T00:{n:02d}:00+00:00",
            "model_version": "v1",
            "user_id": f"u{n}",
            "messages": [
                {"role": "user", "content": ask.format(city)},
                {"role": "assistant", "content": '{"intent": "book_flight", "reply": "Sure."}'},
            ],
            "feedback": "down",
            "escalated_to_human": True,
        }
        for n, (ask, city) in enumerate((a, c) for a in asks for c in ("Lima", "Oslo"))
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _queue_labels(project: Path, wanted: int) -> int:
    from flywheel.context import Context
    from flywheel.data.labelling import QueueLabeller, label_failures
    from flywheel.data.labels import labels_spent
    from flywheel.settings import load_settings

    ctx = Context(settings=load_settings(project))
    try:
        spent = labels_spent(ctx.store, ctx.settings)
        log = label_failures(
            ctx, QueueLabeller(ctx.settings.state_path / "label_requests.jsonl"), strategy="kcenter", budget=spent + wanted
        )
    finally:
        ctx.close()
    return log.requested


def _approvals_of(project: Path, version: str) -> list:
    from flywheel.release.approvals import approvals_for
    from flywheel.settings import load_settings
    from flywheel.store.db import open_store

    store = open_store(load_settings(project))
    try:
        return approvals_for(store, version)
    finally:
        store.dispose()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    if not Path(CHROMIUM).is_file():
        if os.environ.get("CI"):  # .ci/run installs it: its absence there is a failure, not a skip
            pytest.fail(f"{CHROMIUM} is not installed")
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    tmp = tmp_path_factory.mktemp("console-browser")
    project = tmp / "demo"
    done = run_demo("--quick", "--json", "--data", str(tiny_pack(tmp / "airline")), "--workdir", str(project), cwd=tmp)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["state"] != "waiting_approval":  # the gate decides; the tiny pack's cycle has always ended waiting so far
        pytest.skip(f"the quick cycle ended {result['state']}, not waiting for an approval: nothing to approve")
    with (project / "flywheel.toml").open("a", encoding="utf-8") as out:
        out.write('\n[approvals]\napprovers = ["alice"]\n')
    flywheel(project, "ingest", str(_new_traffic(tmp / "new.jsonl")))
    flywheel(project, "triage")
    assert _queue_labels(project, 5) >= 3
    token = flywheel(project, "console", "users", "add", "alice").stdout.strip()
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "flywheel", "-C", str(project), "console", "--port", str(port)],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None, server.stderr.read() if server.stderr else "the console exited"
                assert time.monotonic() < deadline, "the console did not start within 60 s"
                time.sleep(0.2)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        print(f"console screenshots: {ARTIFACTS}")
        yield World(project=project, url=f"http://127.0.0.1:{port}", token=token)
    finally:
        server.terminate()
        server.wait(30)


@pytest.fixture(scope="module")
def browser(world: World) -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        handle = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield handle
        handle.close()


def _logged_in(browser: object, world: World) -> object:
    context = browser.new_context(base_url=world.url)  # type: ignore[attr-defined]
    page = context.new_page()
    page.goto("/")
    assert "/login" in page.url  # no session: the login page, never data
    page.fill("#token", world.token)
    page.click("#login")
    page.wait_for_url(world.url + "/")
    return page


def _shot(page: object, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)  # type: ignore[attr-defined]


def test_log_in_see_the_pending_approval_open_its_report_and_approve_once_from_two_tabs(browser: object, world: World) -> None:
    first = _logged_in(browser, world)
    _shot(first, "overview")
    first.click("a.pending-link")  # the cycle's candidate, waiting at the top of the overview
    assert first.url.endswith("/approvals/v2")
    second = _logged_in(browser, world)  # a second browser context, on the same approval
    second.goto("/approvals/v2")
    report = first.frame_locator("iframe.report")
    assert "v2" in report.locator("header").first.inner_text()  # the report, rendered in the page
    # a full-page screenshot paints a frame below the fold blank unless it has been scrolled to
    first.locator("iframe.report").scroll_into_view_if_needed()
    _shot(first, "approval")
    first.click("#approve")
    first.wait_for_selector("#flash")
    assert "v2 promoted to champion, approved by alice (web)" in first.inner_text("#flash")
    second.click("#approve")  # clicked on the page as it was shown before the first decision
    second.wait_for_selector("#flash")
    assert "Already decided: v2 was approved by alice (web)" in second.inner_text("#flash")
    _shot(second, "approval-decided")
    models = json.loads(flywheel(world.project, "models", "--json").stdout)
    champion = next(m for m in models if "champion" in m["aliases"])
    assert champion["id"] == "v2" and champion["approval"] == "approved by alice"
    assert [(a.decision, a.approver, a.channel) for a in _approvals_of(world.project, "v2")] == [("approved", "alice", "web")]
    first.goto("/")
    assert first.inner_text("#champion") == "v2"
    first.goto("/versions")
    _shot(first, "versions")


def test_label_three_items_with_the_keyboard(browser: object, world: World) -> None:
    page = _logged_in(browser, world)
    page.goto("/labelling")
    _shot(page, "labelling")
    labelled = []
    for keys in (["1", "Enter"], ["f"], ["2", "a", "Enter"]):
        failure_id = page.get_attribute("#item", "data-failure")
        for key in keys:
            page.keyboard.press(key)
        page.wait_for_function("id => !document.querySelector(`[data-failure='${id}']`)", arg=failure_id)
        labelled.append(failure_id)
        assert "labelled " + failure_id in page.inner_text("#flash")
    assert page.evaluate("window.owned") is None  # logged markup never ran
    listed = {row["id"] for row in json.loads(flywheel(world.project, "failures", "--json", "--limit", "1000").stdout)}
    assert set(labelled) <= listed
    for failure_id in labelled:
        shown = json.loads(flywheel(world.project, "failures", "show", failure_id, "--json").stdout)
        assert shown["reference"]["source"] == "label:alice"
    fine = json.loads(flywheel(world.project, "failures", "show", labelled[1], "--json").stdout)
    assert fine["reference"]["fine"] is True


def test_failures_and_a_failures_provenance_render_logged_markup_as_text(browser: object, world: World) -> None:
    page = _logged_in(browser, world)
    page.goto("/failures")
    _shot(page, "failures")
    page.click("#failures tbody a >> nth=0")
    assert "interaction" in page.inner_text("ol.chain")
    _shot(page, "failure")
    for path in ["/", "/approvals", "/labelling", "/failures", "/versions", "/failures?status=triaged"]:
        page.goto(path)
        assert page.evaluate("window.owned") is None, path
    triaged = page.locator("#failures tbody a")
    texts = []
    for n in range(triaged.count()):
        page.goto("/failures?status=triaged")
        page.locator("#failures tbody a").nth(n).click()
        texts.append(page.inner_text(".conversation"))
        assert page.evaluate("window.owned") is None
    assert any("<script>window.owned = true</script>" in t for t in texts)  # shown as text, not run
