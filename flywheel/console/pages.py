"""The console's page routes: each gathers its data in a worker thread and renders one template.

Every route here is wrapped in flywheel.console.web.page (login, CSRF); the data comes from the modules
named after the pages (approvals, labelling, failures, versions). A POST answers with a redirect to a
page that shows what happened (post/redirect/get), so a reload never sends a decision again.
"""

from __future__ import annotations

from typing import Any, Literal, cast
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from flywheel.console import approvals, failures, labelling, versions
from flywheel.console.web import REPORT_CSP, blocking, console_of, flash, form_of, page, render, see_other
from flywheel.errors import NotFoundError, UserInputError
from flywheel.release import registry


@page
async def overview_page(request: Request, user: str) -> Response:
    console = console_of(request)

    def gather() -> dict[str, Any]:
        return {"o": versions.overview(console), "pending": approvals.pending(console), "queue": labelling.queue_state(console)}

    return render(request, "overview.html", user, **(await blocking(gather)))


# --- approvals ---------------------------------------------------------------------------------------------


@page
async def approvals_page(request: Request, user: str) -> Response:
    console = console_of(request)
    return render(request, "approvals.html", user, pending=await blocking(approvals.pending, console))


@page
async def approval_page(request: Request, user: str) -> Response:
    console = console_of(request)
    found = await blocking(approvals.evidence, console, request.path_params["version"])
    may_decide = user in console.settings.approvals.approvers
    return render(request, "approval.html", user, e=found, may_decide=may_decide)


@page
async def decide_route(request: Request, user: str) -> Response:
    console = console_of(request)
    form = await form_of(request)
    version = request.path_params["version"]
    kind = form.get("decision", "")
    if kind not in ("approved", "rejected"):
        raise UserInputError("decision must be approved or rejected")
    answer = await blocking(
        approvals.decide,
        console,
        user,
        version,
        form.get("report_hash", ""),
        cast(Literal["approved", "rejected"], kind),
        form.get("reason", ""),
    )
    flash(request, answer.text, answer.ok)
    return see_other(f"/approvals/{version}")


@page
async def report_route(request: Request, user: str) -> Response:
    """A version's report.html as it is, under the report's own strict CSP (framed by the approval page)."""
    path = await blocking(approvals.report_file, console_of(request), request.path_params["version"])
    return FileResponse(path, media_type="text/html", headers={"content-security-policy": REPORT_CSP, "x-frame-options": "SAMEORIGIN"})


# --- labelling ----------------------------------------------------------------------------------------------


@page
async def labelling_page(request: Request, user: str) -> Response:
    console = console_of(request)
    try:
        position = max(0, int(request.query_params.get("at", "0")))
    except ValueError:
        position = 0

    def gather() -> dict[str, Any]:
        state = labelling.queue_state(console)
        return {"queue": state, "item": labelling.item_at(console, state, position), "queue_file": str(labelling.queue_path(console))}

    return render(request, "labelling.html", user, **(await blocking(gather)))


@page
async def label_route(request: Request, user: str) -> Response:
    console = console_of(request)
    form = await form_of(request)
    label = labelling.label_from_form(form)
    text = await blocking(labelling.store_label, console, user, request.path_params["failure_id"], label)
    flash(request, text)
    return see_other("/labelling?" + urlencode({"at": form.get("at", "0")}))


# --- failures and versions -------------------------------------------------------------------------------------


@page
async def failures_page(request: Request, user: str) -> Response:
    console = console_of(request)
    params = dict(request.query_params)
    flt = failures.parse_filter(console, params)
    after = failures.parse_after(params.get("after"))

    def gather() -> dict[str, Any]:
        return {"page": failures.page_of(console, flt, after), "choices": failures.choices.get(console)}

    found = await blocking(gather)
    chosen = {k: v for k, v in flt.model_dump().items() if v}
    return render(request, "failures.html", user, flt=flt, chosen=chosen, query=urlencode(chosen), first_page=after is None, **found)


@page
async def failure_page(request: Request, user: str) -> Response:
    found = await blocking(failures.provenance, console_of(request), request.path_params["failure_id"])
    return render(request, "failure.html", user, p=found)


@page
async def versions_page(request: Request, user: str) -> Response:
    console = console_of(request)

    def gather() -> dict[str, Any]:
        store = console.ctx.store
        return {"versions": registry.list_versions(store), "events": registry.alias_history(store, limit=30)}

    found = await blocking(gather)
    aliases = {alias: v.id for v in found["versions"] for alias in v.aliases}
    may_decide = user in console.settings.approvals.approvers
    return render(request, "versions.html", user, aliases=aliases, may_decide=may_decide, **found)


@page
async def rollback_route(request: Request, user: str) -> Response:
    console = console_of(request)
    form = await form_of(request)
    champion, previous = form.get("champion", ""), form.get("previous", "")
    if not champion or not previous:
        raise NotFoundError("there is no previous version to roll back to")
    text = await blocking(versions.rollback, console, user, champion, previous, form.get("reason", ""))
    flash(request, text)
    return see_other("/versions")


ROUTES = [
    Route("/", overview_page),
    Route("/approvals", approvals_page),
    Route("/approvals/{version}", approval_page),
    Route("/approvals/{version}", decide_route, methods=["POST"]),
    Route("/reports/{version}", report_route),
    Route("/labelling", labelling_page),
    Route("/labelling/{failure_id}", label_route, methods=["POST"]),
    Route("/failures", failures_page),
    Route("/failures/{failure_id}", failure_page),
    Route("/versions", versions_page),
    Route("/versions/rollback", rollback_route, methods=["POST"]),
]
