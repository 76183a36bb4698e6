"""The built-in adapters, registered as plugins like any third-party one."""

DEFAULT_PLUGINS = (
    "locore_plugin.adapters.superglobal",
    "locore_plugin.adapters.ames",
    "locore_plugin.adapters.rrt",
    "locore_plugin.adapters.locore",
    "locore_plugin.adapters.locore_recurrent",
    "locore_plugin.adapters.r2former",
    "locore_plugin.adapters.elvis",
    "locore_plugin.adapters.cvnet",
    "locore_plugin.adapters.sift",
    "locore_plugin.adapters.gv",
    "locore_plugin.adapters.dinov2_ames",
)
