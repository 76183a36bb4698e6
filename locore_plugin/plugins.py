"""The plugin manager: built-in adapters plus third-party plugins from entry points."""
from __future__ import annotations

import importlib
import os

import pluggy

from locore_plugin import hookspecs
from locore_plugin.default_plugins import DEFAULT_PLUGINS

ENTRY_POINT_GROUP = "locore_plugin"
PLUGINS_ENV = "LOCORE_PLUGINS"
BUILTIN_DISTRIBUTION = "locore-plugin"

pm = pluggy.PluginManager("locore_plugin")
pm.add_hookspecs(hookspecs)

_loaded = False


def load_plugins() -> pluggy.PluginManager:
    """Register the built-in adapters and the installed plugins, once.

    ``LOCORE_PLUGINS`` limits the external plugins: unset loads every entry point of the
    ``locore_plugin`` group, a comma-separated list loads those entry-point names only, and an
    empty value loads none. The built-in adapters always load.
    """
    global _loaded
    if _loaded:
        return pm
    _loaded = True
    wanted = os.environ.get(PLUGINS_ENV)
    if wanted is None:
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    else:
        for name in filter(None, (n.strip() for n in wanted.split(","))):
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=name)
    for module_name in DEFAULT_PLUGINS:
        if pm.get_plugin(module_name) is None:
            pm.register(importlib.import_module(module_name), name=module_name)
    return pm


def plugin_distribution(plugin) -> str:
    """The distribution that provides a registered plugin."""
    for registered, dist in pm.list_plugin_distinfo():
        if registered is plugin:
            return dist.metadata["name"]
    return BUILTIN_DISTRIBUTION
