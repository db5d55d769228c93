"""Running the Slack app: HTTP mode's endpoint (Starlette on uvicorn) and Socket Mode's handler.

HTTP mode needs a public HTTPS URL in front of it (a reverse proxy) that Slack posts events and
interactivity to: point both at /slack/events. Socket Mode needs no public endpoint: the app connects
out with the app-level token (SLACK_APP_TOKEN).
"""

from __future__ import annotations

from typing import Any

from flywheel.agent.slack import SlackTokens
from flywheel.errors import UserInputError

EVENTS_PATH = "/slack/events"


def signed(verifier: Any, body: bytes, headers: Any) -> bool:
    """Slack's signature over the body, with a timestamp no more than five minutes off. A missing or
    non-numeric header is a refusal, not an error."""
    timestamp, signature = headers.get("x-slack-request-timestamp", ""), headers.get("x-slack-signature", "")
    if not timestamp.isdigit() or not signature:
        return False
    return bool(verifier.is_valid(body, timestamp, signature))


class SlackHttpServer:
    """HTTP mode: the Bolt app behind Starlette on uvicorn, in a background thread. Slack posts to POST
    /slack/events; GET /healthz answers "ok".

    The signature is checked here before the body is parsed (an unsigned request gets 401 without
    reaching Bolt's parser, which answers malformed bodies with a 500 and a traceback), and again by
    Bolt's RequestVerification. Dispatch runs in Starlette's thread pool so that the event loop stays
    free while an ack function claims its request."""

    def __init__(self, app: Any, signing_secret: str, host: str = "127.0.0.1", port: int = 3000):
        from slack_bolt.adapter.starlette.handler import to_bolt_request, to_starlette_response
        from slack_sdk.signature import SignatureVerifier
        from starlette.applications import Starlette
        from starlette.concurrency import run_in_threadpool
        from starlette.requests import Request
        from starlette.responses import PlainTextResponse
        from starlette.routing import Route

        from flywheel.serve.server import ServerThread

        self.app = app
        verifier = SignatureVerifier(signing_secret)

        async def events(request: Request) -> Any:
            body = await request.body()
            if not signed(verifier, body, request.headers):
                return PlainTextResponse("invalid request", status_code=401)
            try:
                bolt_request = to_bolt_request(request, body)
            except ValueError:  # signed, but not a form or JSON body
                return PlainTextResponse("malformed request", status_code=400)
            return to_starlette_response(await run_in_threadpool(app.dispatch, bolt_request))

        async def healthz(_request: Request) -> Any:
            return PlainTextResponse("ok")

        web = Starlette(routes=[Route(EVENTS_PATH, events, methods=["POST"]), Route("/healthz", healthz, methods=["GET"])])
        # Bound here, before the thread starts, so that port 0 gives a known port and a taken one a clear error.
        try:
            self._server = ServerThread(web, host, port, name="slack-http", what="the Slack HTTP endpoint", lifespan="off").bind()
        except OSError as exc:
            raise UserInputError(f"cannot listen for Slack on {host}:{port}: {exc.strerror} (use --port)") from exc
        self.host, self.port = host, self._server.port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{EVENTS_PATH}"

    def start(self, timeout: float = 10.0) -> SlackHttpServer:
        self._server.start(timeout)
        return self

    def stop(self) -> None:
        self._server.stop(timeout=10)


def socket_mode_handler(app: Any, tokens: SlackTokens) -> Any:
    """Socket Mode: `.connect()` starts it in the background, `.close()` stops it. The connection is
    opened with the app-level token; the app's client keeps the bot token for everything else."""
    from slack_bolt.adapter.socket_mode import SocketModeHandler

    return SocketModeHandler(app, app_token=tokens.app_token, web_client=app.client)
