"""The console's ASGI app: `build_app(ctx)` -> Starlette, served by `flywheel console` with uvicorn.

    app = build_app(Context(settings=load_settings(project)))
    uvicorn.run(app, host="127.0.0.1", port=8090)

Middleware, outermost first: the security headers (flywheel.console.web.SecurityHeaders: strict CSP, no
framing, no sniffing, no caching) and the signed session cookie (HttpOnly, SameSite=Strict; Secure with
`console.secure_cookies`). Routes: /login and /logout here, the static script and style sheet, and the
pages of flywheel.console.pages. Nothing is served without a user but the login page and the two static
files, which hold no data.
"""

from __future__ import annotations

from importlib import resources
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from flywheel.console import auth
from flywheel.console.pages import ROUTES
from flywheel.console.web import Console, SecurityHeaders, blocking, console_of, form_of, render, see_other, template_env
from flywheel.context import Context

STATIC = {"console.js": "text/javascript; charset=utf-8", "console.css": "text/css; charset=utf-8"}


def build_app(ctx: Context, *, secret: str | None = None) -> Starlette:
    """The console over `ctx` (its store and settings). `secret` signs the session cookies (default:
    flywheel.console.auth.session_secret)."""
    settings = ctx.settings
    cfg = settings.console
    app = Starlette(
        routes=[
            Route("/login", login_page),
            Route("/login", login, methods=["POST"]),
            Route("/logout", logout, methods=["POST"]),
            Route("/static/{name}", static),
            *ROUTES,
        ],
        middleware=[
            Middleware(SecurityHeaders),
            Middleware(
                SessionMiddleware,
                secret_key=secret or auth.session_secret(settings),
                session_cookie=auth.SESSION_COOKIE,
                max_age=cfg.session_max_age_s,
                same_site="strict",
                https_only=cfg.secure_cookies,
            ),
        ],
    )
    app.state.console = Console(ctx=ctx, env=template_env())
    return app


def _local(target: str | None) -> str:
    """Where to go after logging in: a path on this site only (never another host)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    parts = urlsplit(target)
    return "/" if parts.scheme or parts.netloc else target


async def login_page(request: Request) -> Response:
    return render(request, "login.html", None, next=_local(request.query_params.get("next")), problem=None)


async def login(request: Request) -> Response:
    console = console_of(request)
    form = await form_of(request)
    target = _local(form.get("next"))
    if not auth.csrf_ok(request.session, form.get("csrf")):
        return render(request, "login.html", None, status=403, next=target, problem="The form expired; try again.")
    name = await blocking(auth.user_for_token, console.ctx.store, form.get("token", ""))
    if name is None:
        return render(request, "login.html", None, status=401, next=target, problem="That token is not a console user's (or was revoked).")
    auth.log_in(request, name)
    return see_other(target)


async def logout(request: Request) -> Response:
    form = await form_of(request)
    if not auth.csrf_ok(request.session, form.get("csrf")):
        return PlainTextResponse("refused: the form's CSRF token is missing or stale", status_code=403)
    auth.log_out(request)
    return see_other("/login")


async def static(request: Request) -> Response:
    name = request.path_params["name"]
    if name not in STATIC:
        return PlainTextResponse("not found", status_code=404)
    body = resources.files("flywheel.console").joinpath("static", name).read_bytes()
    return Response(body, media_type=STATIC[name], headers={"cache-control": "public, max-age=300"})
