"""Every hook a plugin may implement has a test named after it (datasette's rule): a new hook
spec without ``test_hook_<name>...`` somewhere in the suite fails here."""
import inspect
from pathlib import Path

from locore_plugin import hookspecs

TESTS = Path(__file__).parent


def hook_names() -> list[str]:
    marker = f"{hookspecs.hookspec.project_name}_spec"
    return [name for name, f in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(f, marker)]


def test_every_hook_spec_has_a_test():
    names = hook_names()
    assert names == ["register_extractors", "register_rerankers"]
    sources = "\n".join(p.read_text() for p in TESTS.rglob("test_*.py"))
    untested = [name for name in names if f"def test_hook_{name}" not in sources]
    assert not untested, f"hook specs without a test_hook_<name> test: {untested}"
