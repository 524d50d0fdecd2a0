"""``APP/.stepwell/server.json``: how other processes find a running server.

Kept apart from the server itself so that a CLI command can look for a server
without importing the web stack.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

SERVER_FILE = "server.json"


def state_dir(app_root: Path) -> Path:
    return Path(app_root) / ".stepwell"


def store_key(url: str | None) -> str:
    """A digest identifying a store URL without revealing it (for server.json)."""
    text = (url or "").strip() or "duckdb"
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class ServerInfo:
    url: str
    host: str
    port: int
    pid: int
    token_path: str
    store_key: str
    started_at: str
    #: the app folder it serves: a copy of the folder (with its .stepwell) is another app
    app_root: str

    def token(self) -> str | None:
        from stepwell.server.auth import TokenFile

        return TokenFile(Path(self.token_path)).read()


def read_server_info(app_root: Path) -> ServerInfo | None:
    """The live server of the app, if any (a stale file is removed; one copied
    with the folder from another app, whose server it names, is ignored)."""
    path = state_dir(app_root) / SERVER_FILE
    try:
        data = json.loads(path.read_text())
        info = ServerInfo(**{k: data[k] for k in ServerInfo.__dataclass_fields__})
    except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
        return None
    from stepwell.engine.hosts import process_alive

    if not process_alive(info.pid):
        with contextlib.suppress(OSError):
            path.unlink()
        return None
    if Path(info.app_root) != Path(app_root).resolve():
        return None
    return info
