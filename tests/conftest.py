"""Shared test fixtures: where the golden fixtures and real data live.

``../shared`` sits beside the project root (``LOCORE_SHARED_DIR`` points the suite at another
folder, ``LOCORE_GOLDEN_DIR`` only the golden tests at another folder of the golden layout). Where it is absent the tests that need it skip with the
reason, except under CI (``CI`` set), where its absence is a failure: those tests must run there.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# LOCORE_SHARED_DIR points the whole suite elsewhere (an empty folder plays a user's fresh clone).
SHARED = Path(os.environ.get("LOCORE_SHARED_DIR") or Path(__file__).resolve().parents[1].parent / "shared")


def golden_root() -> Path:
    return Path(os.environ.get("LOCORE_GOLDEN_DIR") or SHARED / "golden")


def _absent(what: Path) -> str:
    return f"{what} is absent (the fixtures live in ../shared beside the project root, or set LOCORE_GOLDEN_DIR)"


def _skip_or_fail(reason: str):
    # Under CI the default ../shared must be there; a folder given by LOCORE_GOLDEN_DIR or
    # LOCORE_SHARED_DIR may hold only some methods (or nothing), and the others skip.
    if os.environ.get("CI") and not (os.environ.get("LOCORE_GOLDEN_DIR") or os.environ.get("LOCORE_SHARED_DIR")):
        pytest.fail(f"CI must run this test: {reason}")
    pytest.skip(reason)


def pytest_configure(config):
    config.addinivalue_line("markers", "golden(method): parametrise `golden_case` over the method's golden case folders")


def pytest_generate_tests(metafunc):
    marker = metafunc.definition.get_closest_marker("golden")
    if marker is None or "golden_case" not in metafunc.fixturenames:
        return
    folder = golden_root() / marker.args[0]
    cases = sorted(p.parent for p in folder.glob("*/config.json")) if folder.is_dir() else []
    if cases:
        metafunc.parametrize("golden_case", cases, ids=[c.name for c in cases], indirect=True)
    else:
        # indirect: the ``golden_case`` fixture below sees the None and skips (or fails under CI)
        metafunc.parametrize("golden_case", [None], ids=["absent"], indirect=True)


@pytest.fixture
def golden_case(request):
    if request.param is None:
        method = request.node.get_closest_marker("golden").args[0]
        _skip_or_fail(_absent(golden_root() / method) + " or holds no case folder")
    return request.param


@pytest.fixture
def golden_dir():
    """``golden_dir("superglobal")`` -> the method's golden folder, or skip."""

    def get(method: str) -> Path:
        folder = golden_root() / method
        if not folder.is_dir():
            _skip_or_fail(_absent(folder))
        return folder

    return get


@pytest.fixture
def shared_data():
    """``shared_data("revisitop")`` -> ../shared/data/<name>, or skip."""

    def get(name: str) -> Path:
        folder = SHARED / "data" / name
        if not folder.is_dir():
            _skip_or_fail(f"{folder} is absent (real data live in ../shared/data beside the project root)")
        return folder

    return get


@pytest.fixture
def register_plugin():
    """``register_plugin(obj, name)`` registers a plugin object (a class instance or a module with
    hook implementations) for this test only: all are unregistered when it ends, pass or fail."""
    from locore_plugin.plugins import load_plugins

    pm, added = load_plugins(), []

    def register(plugin, name: str):
        pm.register(plugin, name=name)
        added.append(plugin)
        return plugin

    yield register
    for plugin in reversed(added):
        pm.unregister(plugin)
