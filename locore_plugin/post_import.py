"""Run a callback when a module is imported, without importing it first.

The rerankers bridge needs ``rerankers``, whose import loads every backend it knows (seconds);
``import locore_plugin`` must not pay that in CLI calls and torchrun workers that never touch
rerankers, yet ``from rerankers import Reranker`` must find our names once the plugin is
imported. :func:`when_imported` runs the callback now if the module is already loaded, else right
after its first import finishes (a one-shot finder on ``sys.meta_path`` wraps its loader).
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from typing import Callable


def when_imported(name: str, callback: Callable[[object], None]) -> None:
    """``callback(module)`` once the top-level module ``name`` is imported (now, if it is)."""
    if name in sys.modules:
        callback(sys.modules[name])
        return
    for finder in sys.meta_path:
        if isinstance(finder, _Finder) and finder.name == name:
            finder.callbacks.append(callback)
            return
    sys.meta_path.insert(0, _Finder(name, callback))


class _Finder(importlib.abc.MetaPathFinder):
    def __init__(self, name: str, callback: Callable[[object], None]):
        self.name, self.callbacks = name, [callback]

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # one shot; the real finders locate the module
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader, self.callbacks)
        return spec


class _Loader(importlib.abc.Loader):
    def __init__(self, loader, callbacks):
        self.loader, self.callbacks = loader, callbacks

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        for callback in self.callbacks:
            callback(module)
