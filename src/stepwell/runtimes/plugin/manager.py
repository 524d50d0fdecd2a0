"""The plugin host of one app: processes, function pools and symbol channels.

``PluginManager(app_root)`` starts plugin processes on first use (like
eKuiper 2, a plugin's process then lives until :meth:`stop_all`), hands out
source/sink channels on a plugin's primary process, and function pools that
spread calls over ``processes`` processes of the plugin (each with its own
private ``/tmp``). ``STEPWELL_PLUGIN_PROCESSES`` sets the default pool size.

:func:`shared_manager` keeps one manager per app folder per host process, so
rules and ``sql:`` steps in one ``stepwell serve`` share plugin processes.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from pathlib import Path
from typing import Any

import pynng

from stepwell.runtimes.plugin.channels import FunctionChannel, SinkChannel, SourceChannel
from stepwell.runtimes.plugin.functions import FunctionPool
from stepwell.runtimes.plugin.install import (
    InstalledPlugin,
    PluginInstallError,
    get_plugin,
    install_plugin,
    list_plugins,
)
from stepwell.runtimes.plugin.process import PluginError, PluginProcess, namespaces_available

__all__ = ["PluginManager", "check_plugin", "default_processes", "shared_manager"]

log = logging.getLogger("stepwell.plugin")


def default_processes() -> int:
    """Processes per plugin function: ``STEPWELL_PLUGIN_PROCESSES``, else 2 (1 without namespaces)."""
    configured = os.environ.get("STEPWELL_PLUGIN_PROCESSES")
    if configured and configured.strip().isdigit() and int(configured) > 0:
        wanted = int(configured)
    else:
        wanted = 2
    return wanted if namespaces_available() else 1


def check_plugin(plugin: InstalledPlugin) -> list[str]:
    """Start ``plugin`` once and stop it, as eKuiper 2 does at install: its process
    must handshake (under its own name) and serve every function its manifest
    lists. Returns the functions that are aggregates; raises :class:`PluginError`
    saying what is wrong. (Sources and sinks are not started: they would run.)"""
    try:
        proc = PluginProcess(plugin)
    except pynng.AddressInUse:  # (no private /tmp, and the plugin runs already)
        return []
    try:
        proc.start()
        return [symbol for symbol in plugin.functions if _serves_function(proc, symbol)]
    finally:
        proc.quiet()
        proc.stop()


def _serves_function(proc: PluginProcess, symbol: str) -> bool:
    """Start function ``symbol`` in ``proc`` and ask it IsAggregate (its answer)."""
    name = proc.plugin.name
    try:
        channel = FunctionChannel(proc, symbol)
    except PluginError as exc:
        raise PluginError(
            f"plugin {name!r} lists function {symbol!r} in {name}.json but its process did not "
            f"start it ({exc}); add it to the functions of PluginConfig({name!r}, ...) in its "
            "code, or remove it from the manifest") from None
    try:
        return bool(channel.request("IsAggregate", None))
    finally:
        channel.close()


class PluginManager:
    """Plugin processes and channels for the app in ``app_root``."""

    def __init__(self, app_root: Path, *, processes: int | None = None) -> None:
        self.app_root = Path(app_root).resolve()
        self.processes = processes
        self._lock = threading.RLock()
        self._primary: dict[str, PluginProcess] = {}
        self._extra: dict[str, list[PluginProcess]] = {}
        self._pools: dict[str, FunctionPool] = {}

    # -- installation
    def install_listed(self, plugin_paths: list[str]) -> list[InstalledPlugin]:
        """Install (or refresh) the plugins an app file lists under ``plugins:``."""
        installed = []
        for relative in plugin_paths:
            installed.append(install_plugin(self.app_root, self.app_root / relative))
        return installed

    def plugin_for(self, kind: str, symbol: str) -> InstalledPlugin:
        """The installed plugin serving ``symbol`` (kind: source, sink, function)."""
        for plugin in list_plugins(self.app_root):
            if (kind, symbol) in plugin.symbols():
                return plugin
        raise PluginInstallError(
            f"no installed plugin provides a {kind} named {symbol!r}; install one with "
            f"`stepwell plugin install {self.app_root} PATH`"
        )

    def function_symbols(self) -> dict[str, InstalledPlugin]:
        return {fn: p for p in list_plugins(self.app_root) for fn in p.functions}

    # -- processes
    def process(self, plugin_name: str) -> PluginProcess:
        """The plugin's primary process (serves sources, sinks and functions)."""
        with self._lock:
            proc = self._primary.get(plugin_name)
            if proc is None:
                proc = PluginProcess(get_plugin(self.app_root, plugin_name))
                try:
                    proc.start()
                except BaseException:
                    proc.stop()
                    raise
                self._primary[plugin_name] = proc
                for warning in proc.plugin.warnings:
                    log.warning("plugin %r: %s", plugin_name, warning)
            return proc

    def _processes(self, plugin_name: str, count: int) -> list[PluginProcess]:
        with self._lock:
            procs = [self.process(plugin_name)]
            extra = self._extra.setdefault(plugin_name, [])
            while 1 + len(extra) < count and procs[0].private:
                proc = PluginProcess(get_plugin(self.app_root, plugin_name))
                try:
                    proc.start()
                except BaseException:
                    proc.stop()
                    raise
                extra.append(proc)
            return procs + extra[: max(count - 1, 0)]

    def all_processes(self) -> list[PluginProcess]:
        with self._lock:
            return list(self._primary.values()) + [p for ps in self._extra.values() for p in ps]

    # -- symbols
    def function_pool(self, symbol: str, processes: int | None = None) -> FunctionPool:
        """The pool serving function ``symbol`` (created with ``processes`` processes)."""
        with self._lock:
            pool = self._pools.get(symbol)
            wanted = processes or self.processes or default_processes()
            if pool is not None and pool.size >= wanted:
                return pool
            plugin = self.plugin_for("function", symbol)
            have = pool.size if pool is not None else 0
            channels = [FunctionChannel(proc, symbol)
                        for proc in self._processes(plugin.name, wanted)[have:]]  # fmt: skip
            if pool is None:
                pool = self._pools[symbol] = FunctionPool(symbol, channels)
            else:
                pool.grow(channels)
            return pool

    def source(self, symbol: str, m: dict[str, Any], config: dict[str, Any], datasource: str,
               on_message: Any, on_error: Any) -> SourceChannel:
        plugin = self.plugin_for("source", symbol)
        channel = SourceChannel(self.process(plugin.name), symbol, m, config, datasource,
                                on_message, on_error)
        channel.start()
        return channel

    def sink(self, symbol: str, m: dict[str, Any], config: dict[str, Any]) -> SinkChannel:
        plugin = self.plugin_for("sink", symbol)
        channel = SinkChannel(self.process(plugin.name), symbol, m, config)
        channel.start()
        return channel

    def reload_plugin(self, plugin_name: str) -> int:
        """Restart the plugin's running processes on its installed code (after a
        reinstall changed it): each starts again and replays the sources and sinks
        it ran, as after a crash (eKuiper's hot update). Returns how many."""
        with self._lock:
            procs = [p for p in [self._primary.get(plugin_name)] if p]
            procs += self._extra.get(plugin_name, [])
        if procs:
            plugin = get_plugin(self.app_root, plugin_name)
            for proc in procs:
                log.info("plugin %r: restarting pid %s on its new code", plugin_name, proc.pid)
                proc.plugin = plugin
                proc.kill(reason="reinstalled with new code")  # its watchdog starts it again
        return len(procs)

    def stop_plugin(self, plugin_name: str) -> None:
        """Kill a plugin's processes (before removing it)."""
        with self._lock:
            procs = [p for p in [self._primary.pop(plugin_name, None)] if p]
            procs += self._extra.pop(plugin_name, [])
            for symbol, pool in list(self._pools.items()):
                if pool.channels and pool.channels[0].process in procs:
                    pool.close()
                    del self._pools[symbol]
        for proc in procs:
            proc.stop()

    def stop_all(self) -> None:
        """Kill every plugin process (eKuiper's shutdown: no close hooks)."""
        with self._lock:
            pools, self._pools = list(self._pools.values()), {}
            procs = self.all_processes()
            self._primary, self._extra = {}, {}
        for proc in procs:  # what they print from now on is their SDK seeing sockets close
            proc.quiet()
        for pool in pools:
            pool.close()
        for proc in procs:
            try:
                proc.stop()
            except PluginError as exc:  # pragma: no cover - best effort
                log.warning("stopping plugin process: %s", exc)


_managers: dict[Path, PluginManager] = {}
_managers_lock = threading.Lock()


def shared_manager(app_root: Path) -> PluginManager:
    """The host process's manager for the app in ``app_root`` (created on first use)."""
    key = Path(app_root).resolve()
    with _managers_lock:
        manager = _managers.get(key)
        if manager is None:
            manager = _managers[key] = PluginManager(key)
        return manager


def _stop_shared() -> None:
    with _managers_lock:
        managers = list(_managers.values())
        _managers.clear()
    for manager in managers:
        manager.stop_all()


atexit.register(_stop_shared)
