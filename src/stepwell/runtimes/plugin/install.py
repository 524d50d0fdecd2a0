"""Installing eKuiper portable plugins into an app.

``install_plugin(app_root, path)`` takes a plugin folder or zip in eKuiper's
layout (``<name>.json`` manifest, the executable, helper files, optional
``install.sh`` and ``requirements.txt``, metadata under ``sources/``,
``sinks/``, ``functions/``) and copies it to ``APP/.stepwell/plugins/<name>/``.
Python plugins get an environment from :func:`stepwell.engine.envs.ensure_env`
(uv, cached by content hash) holding the plugin's requirements plus the
``ekuiper`` SDK; ``virtualEnvType: conda`` runs the plugin with ``conda run``
when conda exists, and otherwise falls back to the uv environment with a
warning. The result is recorded in ``.stepwell-install.json`` inside the
installed folder, which :func:`list_plugins` and the process launcher read.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stepwell.runtimes.plugin.manifest import Manifest, ManifestError, load_manifest

__all__ = [
    "InstalledPlugin",
    "PluginInstallError",
    "content_hash",
    "describe_plugin",
    "get_plugin",
    "install_plugin",
    "list_plugins",
    "plugins_dir",
    "remove_plugin",
    "symbol_owner",
]

RECORD = ".stepwell-install.json"
"""File inside an installed plugin's folder describing the installation."""
REQUIREMENTS = ".stepwell-requirements.txt"
"""Generated requirements file (the plugin's own plus the SDK) the env is built from."""
METADATA_DIRS = ("sources", "sinks", "functions")


class PluginInstallError(RuntimeError):
    """Installing, finding or removing a plugin failed; the message says what to do."""


@dataclass
class InstalledPlugin:
    """An installed plugin, as recorded at install time."""

    name: str
    folder: str
    version: str
    language: str
    executable: str
    sources: list[str]
    sinks: list[str]
    functions: list[str]
    command: list[str]
    """argv prefix that runs the executable (``[python, "-u"]``, ``[conda, run, ...]``, or [])."""
    env_key: str | None = None
    conda_env: str | None = None
    content_hash: str = ""
    installed_at: str = ""
    source_path: str = ""
    warnings: list[str] = field(default_factory=list)
    #: its functions that are aggregates, as they said when it was started at
    #: install (None: it was installed without that check)
    aggregate_functions: list[str] | None = None

    @property
    def path(self) -> Path:
        return Path(self.folder)

    def argv(self) -> list[str]:
        """The full command line eKuiper would use to start this plugin."""
        exe = str(self.path / self.executable)
        return [*self.command, exe, json.dumps({"sendTimeout": 1000})]

    def symbols(self) -> list[tuple[str, str]]:
        return (
            [("source", s) for s in self.sources]
            + [("sink", s) for s in self.sinks]
            + [("function", s) for s in self.functions]
        )

    def source_config(self, symbol: str, conf_key: str | None) -> dict[str, Any]:
        """The merged ``sources/<symbol>.yaml`` profile: ``default`` overlaid by ``conf_key``."""
        import yaml

        path = self.path / "sources" / f"{symbol}.yaml"
        if not path.is_file():
            return {}
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise PluginInstallError(f"{path}: not valid YAML: {exc}") from None
        config = dict(data.get("default") or {})
        if conf_key:
            if conf_key not in data:
                raise PluginInstallError(
                    f"{path}: no profile {conf_key!r} (CONF_KEY of the stream); profiles: "
                    f"{', '.join(sorted(data)) or 'none'}"
                )
            config.update(data.get(conf_key) or {})
        return config


def plugins_dir(app_root: Path) -> Path:
    return Path(app_root) / ".stepwell" / "plugins"


def content_hash(folder: Path) -> str:
    """sha256 over the relative paths and bytes of every file of a plugin folder."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel in (RECORD, REQUIREMENTS) or "__pycache__" in rel:
            continue
        digest.update(rel.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _unpack(path: Path, workdir: Path) -> tuple[str, Path]:
    """Plugin name and the folder holding its files, for a folder or a zip."""
    if path.is_dir():
        return path.name, path
    if path.suffix.lower() != ".zip" or not zipfile.is_zipfile(path):
        raise PluginInstallError(f"{path}: not a plugin folder or a .zip file")
    name = path.stem
    target = workdir / name
    with zipfile.ZipFile(path) as archive:
        for member in archive.namelist():
            resolved = (target / member).resolve()
            if not str(resolved).startswith(str(target.resolve())):
                raise PluginInstallError(f"{path}: unsafe member path {member!r} in the zip")
        archive.extractall(target)
    entries = [p for p in target.iterdir() if p.name != "__MACOSX"]
    if not (target / f"{name}.json").exists() and len(entries) == 1 and entries[0].is_dir():
        return name, entries[0]  # zip of a folder
    return name, target


def _requirements(folder: Path) -> Path:
    """Write the requirements file of the plugin's environment: its own plus the SDK."""
    lines = ["# generated by stepwell: the plugin's requirements plus the ekuiper SDK"]
    own = folder / "requirements.txt"
    names_sdk = False
    if own.is_file():
        lines.append("-r requirements.txt")
        text = own.read_text(errors="replace").lower()
        names_sdk = any(
            line.strip().startswith("ekuiper") for line in text.splitlines()
        )
    if not names_sdk:
        lines.append("ekuiper>=2.4")
    target = folder / REQUIREMENTS
    target.write_text("\n".join(lines) + "\n")
    return target


def _environment(folder: Path, manifest: Manifest) -> tuple[list[str], str | None, str | None, list[str]]:
    """``(command prefix, env key, conda env, warnings)`` for running the executable."""
    warnings: list[str] = []
    if manifest.language == "go":
        return [], None, None, warnings
    if manifest.virtual_env_type == "conda":
        conda = shutil.which("conda")
        if conda:
            return [conda, "run", "-n", str(manifest.env), "python"], None, manifest.env, warnings
        warnings.append(
            f"virtualEnvType conda (env {manifest.env!r}) requested but conda is not installed; "
            "using a uv environment built from the plugin's requirements.txt instead"
        )
    from stepwell.engine.envs import EnvError, ensure_env

    requirements = _requirements(folder)
    try:
        info = ensure_env(requirements)
    except EnvError as exc:
        raise PluginInstallError(f"plugin {folder.name!r}: {exc}") from None
    python = info.site_packages.parents[2] / "bin" / "python"
    return [str(python), "-u"], info.key, None, warnings


def _run_install_script(folder: Path, command: list[str]) -> None:
    script = folder / "install.sh"
    if not script.is_file():
        return
    env = dict(os.environ)
    if command and command[0].endswith("/python"):
        bin_dir = str(Path(command[0]).parent)
        env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
        env["VIRTUAL_ENV"] = str(Path(bin_dir).parent)
    proc = subprocess.run(
        ["/bin/sh", str(script)],
        cwd=folder,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        errors="replace",
        check=False,
    )
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise PluginInstallError(
            f"plugin {folder.name!r}: install.sh exited with status {proc.returncode}: {tail}"
        )


def list_plugins(app_root: Path) -> list[InstalledPlugin]:
    """Installed plugins of the app, by name."""
    root = plugins_dir(app_root)
    found = []
    if root.is_dir():
        for folder in sorted(root.iterdir()):
            record = folder / RECORD
            if record.is_file():
                found.append(InstalledPlugin(**json.loads(record.read_text())))
    return found


def get_plugin(app_root: Path, name: str) -> InstalledPlugin:
    record = plugins_dir(app_root) / name / RECORD
    if not record.is_file():
        known = ", ".join(p.name for p in list_plugins(app_root)) or "none"
        raise PluginInstallError(
            f"plugin {name!r} is not installed in {app_root} (installed: {known}); "
            f"install it with `stepwell plugin install {app_root} PATH`"
        )
    return InstalledPlugin(**json.loads(record.read_text()))


def symbol_owner(app_root: Path, kind: str, symbol: str) -> InstalledPlugin | None:
    """The installed plugin serving ``symbol`` of ``kind`` (source, sink, function)."""
    for plugin in list_plugins(app_root):
        if (kind, symbol) in plugin.symbols():
            return plugin
    return None


def install_plugin(app_root: Path, path: Path, *, force: bool = False,
                   check: bool = True) -> InstalledPlugin:
    """Install (or reinstall) the plugin at ``path`` into the app; see the module docstring.

    An installed plugin with identical content is kept as is unless ``force``.
    With ``check`` the plugin is started once before it replaces what was
    installed (as eKuiper 2 does): one that does not start, answers under
    another name or lacks a function it lists is refused, naming why.
    """
    path = Path(path).expanduser().resolve()
    if not path.exists():
        raise PluginInstallError(f"{path}: no such plugin folder or zip")
    with tempfile.TemporaryDirectory(prefix="stepwell-plugin-") as tmp:
        name, source = _unpack(path, Path(tmp))
        try:
            manifest = load_manifest(source, name)
        except ManifestError as exc:
            raise PluginInstallError(str(exc)) from None
        digest = content_hash(source)
        for other in list_plugins(app_root):
            if other.name == name:
                continue
            for kind, symbol in manifest.symbols():
                if (kind, symbol) in other.symbols():
                    raise PluginInstallError(
                        f"plugin {name!r}: {kind} {symbol!r} is already served by installed "
                        f"plugin {other.name!r}; symbol names are global: rename it or remove "
                        f"{other.name!r} first"
                    )
        target = plugins_dir(app_root) / name
        existing = target / RECORD
        if existing.is_file() and not force:
            current = InstalledPlugin(**json.loads(existing.read_text()))
            if current.content_hash == digest:
                return current
        staging = plugins_dir(app_root) / f".{name}.installing"
        shutil.rmtree(staging, ignore_errors=True)
        staging.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(source, staging, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    try:
        command, env_key, conda_env, warnings = _environment(staging, manifest)
        _run_install_script(staging, command)
        record = _record(name, staging, manifest, command, env_key, conda_env, digest, path, warnings)
        if check:
            record.aggregate_functions = _started_once(record)
        shutil.rmtree(target, ignore_errors=True)
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    record.folder = str(target.resolve())
    (target / RECORD).write_text(json.dumps(asdict(record), indent=2) + "\n")
    return record


def _started_once(plugin: InstalledPlugin) -> list[str]:
    """Start the plugin once (see ``install_plugin``): its aggregate functions."""
    from stepwell.runtimes.plugin.manager import check_plugin
    from stepwell.runtimes.plugin.process import PluginError

    try:
        return check_plugin(plugin)
    except PluginError as exc:
        raise PluginInstallError(f"plugin {plugin.name!r} was not installed (it is started once "
                                 f"to check it, as eKuiper does): {exc}") from None


def _record(name: str, folder: Path, manifest: Manifest, command: list[str], env_key: str | None,
            conda_env: str | None, digest: str, path: Path, warnings: list[str]) -> InstalledPlugin:
    return InstalledPlugin(
        name=name,
        folder=str(folder.resolve()),
        version=manifest.version,
        language=manifest.language,
        executable=manifest.executable,
        sources=list(manifest.sources),
        sinks=list(manifest.sinks),
        functions=list(manifest.functions),
        command=command,
        env_key=env_key,
        conda_env=conda_env,
        content_hash=digest,
        installed_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        source_path=str(path),
        warnings=warnings,
    )


def describe_plugin(app_root: Path, name: str) -> dict[str, Any]:
    """An installed plugin as ``plugin describe`` shows it (eKuiper's ``describe
    plugin``): its install record plus ``symbols``, one entry per symbol with
    ``kind``, ``name`` and what its metadata files say (``description``, a
    function's ``hint`` and ``aggregate``, a source's config ``profiles``)."""
    plugin = get_plugin(app_root, name)
    symbols = []
    for kind, symbol in plugin.symbols():
        entry: dict[str, Any] = {"kind": kind, "name": symbol}
        entry.update(_symbol_metadata(plugin, kind, symbol))
        symbols.append(entry)
    return {**asdict(plugin), "symbols": symbols}


def _symbol_metadata(plugin: InstalledPlugin, kind: str, symbol: str) -> dict[str, Any]:
    """What the plugin's metadata files say of one symbol (eKuiper layout:
    ``sources/<s>.json``, ``sinks/<s>.json``, ``functions/*.json`` listing functions)."""
    folder = plugin.path / f"{kind}s"
    info: dict[str, Any] = {}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        data = _json_or_none(path)
        if not isinstance(data, dict):
            continue
        listed = [f for f in data.get("functions") or [] if isinstance(f, dict) and f.get("name") == symbol]
        if path.stem != symbol and not listed:
            continue
        description = _english((data.get("about") or {}).get("description"))
        if description:
            info["description"] = description
        if listed and _english(listed[0].get("hint")):
            info["hint"] = _english(listed[0].get("hint"))
        break
    if kind == "function" and plugin.aggregate_functions is not None:
        info["aggregate"] = symbol in plugin.aggregate_functions
    if kind == "source":
        profiles = plugin.path / "sources" / f"{symbol}.yaml"
        if profiles.is_file():
            import yaml

            try:
                info["profiles"] = sorted(yaml.safe_load(profiles.read_text()) or {})
            except (yaml.YAMLError, TypeError):
                info["profiles"] = []
    return info


def _json_or_none(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _english(text: Any) -> str | None:
    """A metadata text: a plain string, or eKuiper's ``{"en_US": ..., "zh_CN": ...}``."""
    if isinstance(text, dict):
        text = text.get("en_US") or next(iter(text.values()), None)
    return str(text) if text else None


def remove_plugin(app_root: Path, name: str) -> InstalledPlugin:
    """Delete an installed plugin's folder; returns what was removed."""
    plugin = get_plugin(app_root, name)
    shutil.rmtree(plugin.path)
    return plugin
