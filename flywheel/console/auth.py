"""Who is using the console: console users and their tokens, sessions, the trusted proxy header, CSRF.

    token = create_user(store, "alice")      # "fwc-..." : shown once, only its sha256 is stored
    list_users(store) / revoke_user(store, "alice")

A person logs in with their token (POST /login); the session cookie then carries their name, signed
with the console's secret (Starlette's SessionMiddleware over itsdangerous; HttpOnly, SameSite=Strict,
Secure with `console.secure_cookies`). Every request re-checks that the name is still an active user,
so revoking a user ends their sessions at once.

Behind a reverse proxy that authenticates people itself, `console.trusted_header` (e.g.
"X-Forwarded-User") names the header it sets; it is believed only on requests whose client address is in
`console.trusted_proxies`, and a request from anywhere else carrying it is treated as if it did not.

Every form carries the session's CSRF token; a POST without the right one is refused before it does
anything. Whether a person may decide is not settled here: every write checks `approvals.approvers`
(flywheel.release.approvals.check_approver, channel "web").

Tokens are 256-bit random strings, so a fast sha256 is enough (the reasoning of flywheel.serve.keys).
"""

from __future__ import annotations

import hmac
import os
import secrets
from datetime import datetime
from typing import Any

from starlette.requests import Request

from flywheel.errors import NotFoundError, UserInputError
from flywheel.records import Record
from flywheel.serve.keys import check_name, hash_key
from flywheel.settings import Settings
from flywheel.store import console_users as user_repo
from flywheel.store.db import Store

TOKEN_PREFIX = "fwc-"
SECRET_FILE = "console_secret"  # under the state folder; FLYWHEEL_CONSOLE_SECRET overrides it
SESSION_COOKIE = "flywheel_console"


class ConsoleUser(Record):
    name: str
    revoked: bool
    created_at: datetime


def create_user(store: Store, name: str) -> str:
    """A new console user. Returns their login token; only its sha256 is stored."""
    name = check_name(name, "a console user needs a name, e.g. `flywheel console users add alice`", label="user name")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    if not user_repo.insert(store, name, hash_key(token)):
        raise UserInputError(f"a console user named {name!r} exists already (revoked users keep their name); choose another name")
    return token


def list_users(store: Store) -> list[ConsoleUser]:
    return [ConsoleUser(**row) for row in user_repo.list_all(store)]


def revoke_user(store: Store, name: str) -> ConsoleUser:
    """Revoke a user (again: no change). Their open sessions stop working with their next request."""
    row = user_repo.revoke(store, name)
    if row is None:
        raise NotFoundError(f"no console user named {name!r} (see `flywheel console users list`)")
    return ConsoleUser(revoked=True, **row)


def user_for_token(store: Store, token: str) -> str | None:
    token = token.strip()
    return user_repo.active_user(store, hash_key(token)) if token else None


# --- the session secret --------------------------------------------------------------------------------------


def session_secret(settings: Settings) -> str:
    """The key sessions are signed with: FLYWHEEL_CONSOLE_SECRET, else a random one kept in the state
    folder (created on first use, readable by its owner only) so that sessions survive a restart."""
    given = os.environ.get("FLYWHEEL_CONSOLE_SECRET", "").strip()
    if given:
        return given
    path = settings.state_path / SECRET_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:  # O_EXCL: of two consoles starting at once, one writes it and both read the same
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(secrets.token_urlsafe(48))
    secret = path.read_text(encoding="utf-8").strip()
    if not secret:
        raise UserInputError(f"{path} is empty: delete it and start the console again (or set FLYWHEEL_CONSOLE_SECRET)")
    return secret


# --- who is asking -------------------------------------------------------------------------------------------


def current_user(request: Request, store: Store, settings: Settings) -> str | None:
    """The logged-in person's name, or None: the trusted proxy's header (from a trusted address only),
    else the session, while its user is still active."""
    cfg = settings.console
    if cfg.trusted_header:
        client = request.client.host if request.client else ""
        named = request.headers.get(cfg.trusted_header, "").strip()
        if named and client in cfg.trusted_proxies:
            return named
    name = request.session.get("user")
    if isinstance(name, str) and name and user_repo.is_active(store, name):
        return name
    return None


def log_in(request: Request, name: str) -> None:
    request.session.clear()  # a fresh session (and CSRF token) at every login
    request.session["user"] = name


def log_out(request: Request) -> None:
    request.session.clear()


def csrf_token(session: dict[str, Any]) -> str:
    """The session's CSRF token, made on first use; every form sends it back."""
    token = session.get("csrf")
    if not isinstance(token, str) or not token:
        token = session["csrf"] = secrets.token_urlsafe(32)
    return token


def csrf_ok(session: dict[str, Any], submitted: object) -> bool:
    expected = session.get("csrf")
    return isinstance(expected, str) and isinstance(submitted, str) and bool(expected) and hmac.compare_digest(expected, submitted)
