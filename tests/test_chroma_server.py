"""The index as a server: triage and retrieval through Chroma's HttpClient against a real `chroma run`,
with the store on PostgreSQL, give the same clusters and the same passages as the embedded client on SQLite.

The inputs are real customer questions (Banking77's train split, as the demo pack ships it), so the
clustering has real near-duplicates to find rather than hand-made ones.
"""

from __future__ import annotations

import csv
import itertools
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from chroma_helpers import chroma_server

from flywheel.context import Context
from flywheel.data.kb import add_files, search
from flywheel.data.triage import triage
from flywheel.demo.pack import default_pack_dir
from flywheel.records import Interaction, Message, Signals, interaction_hash
from flywheel.settings import load_settings
from flywheel.store import interactions as interaction_repo
from flywheel.store.failures import failure_from_row
from flywheel.store.schema import failures
from flywheel.store.vectors import Embedder, open_index

pytestmark = pytest.mark.postgres

T0 = datetime(2025, 6, 1, tzinfo=UTC)
INTENTS = ("card_arrival", "lost_or_stolen_card", "exchange_rate", "pin_blocked", "declined_transfer", "top_up_failed")
# one wrong answer per intent: questions of an intent that got the same wrong answer are near-duplicates
# exactly when their questions are
WRONG = {intent: f"I cannot help with that. Reference {n}." for n, intent in enumerate(INTENTS)}


def _traffic(per_intent: int = 25) -> list[Interaction]:
    with (default_pack_dir() / "train.csv").open(encoding="utf-8") as handle:
        rows = [r for r in csv.DictReader(handle) if r["category"] in INTENTS]
    picked = list(itertools.chain.from_iterable([r for r in rows if r["category"] == i][:per_intent] for i in INTENTS))
    out = []
    for n, row in enumerate(picked):
        messages = [Message(role="user", content=row["text"]), Message(role="assistant", content=WRONG[row["category"]])]
        ts = T0 + timedelta(seconds=n)
        out.append(
            Interaction(
                id=f"b77-{n:04d}",
                timestamp=ts,
                model_version="v1",
                intent=row["category"],
                user_id=f"u{n}",
                messages=messages,
                signals=Signals(feedback="down"),
                content_hash=interaction_hash(messages, f"u{n}", ts.isoformat()),
            )
        )
    return out


@pytest.fixture(scope="module")
def server_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    with chroma_server(tmp_path_factory.mktemp("chroma-server")) as port:
        yield port


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder()


def _context(folder: Path, embedder: Embedder, **overrides: object) -> Context:
    folder.mkdir()
    (folder / "flywheel.toml").write_text("", encoding="utf-8")
    ctx = Context(settings=load_settings(folder, **overrides))
    ctx._index = open_index(ctx.settings, embedder)
    return ctx


def _clusters(ctx: Context) -> dict[str, str]:
    """interaction id -> the interaction id of its cluster's representative."""
    with ctx.store.engine.connect() as conn:
        found = [failure_from_row(r) for r in conn.execute(failures.select())]
    by_failure = {f.id: f.interaction_id for f in found}
    return {f.interaction_id: by_failure[f.cluster_id] for f in found if f.cluster_id}


def test_triage_and_retrieval_through_a_chroma_server_match_the_embedded_index(
    tmp_path: Path, server_port: int, pg_url: str, embedder: Embedder
) -> None:
    from conftest import _truncate_all

    _truncate_all(pg_url)
    embedded = _context(tmp_path / "embedded", embedder)
    served = _context(tmp_path / "served", embedder, store={"url": pg_url}, chroma={"host": "127.0.0.1", "port": server_port})
    try:
        assert served.index.location == f"http://127.0.0.1:{server_port}"
        traffic = _traffic()
        summaries = []
        for ctx in (embedded, served):
            assert interaction_repo.insert(ctx.store, traffic) == len(traffic)
            summaries.append(triage(ctx))
        local, remote = summaries
        print(f"clusters {local.clusters}/{remote.clusters}, duplicates {local.duplicates}/{remote.duplicates} of {local.captured}")
        # the inputs hold real near-duplicates and real distinct questions, so the comparison means something
        assert local.captured == len(traffic) and 0 < local.duplicates < local.captured and local.clusters > len(INTENTS)
        assert (remote.captured, remote.clusters, remote.duplicates) == (local.captured, local.clusters, local.duplicates)
        assert _clusters(served) == _clusters(embedded)
        assert served.index.count("failures") == embedded.index.count("failures") == local.clusters
        assert not (tmp_path / "served" / ".flywheel" / "chroma").exists()  # nothing was embedded locally

        # retrieval: the pack's knowledge base through both clients, the same passages in the same order
        kb = default_pack_dir() / "kb.jsonl"
        added = [add_files(ctx.index, [kb]) for ctx in (embedded, served)]
        assert added[0].sections == added[1].sections > 0 and not added[1].errors
        for question in [t.messages[0].content for t in traffic[::10]]:
            near = [search(ctx.index, question, k=5) for ctx in (embedded, served)]
            assert [h.id for h in near[1]] == [h.id for h in near[0]], question
            for a, b in zip(near[0], near[1]):
                assert abs(a.similarity - b.similarity) < 1e-4
    finally:
        for ctx in (embedded, served):
            ctx.close()
