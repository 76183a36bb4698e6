"""Hook specifications: what a plugin may provide to locore_plugin."""
import pluggy

hookspec = pluggy.HookspecMarker("locore_plugin")
hookimpl = pluggy.HookimplMarker("locore_plugin")


@hookspec
def register_rerankers(register):
    """Register image re-rankers.

    Call ``register(name, factory, description=..., **metadata)`` once per name. ``factory(**kwargs)``
    returns an :class:`locore_plugin.ImageReranker`; it receives the user's keyword arguments
    (``device``, ``dtype``, ``batch_size``, ``verbose`` and method-specific ones such as
    ``checkpoint``) and must reject those it does not know.
    """
