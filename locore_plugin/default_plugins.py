"""The built-in adapters, registered as plugins like any third-party one."""

DEFAULT_PLUGINS = (
    "locore_plugin.adapters.superglobal",
)
