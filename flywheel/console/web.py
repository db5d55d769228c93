"""What every console page shares: the templates, the security headers, login and CSRF checks, flashes.

`page(handler)` wraps a route: it finds the person (flywheel.console.auth.current_user), sends an
unauthenticated GET for a page to the login page and answers anything else without a user with 401,
and refuses a POST whose CSRF token is wrong (403) before the handler runs. The handler receives the
request and the user's name and returns a response; blocking work (the store, the graph) runs in a
worker thread through `blocking`.

The templates render with autoescape on: a logged conversation holding `<script>` shows as text.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import quote

from jinja2 import Environment, PackageLoader, StrictUndefined
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from flywheel.console.auth import csrf_ok, csrf_token, current_user
from flywheel.context import Context
from flywheel.errors import FlywheelError, NotFoundError, PolicyViolation
from flywheel.settings import Settings

log = logging.getLogger("flywheel.console")

# Scripts only from the console itself (the one static file); inline style attributes are allowed for the
# SVG charts, which flywheel.evals.charts builds with escaped text. Nothing may frame a console page.
CONSOLE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "form-action 'self'; frame-src 'self'; base-uri 'none'; frame-ancestors 'none'"
)
# An eval report served as it is: the CSP its own page carries (flywheel.evals.report.html), and framed
# only by the console's approval page.
REPORT_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'self'"
SECURITY_HEADERS = {
    "content-security-policy": CONSOLE_CSP,
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
    "cross-origin-opener-policy": "same-origin",
}

T = TypeVar("T")
Handler = Callable[[Request, str], Awaitable[Response]]


@dataclass
class Console:
    """What the routes need, built once per app."""

    ctx: Context
    env: Environment
    # one decision or rollback at a time in this process (the store serialises across processes)
    decide_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def settings(self) -> Settings:
        return self.ctx.settings


def template_env() -> Environment:
    env = Environment(
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        loader=PackageLoader("flywheel.console", "templates"),
    )
    env.filters.update(pct=_pct, q=lambda value: quote(str(value), safe=""))
    return env


def _pct(value: float | None) -> str:
    return "\u2013" if value is None else f"{value:.1%}"


def console_of(request: Request) -> Console:
    return request.app.state.console


def render(request: Request, name: str, user: str | None, status: int = 200, **values: Any) -> HTMLResponse:
    console = console_of(request)
    html = console.env.get_template(name).render(
        user=user, csrf=csrf_token(request.session), flash=request.session.pop("flash", None), path=request.url.path, **values
    )
    return HTMLResponse(html, status_code=status)


def flash(request: Request, text: str, ok: bool = True) -> None:
    """A one-line notice shown on the next page (after the redirect that follows a POST)."""
    request.session["flash"] = {"text": text, "ok": ok}


def see_other(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


async def blocking(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    return await run_in_threadpool(fn, *args, **kwargs)


async def form_of(request: Request) -> dict[str, str]:
    form = await request.form()
    return {key: value for key, value in form.items() if isinstance(value, str)}


def page(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """Authentication and CSRF in front of a route (see the module's docstring)."""

    @functools.wraps(handler)
    async def guarded(request: Request) -> Response:
        console = console_of(request)
        user = await blocking(current_user, request, console.ctx.store, console.settings)
        if user is None:
            if request.method == "GET" and "text/html" in request.headers.get("accept", "text/html"):
                return see_other("/login?next=" + quote(request.url.path, safe="/"))
            return PlainTextResponse("log in first: POST /login with your console token", status_code=401)
        if request.method == "POST":
            form = await form_of(request)
            if not csrf_ok(request.session, form.get("csrf")):
                return PlainTextResponse("refused: the form's CSRF token is missing or stale; reload the page", status_code=403)
        try:
            return await handler(request, user)
        except FlywheelError as exc:  # bad input, a refused decision: one line on an error page
            return render(request, "error.html", user, status=_status(exc), message=str(exc))

    return guarded


def _status(exc: FlywheelError) -> int:
    if isinstance(exc, NotFoundError):
        return 404
    if isinstance(exc, PolicyViolation):
        return 403
    return 400


class SecurityHeaders:
    """Pure ASGI middleware: the headers of SECURITY_HEADERS on every HTTP response, unless the route
    set its own (the report route sets the report's CSP)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    if name not in headers:
                        headers[name] = value
            await send(message)

        await self.app(scope, receive, with_headers)
