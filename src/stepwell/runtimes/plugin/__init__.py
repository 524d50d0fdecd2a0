"""The eKuiper portable-plugin host (DESIGN section 6, ``plugin``).

Modules: ``manifest`` (the plugin JSON), ``install`` (folder/zip into
``APP/.stepwell/plugins/<name>/`` with a cached environment), ``process``
(launch in a private ``/tmp``, control channel, restart with replay),
``channels`` (source/sink/function data channels), ``functions`` (pools of
plugin processes serving SQL functions), ``manager`` (all of it for one app),
``sqludf`` (plugin functions inside ``sql:`` steps).
"""

from stepwell.runtimes.plugin.install import (
    InstalledPlugin,
    PluginInstallError,
    install_plugin,
    list_plugins,
    remove_plugin,
)
from stepwell.runtimes.plugin.manager import PluginManager, shared_manager
from stepwell.runtimes.plugin.manifest import Manifest, ManifestError
from stepwell.runtimes.plugin.process import PluginError

__all__ = [
    "InstalledPlugin",
    "Manifest",
    "ManifestError",
    "PluginError",
    "PluginInstallError",
    "PluginManager",
    "install_plugin",
    "list_plugins",
    "remove_plugin",
    "shared_manager",
]
