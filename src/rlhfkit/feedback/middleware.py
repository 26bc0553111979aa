"""ASGI middleware of the labeling app: security headers on every response, and a request-body limit
that holds before anything parses the body.

Content-Security-Policy: scripts and styles only from the app's own files (no inline script, so
injected markup cannot run code even if it got past the sanitiser), images from the app or ``data:``
(the admin plot), no plugins, no framing, forms post only to the app.
"""

from __future__ import annotations

import contextlib
import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                           "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
]
MiB = 1024 * 1024


class SecurityHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers)


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """Refuse a request body over ``limit`` bytes (``uploads`` for paths starting with an entry of
    ``upload_paths``) with 413: at once when Content-Length says so, else as soon as the streamed bytes
    pass the limit, so an oversized body is never held in memory or parsed."""

    def __init__(self, app: ASGIApp, limit: int = MiB, uploads: int = 256 * MiB,
                 upload_paths: tuple[str, ...] = ("/admin/projects",)) -> None:
        self.app, self.limit, self.uploads, self.upload_paths = app, limit, uploads, upload_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.uploads if scope["path"].startswith(self.upload_paths) else self.limit
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return await _too_large(send, limit)
        received, app_started, refused = 0, False, False

        async def counted_receive() -> Message:
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    if not app_started and not refused:  # answer now; what the app makes of it is dropped
                        refused = True
                        await _too_large(send, limit)
                    raise BodyTooLarge
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal app_started
            if refused:
                return
            app_started = app_started or message["type"] == "http.response.start"
            await send(message)

        with contextlib.suppress(BodyTooLarge):
            await self.app(scope, counted_receive, tracked_send)


async def _too_large(send: Send, limit: int) -> None:
    body = json.dumps({"detail": f"the request body is over the limit of {limit // MiB} MiB"}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
