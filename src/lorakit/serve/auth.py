"""The API key: every endpoint but ``/health`` needs ``Authorization: Bearer KEY``.

An ASGI middleware, so it guards every path, unknown ones included (a client without the key learns
nothing about the routes). The key is compared with :func:`hmac.compare_digest`, whose time does not
depend on where the first differing byte is, so the key cannot be guessed a byte at a time by timing.
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from lorakit.serve.responses import error_response

OPEN_PATHS = frozenset({"/health"})
"""Paths served without the key: what a load balancer's health check calls."""


class BearerAuth:
    """Answers 401 (OpenAI's error body, ``WWW-Authenticate: Bearer``) to a request without the right key."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.key = api_key.encode("utf-8")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or self.authorized(scope):
            await self.app(scope, receive, send)
            return
        response = error_response(401, "a valid API key is required: send the header 'Authorization: Bearer KEY'",
                                  code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)

    def authorized(self, scope: Scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        matches = hmac.compare_digest(token.strip(), self.key)
        return matches and scheme.lower() == b"bearer"
