"""Secret references in parameter values and connector credentials.

A value in the app file may refer to a secret instead of holding it:

- ``${{ secrets.name }}`` or ``${{ name }}``: a secret value, usually a string;
- ``${{ connection.name }}``: a connection, a mapping of settings
  (Patterns' ``Connection`` parameters).

A reference may be the whole value (it is then replaced by the secret, keeping
its type) or part of a longer string (``"Bearer ${{ secrets.token }}"``; the
secret is then inserted as text).

Secret values are never read from the app file. They come from, in order:

1. the environment variable ``STEPWELL_SECRET_<NAME>`` (the reference upper-cased,
   other characters than letters and digits turned into ``_``; for a
   connection ``STEPWELL_SECRET_CONNECTION_<NAME>`` holding a JSON object);
2. ``<app>/.stepwell/secrets.toml``: top-level keys are secrets, and a
   ``[connection.<name>]`` table is a connection.

Example ``secrets.toml``::

    example_key = "abc123"

    [connection.warehouse]
    host = "db.internal"
    password = "..."
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "SECRETS_FILE",
    "SecretError",
    "env_var_name",
    "find_secret_refs",
    "lookup",
    "malformed_refs",
    "resolve",
]

SECRETS_FILE = Path(".stepwell") / "secrets.toml"
"""Where an app's secrets file lives, relative to the app folder."""

_REF = re.compile(
    r"\$\{\{\s*(?:(?P<scope>secrets|connection)\s*\.\s*)?(?P<name>[A-Za-z_][A-Za-z0-9_-]*)\s*\}\}"
)


_TEMPLATE = re.compile(r"\$\{\{.*?\}\}")


def malformed_refs(text: str) -> list[str]:
    """The ``${{ … }}`` pieces of ``text`` that are not secret references (a typo such
    as ``${{ secret.key }}`` would otherwise reach the step as it is written)."""
    return [m.group() for m in _TEMPLATE.finditer(text) if not _REF.fullmatch(m.group())]


class SecretError(Exception):
    """A referenced secret cannot be found or used. The message is one line."""

    def __init__(self, message: str, *, secret: str, step: str | None = None) -> None:
        super().__init__(message)
        self.secret = secret
        self.step = step


def _ref_name(match: re.Match[str]) -> str:
    name = match.group("name")
    return f"connection.{name}" if match.group("scope") == "connection" else name


def find_secret_refs(value: Any) -> set[str]:
    """Names of the secrets referenced anywhere inside ``value`` (strings, lists, mappings).

    ``${{ secrets.x }}`` and ``${{ x }}`` give ``"x"``; ``${{ connection.x }}``
    gives ``"connection.x"``.
    """
    found: set[str] = set()
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            found.update(_ref_name(m) for m in _REF.finditer(item))
        elif isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, list | tuple | set | frozenset):
            stack.extend(item)
    return found


def env_var_name(ref: str) -> str:
    """The environment variable that holds secret ``ref`` (``connection.x`` -> ``..._CONNECTION_X``)."""
    return "STEPWELL_SECRET_" + re.sub(r"[^A-Za-z0-9]", "_", ref).upper()


class _Source:
    """Secrets of one app: the environment first, then ``secrets.toml`` (read once, lazily)."""

    def __init__(self, app_root: Path, env: Mapping[str, str]) -> None:
        self.path = Path(app_root) / SECRETS_FILE
        self.env = env
        self._file: dict[str, Any] | None = None

    def _file_data(self, ref: str, step: str | None) -> dict[str, Any]:
        if self._file is None:
            try:
                self._file = tomllib.loads(self.path.read_text(encoding="utf-8"))
            except FileNotFoundError:
                self._file = {}
            except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
                raise SecretError(
                    f"cannot read {self.path} while looking up secret {ref!r}: {exc}"
                    " (fix the TOML syntax of that file)",
                    secret=ref,
                    step=step,
                ) from None
        return self._file

    def get(self, ref: str, step: str | None) -> Any:
        is_connection = ref.startswith("connection.")
        var = env_var_name(ref)
        if var in self.env:
            raw = self.env[var]
            if not is_connection:
                return raw
            try:
                parsed = json.loads(raw)
            except ValueError:
                parsed = None
            if not isinstance(parsed, dict):
                raise SecretError(
                    f"environment variable {var} for {ref!r} is not a JSON object"
                    ' (set it to e.g. {"api_key": "..."})',
                    secret=ref,
                    step=step,
                )
            return parsed
        data = self._file_data(ref, step)
        if is_connection:
            name = ref.split(".", 1)[1]
            connections = data.get("connection")
            value = connections.get(name) if isinstance(connections, dict) else None
            if isinstance(value, dict):
                return value
        elif ref in data:
            return data[ref]
        raise SecretError(_missing_message(ref, step, var, self.path), secret=ref, step=step)


def _missing_message(ref: str, step: str | None, var: str, path: Path) -> str:
    user = f" used by step {step!r}" if step else ""
    if ref.startswith("connection."):
        name = ref.split(".", 1)[1]
        where = f"add a [connection.{name}] table to {path}, or set {var} to a JSON object"
        return f"connection {name!r}{user} is not set ({where})"
    return f'secret {ref!r}{user} is not set (set the environment variable {var} or add {ref} = "..." to {path})'


def lookup(
    ref: str,
    app_root: Path,
    env: Mapping[str, str] | None = None,
    *,
    step: str | None = None,
) -> Any:
    """The value of one secret reference (``"x"`` or ``"connection.x"``).

    Raises :class:`SecretError` naming the secret, the step and where to set it.
    """
    return _Source(app_root, os.environ if env is None else env).get(ref, step)


def resolve(
    value: Any,
    app_root: Path,
    env: Mapping[str, str] | None = None,
    *,
    step: str | None = None,
) -> Any:
    """A copy of ``value`` with every secret reference replaced by the secret.

    ``env`` defaults to ``os.environ``; ``step`` is only used in error messages.
    A reference that is the whole string becomes the secret's value as is (a
    connection becomes a dict); a reference inside a longer string is inserted
    as text. Raises :class:`SecretError` for a missing secret or a connection
    used inside a longer string.
    """
    source = _Source(app_root, os.environ if env is None else env)

    def substitute(text: str) -> Any:
        whole = _REF.fullmatch(text.strip())
        if whole:
            return source.get(_ref_name(whole), step)

        def insert(match: re.Match[str]) -> str:
            ref = _ref_name(match)
            secret = source.get(ref, step)
            if isinstance(secret, dict | list):
                raise SecretError(
                    f"{ref!r} is a mapping and cannot be inserted into a longer string"
                    f"{f' in step {step!r}' if step else ''}"
                    " (make the reference the whole value)",
                    secret=ref,
                    step=step,
                )
            return str(secret)

        return _REF.sub(insert, text)

    def walk(item: Any) -> Any:
        if isinstance(item, str):
            return substitute(item) if "${{" in item else item
        if isinstance(item, Mapping):
            return {key: walk(val) for key, val in item.items()}
        if isinstance(item, list):
            return [walk(val) for val in item]
        if isinstance(item, tuple):
            return tuple(walk(val) for val in item)
        return item

    return walk(value)
