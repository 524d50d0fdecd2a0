"""The eKuiper portable-plugin manifest (``<name>.json``), validated with pydantic.

A plugin folder (or zip) holds ``<name>.json`` beside its main program::

    {"version": "v1.0.0", "language": "python", "executable": "pysam.py",
     "sources": ["pyjson"], "sinks": ["print"], "functions": ["revert"]}

:func:`load_manifest` reads and checks it; every problem becomes a
:class:`ManifestError` whose message names the file and the field, so a user
knows exactly what to fix.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = ["SYMBOL_KINDS", "Manifest", "ManifestError", "load_manifest", "parse_manifest"]

#: Symbol kinds in manifest order, with the key that lists them.
SYMBOL_KINDS: tuple[tuple[str, str], ...] = (("source", "sources"), ("sink", "sinks"), ("function", "functions"))

_SYMBOL = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PLUGIN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class ManifestError(ValueError):
    """A plugin manifest is missing, unreadable or invalid; the message names the field."""


class Manifest(BaseModel):
    """The fields of an eKuiper plugin manifest that a host reads."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str | None = None
    """Must equal the plugin (folder/zip) name when present."""
    version: str = ""
    language: Literal["python", "go"]
    executable: str
    virtual_env_type: Literal["conda"] | None = Field(default=None, alias="virtualEnvType")
    env: str | None = None
    """The conda environment's name (with ``virtualEnvType: conda``)."""
    sources: list[str] = Field(default_factory=list)
    sinks: list[str] = Field(default_factory=list)
    functions: list[str] = Field(default_factory=list)

    @field_validator("version", mode="before")
    @classmethod
    def _version_text(cls, value: Any) -> Any:
        return "" if value is None else str(value) if isinstance(value, int | float) else value

    @field_validator("virtual_env_type", mode="before")
    @classmethod
    def _empty_env_type(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("executable")
    @classmethod
    def _executable(cls, value: str) -> str:
        text = value.strip()
        if not text:
            raise ValueError("must name the plugin's main program, e.g. \"main.py\"")
        if Path(text).is_absolute() or ".." in Path(text).parts:
            raise ValueError("must be a path inside the plugin folder")
        return text

    @field_validator("sources", "sinks", "functions", mode="before")
    @classmethod
    def _symbols(cls, value: Any) -> Any:
        if value is None:
            return []
        if isinstance(value, list):
            for item in value:
                if not isinstance(item, str) or not _SYMBOL.fullmatch(item):
                    raise ValueError(
                        f"symbol {item!r} is not a valid name (letters, digits and '_', "
                        "not starting with a digit)"
                    )
            if len(set(value)) != len(value):
                raise ValueError("lists a symbol twice")
        return value

    @model_validator(mode="after")
    def _at_least_one_symbol(self) -> Manifest:
        if not (self.sources or self.sinks or self.functions):
            raise ValueError("declares no symbol: list at least one of sources, sinks, functions")
        if self.virtual_env_type == "conda" and not (self.env or "").strip():
            raise ValueError("env: virtualEnvType conda needs the conda environment's name in `env`")
        return self

    def symbols(self) -> list[tuple[str, str]]:
        """``(kind, name)`` for every symbol, kind being source, sink or function."""
        return [(kind, name) for kind, key in SYMBOL_KINDS for name in getattr(self, key)]


def _field_of(loc: tuple[Any, ...]) -> str:
    aliases = {"virtual_env_type": "virtualEnvType"}
    parts = [aliases.get(str(p), str(p)) if not isinstance(p, int) else f"[{p}]" for p in loc]
    return ".".join(parts).replace(".[", "[")


def parse_manifest(data: Any, plugin_name: str, where: str) -> Manifest:
    """Validate a decoded manifest for plugin ``plugin_name``; ``where`` names the file."""
    if not _PLUGIN_NAME.fullmatch(plugin_name):
        raise ManifestError(
            f"{where}: plugin name {plugin_name!r} is not valid: use letters, digits and '_' "
            "(it becomes socket and symbol names), e.g. rename the folder or zip"
        )
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: the manifest must be a JSON object, not {type(data).__name__}")
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = _field_of(first["loc"]) or "manifest"
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "missing":
            message = "is required"
        elif first["type"] == "literal_error":
            allowed = {"language": '"python" or "go"', "virtualEnvType": '"conda" (or leave it out)'}
            message = f"must be {allowed.get(field, first['msg'])}, not {first.get('input')!r}"
        if message.startswith("env: "):
            field, message = "env", message.removeprefix("env: ")
        raise ManifestError(f"{where}: field `{field}` {message}") from None
    if manifest.name is not None and manifest.name != plugin_name:
        raise ManifestError(
            f"{where}: field `name` is {manifest.name!r} but the plugin is named "
            f"{plugin_name!r} (after its folder or zip): make them equal or drop `name`"
        )
    return manifest


def load_manifest(folder: Path, plugin_name: str) -> Manifest:
    """Read ``folder/<plugin_name>.json`` and check it, including that the executable exists."""
    path = Path(folder) / f"{plugin_name}.json"
    if not path.is_file():
        present = sorted(p.name for p in Path(folder).glob("*.json"))
        hint = f" (found {', '.join(present)})" if present else ""
        raise ManifestError(
            f"{folder}: no manifest {plugin_name}.json{hint}: an eKuiper plugin's manifest is "
            "named after the plugin (its folder or zip name)"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: cannot read the manifest: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from None
    manifest = parse_manifest(data, plugin_name, str(path))
    if not (Path(folder) / manifest.executable).is_file():
        raise ManifestError(
            f"{path}: field `executable` names {manifest.executable!r}, which is not in the "
            "plugin folder"
        )
    return manifest
