"""Failures in the browser: a searchable, paged list and one failure's provenance chain.

The list filters by problem type (the newest verdict's), intent, capture rule, the version the failure was
first seen in, status and id prefix, a page at a time in risk order (flywheel.store.failure_pages: keyset
pages, so a hundred thousand failures render as fast as a hundred). The chain shows where a failure came
from and where it went: interaction -> cluster -> verdict -> label -> correction -> dataset snapshot ->
the versions trained on that snapshot.
"""

from __future__ import annotations

import time
from typing import Any

from flywheel.console.web import Console
from flywheel.data.labels import failure_view
from flywheel.errors import UserInputError
from flywheel.records import FailureStatus, FailureView, Record
from flywheel.release import registry
from flywheel.store import failure_pages
from flywheel.store.failure_pages import Page, PageFilter

FILTER_FIELDS = ("problem_type", "intent", "rule", "version", "status", "failure_id")
CHOICES_TTL_S = 30.0  # the filter drop-downs' values are re-read this often, not on every page view


def parse_filter(console: Console, params: dict[str, str]) -> PageFilter:
    """The list's filter from the query string; an unknown problem type or status is refused."""
    values = {name: (params.get(name) or "").strip() or None for name in FILTER_FIELDS}
    if values["problem_type"] and values["problem_type"] not in console.settings.taxonomy.problem_types:
        raise UserInputError(f"unknown problem type {values['problem_type']!r}")
    if values["status"] and values["status"] not in [s.value for s in FailureStatus]:
        raise UserInputError(f"unknown status {values['status']!r}")
    return PageFilter(**values)


def parse_after(raw: str | None) -> tuple[float, str] | None:
    """The page cursor `<risk>:<id>` of a "next" link."""
    if not raw:
        return None
    risk, _, failure_id = raw.partition(":")
    try:
        return float(risk), failure_id
    except ValueError:
        raise UserInputError(f"bad page cursor {raw[:40]!r}; start from the first page") from None


def page_of(console: Console, flt: PageFilter, after: tuple[float, str] | None) -> Page:
    return failure_pages.failure_page(console.ctx.store, flt, console.settings.console.page_size, after)


class _Choices:
    """Distinct intents, rules and versions for the filter drop-downs, cached for CHOICES_TTL_S."""

    def __init__(self) -> None:
        self._value: dict[str, list[str]] = {}
        self._read_at = -CHOICES_TTL_S

    def get(self, console: Console) -> dict[str, list[str]]:
        if time.monotonic() - self._read_at >= CHOICES_TTL_S:
            store = console.ctx.store
            self._value = {
                "problem_type": sorted(console.settings.taxonomy.problem_types),
                "intent": failure_pages.distinct_values(store, "intent"),
                "rule": failure_pages.distinct_values(store, "rule"),
                "version": failure_pages.distinct_values(store, "first_seen_version"),
                "status": [s.value for s in FailureStatus],
            }
            self._read_at = time.monotonic()
        return self._value


choices = _Choices()


class Provenance(Record):
    view: FailureView
    cluster: list[str]  # the failures of its cluster, the representative first
    snapshots: list[str]  # dataset snapshots that hold it
    versions: list[dict[str, Any]]  # {"id", "status", "aliases"} of versions trained on those snapshots


def provenance(console: Console, failure_id: str) -> Provenance:
    store = console.ctx.store
    view = failure_view(store, failure_id)
    cluster_id = view.failure.cluster_id
    snapshots = failure_pages.snapshots_with(store, failure_id)
    versions = [{"id": v.id, "status": v.status, "aliases": v.aliases} for v in registry.list_versions(store) if v.dataset_id in snapshots]
    return Provenance(
        view=view,
        cluster=list(failure_pages.cluster_members(store, cluster_id)) if cluster_id else [],
        snapshots=snapshots,
        versions=versions,
    )
