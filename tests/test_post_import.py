"""The rerankers bridge is installed lazily: not imported with the package, installed when
rerankers is first imported (or at once if it already is)."""
import subprocess
import sys

import pytest

from locore_plugin.post_import import when_imported

SCRIPT_LAZY = """
import sys
import locore_plugin
assert "rerankers" not in sys.modules, "import locore_plugin loaded rerankers"
from rerankers import Reranker
ranker = Reranker("superglobal")
print(type(ranker).__module__)
"""

SCRIPT_EAGER = """
import rerankers
import locore_plugin
print(type(rerankers.Reranker("superglobal")).__module__)
"""


@pytest.mark.parametrize("script", [SCRIPT_LAZY, SCRIPT_EAGER], ids=["rerankers-after", "rerankers-before"])
def test_reranker_names_reach_rerankers_whichever_is_imported_first(script, tmp_path):
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "locore_plugin.bridge"


def test_when_imported_runs_now_for_a_loaded_module_and_once_later(tmp_path, monkeypatch):
    seen = []
    when_imported("json", lambda module: seen.append(module.__name__))
    assert seen == ["json"]
    (tmp_path / "late_module_for_hook.py").write_text("VALUE = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    when_imported("late_module_for_hook", lambda module: seen.append(module.VALUE))
    when_imported("late_module_for_hook", lambda module: seen.append("second"))
    import late_module_for_hook  # noqa: F401

    assert seen == ["json", 3, "second"]
    import late_module_for_hook  # noqa: F401,F811  (a second import runs nothing)

    assert seen == ["json", 3, "second"]
    monkeypatch.delitem(sys.modules, "late_module_for_hook")
