"""Who calls an action: users identified by bearer tokens.

Actions see their caller as ``user`` (``{"id": ..., "roles": [...], ...}``).
The server knows callers from ``APP/.stepwell/users.toml`` (re-read when it
changes), one table per user::

    [users.ann]
    token = "a-long-random-string"        # or token_sha256 = "<hex digest of the token>"
    roles = ["admin", "sales"]
    email = "ann@example.com"             # any other key is passed on in `user`

A request to ``/api/actions/...`` is identified by its
``Authorization: Bearer <token>`` header:

- a user's token: that user (``id`` is the table's name);
- the server's own token (``APP/.stepwell/token``): the app's owner,
  ``{"id": "owner", "roles": ["owner"]}``, who may also act as any user by
  sending ``X-Stepwell-User: {"id": ..., "roles": [...]}`` (the CLI's ``--user``);
- no token: refused when the server listens beyond loopback; on loopback the
  caller is ``{"id": "local", "roles": []}`` and may send ``X-Stepwell-User`` too.

Any other token is refused (401), on loopback as well.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import tomllib
from pathlib import Path
from typing import Any

USERS_FILE = "users.toml"
OWNER: dict[str, Any] = {"id": "owner", "roles": ["owner"]}


class UsersFileError(Exception):
    """``users.toml`` cannot be read or has a bad entry (the message names it)."""


class UserDirectory:
    """The users of ``APP/.stepwell/users.toml`` and their tokens."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: Any = None
        self._users: list[tuple[str | None, str | None, dict[str, Any]]] = []

    def _load(self) -> list[tuple[str | None, str | None, dict[str, Any]]]:
        try:
            stat = self.path.stat()
            stamp: Any = (stat.st_mtime_ns, stat.st_size)
        except FileNotFoundError:
            stamp = None
        with self._lock:
            if stamp == self._stamp:
                return self._users
            users: list[tuple[str | None, str | None, dict[str, Any]]] = []
            if stamp is not None:
                try:
                    data = tomllib.loads(self.path.read_text(encoding="utf-8"))
                except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
                    raise UsersFileError(f"cannot read {self.path}: {exc} (fix its TOML syntax)") from None
                table = data.get("users", {})
                if not isinstance(table, dict):
                    raise UsersFileError(f"{self.path}: `users` must be a table of [users.<id>] tables")
                for user_id, entry in table.items():
                    users.append(_entry(self.path, str(user_id), entry))
            self._users, self._stamp = users, stamp
            return users

    def lookup(self, token: str) -> dict[str, Any] | None:
        """The user whose token is ``token`` (compared in constant time), or None."""
        digest = hashlib.sha256(token.encode()).hexdigest()
        found = None
        for plain, hashed, user in self._load():
            match = False
            if plain is not None:
                match = hmac.compare_digest(token.encode(), plain.encode())
            if hashed is not None:
                match = match or hmac.compare_digest(digest, hashed.lower())
            if match and found is None:
                found = user
        return dict(found) if found is not None else None


def _entry(path: Path, user_id: str, entry: Any) -> tuple[str | None, str | None, dict[str, Any]]:
    where = f"{path}: [users.{user_id}]"
    if not isinstance(entry, dict):
        raise UsersFileError(f"{where} must be a table with `token` and `roles`")
    plain, hashed = entry.get("token"), entry.get("token_sha256")
    if plain is None and hashed is None:
        raise UsersFileError(f"{where} needs `token = \"...\"` or `token_sha256 = \"...\"`")
    for key, value in (("token", plain), ("token_sha256", hashed)):
        if value is not None and (not isinstance(value, str) or len(value) < 16):
            raise UsersFileError(f"{where}: `{key}` must be text of at least 16 characters")
    roles = entry.get("roles", [])
    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        raise UsersFileError(f"{where}: `roles` must be a list of strings")
    user = {k: v for k, v in entry.items() if k not in ("token", "token_sha256")}
    user.update(id=user_id, roles=list(roles))
    return plain, hashed, user
