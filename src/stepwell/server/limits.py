"""Request size limits, enforced before a route reads the body."""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from stepwell.server.errors import ApiError, error_response


class BodyTooLarge(ApiError):
    def __init__(self, limit: int):
        super().__init__(413, f"request body larger than {limit} bytes; send less per request")


class BodyLimitMiddleware:
    """413 for bodies over ``limit_for(path)`` bytes: at once when Content-Length
    says so, otherwise as soon as the streamed body passes the limit."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int]):
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > limit or declared < 0:
                    message = (
                        f"request body larger than {limit} bytes; send less per request"
                        if declared > limit else "invalid Content-Length header"
                    )
                    response = error_response(413 if declared > limit else 400, message)
                    await response(scope, receive, send)
                    return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, limited, send)
