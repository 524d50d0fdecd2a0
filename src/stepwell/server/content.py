"""Request bodies are JSON unless they say they are something else."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

#: What ``curl -d`` (and a form) sends without ``-H content-type:...``: never a form here
_READ_AS_JSON = {b"", b"application/x-www-form-urlencoded"}


class JsonByDefaultMiddleware:
    """Lets ``curl -d '{"step": "x"}'`` work on every route with a JSON body: a
    body sent without a content type, or as a form, is read as JSON (the API takes
    no forms). Other types (Arrow uploads, say) are left as they are."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH"):
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            declared = next((v for k, v in scope["headers"] if k == b"content-type"), b"")
            if declared.split(b";")[0].strip().lower() in _READ_AS_JSON:
                scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)
