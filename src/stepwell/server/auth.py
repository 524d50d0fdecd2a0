"""Bearer tokens: the server's own token, and the per-webhook ones.

The server's token is generated on first start and kept in
``APP/.stepwell/token`` (mode 0600); ``stepwell token APP --rotate`` replaces
it, and a running server picks the new one up on its next request (the file is
re-read when its modification time changes). It is required on every request
when the server listens beyond loopback; on 127.0.0.1 / ::1 / localhost no
token is needed. A webhook with its own ``token:`` accepts that token (or the
server's) and nothing else, whatever the bind address.

The web UI's static files (``GET /`` and ``GET /ui/...``) are the one exception:
they carry no data and no secrets, and the page sends the token on each API call.

Without a token, being on loopback is not enough: any web page the user opens
may make the browser send requests to 127.0.0.1 (a form's POST needs no
permission), and a page whose name is re-pointed at 127.0.0.1 (DNS rebinding)
may even read the answers. So a server without a token answers only requests
addressed to a loopback name and sent by no page or by its own (the web UI).
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import secrets
import threading
from pathlib import Path
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from stepwell.server.errors import error_response

TOKEN_FILE = "token"
#: Paths under this prefix check their own tokens (see ``routes.webhooks``).
WEBHOOK_PREFIX = "/api/webhooks/"
#: Action routes also accept user tokens and check them themselves (``routes.actions``).
ACTIONS_PREFIX = "/api/actions"
#: The web UI's static files (``routes.ui``), public: they ask for the token themselves.
UI_PREFIX = "/ui/"


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class TokenFile:
    """The server token in ``APP/.stepwell/token``."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._cached: tuple[float, str] | None = None

    def ensure(self) -> tuple[str, bool]:
        """The token, generating it first if there is none; (token, created)."""
        current = self.read()
        if current:
            return current, False
        return self.rotate(), True

    def rotate(self) -> str:
        """Replace the token with a new random one and return it."""
        token = secrets.token_urlsafe(32)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(token + "\n")
        os.replace(tmp, self.path)
        return token

    def read(self) -> str | None:
        """The current token (re-read only when the file changed)."""
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            return None
        with self._lock:
            if self._cached is None or self._cached[0] != mtime:
                self._cached = (mtime, self.path.read_text().strip())
            return self._cached[1] or None


def bearer(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The token of an ``Authorization: Bearer …`` header, if any."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def is_public_ui(scope: Scope) -> bool:
    """Whether the request only fetches the web UI's static files: ``GET /``,
    ``GET /ui`` (both redirect) or ``GET /ui/<file>``, without ``..`` segments."""
    if scope.get("method") != "GET":
        return False
    path: str = scope["path"]
    if path in ("/", UI_PREFIX.rstrip("/")):
        return True
    return path.startswith(UI_PREFIX) and ".." not in path.split("/")


def token_matches(given: str | None, *expected: str | None) -> bool:
    """Constant-time comparison of ``given`` against any of ``expected``."""
    if not given:
        return False
    ok = False
    for token in expected:
        if token:
            ok |= hmac.compare_digest(given.encode(), token.encode())
    return ok


class BearerAuthMiddleware:
    """401 for every request without the server token (webhooks and actions check
    their own; the UI's static files need none)."""

    def __init__(self, app: ASGIApp, tokens: TokenFile, *, required: bool):
        self.app = app
        self.tokens = tokens
        self.required = required

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or not self.required
            or scope["path"].startswith((WEBHOOK_PREFIX, ACTIONS_PREFIX))
            or is_public_ui(scope)
            or token_matches(bearer(scope["headers"]), self.tokens.read())
        ):
            await self.app(scope, receive, send)
            return
        response = error_response(
            401,
            "this server needs its API token: send `Authorization: Bearer <token>` "
            "(the token is in APP/.stepwell/token)",
            headers={"WWW-Authenticate": "Bearer"},
        )
        await response(scope, receive, send)


def foreign_request(headers: list[tuple[bytes, bytes]]) -> str | None:
    """Why a request must not reach a server that has no token, or None: it is
    addressed to another name than a loopback one (DNS rebinding), or a web page
    of another origin sent it (cross-site request forgery)."""
    found = {name: value.decode("latin-1") for name, value in headers
             if name in (b"host", b"origin", b"sec-fetch-site")}  # fmt: skip
    host = found.get(b"host", "")
    hostname = urlsplit("//" + host).hostname if host else None
    if host and not (hostname and is_loopback(hostname)):
        return (
            f"this server listens on loopback without a token and answers requests for "
            f"localhost or 127.0.0.1 only, not for {host!r}; to serve other names, start it "
            f"with --host (it then requires its API token)"
        )
    origin = found.get(b"origin")
    cross_site = found.get(b"sec-fetch-site") == "cross-site"
    if cross_site or (origin is not None and urlsplit(origin).netloc.lower() != host.lower()):
        return (
            f"requests from other web pages ({origin or 'a cross-site page'}) are refused: "
            f"this server has no token, so only its own web UI and non-browser clients may call it"
        )
    return None


class LoopbackGuardMiddleware:
    """403 for requests :func:`foreign_request` refuses (servers without a token)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        problem = foreign_request(scope["headers"]) if scope["type"] in ("http", "websocket") else None
        if problem is None:
            await self.app(scope, receive, send)
            return
        await error_response(403, problem)(scope, receive, send)
