"""Tool: retrieve context from the vector index (the knowledge base, or verified corrections).

Knowledge-base sections are the team's own approved text. Corrections were written for logged
conversations and quote them, so their text reaches the model fenced as untrusted data.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from flywheel.prompts.fence import new_nonce, untrusted_block
from flywheel.records import Record
from flywheel.store.vectors import CORRECTIONS, KB
from flywheel.tools.base import ToolContext, ToolSpec

MAX_TEXT = 1200


class Passage(Record):
    id: str
    similarity: float
    title: str | None = None
    kind: str | None = None
    intent: str | None = None
    text: str


def retrieve_context(
    ctx: ToolContext,
    query: str,
    collection: Literal["kb", "corrections"] = "kb",
    k: Annotated[int, Field(ge=1, le=20)] = 5,
    intent: str | None = None,
) -> list[Passage]:
    """The passages nearest in meaning to a query: knowledge-base sections (approved responses, policies, documents) or verified corrections of earlier failures.

    Args:
        query: what to look for, in plain words.
        collection: "kb" for the knowledge base, "corrections" for verified corrections.
        k: how many passages.
        intent: only passages for this intent.
    """
    name = KB if collection == "kb" else CORRECTIONS
    hits = ctx.index.query(name, query, k=k, where={"intent": intent} if intent else None)
    nonce = new_nonce() if name == CORRECTIONS else ""
    out = []
    for hit in hits:
        text = hit.text[:MAX_TEXT]
        meta = hit.metadata
        out.append(
            Passage(
                id=hit.id,
                similarity=round(hit.similarity, 4),
                title=meta.get("title"),
                kind=meta.get("kind"),
                intent=meta.get("intent"),
                text=untrusted_block("correction", text, nonce) if nonce else text,
            )
        )
    return out


SPECS = [ToolSpec(retrieve_context)]
