import subprocess
import sys

from locore_plugin.cli import main


def test_list_prints_name_provider_and_description(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.strip().startswith("superglobal "))
    assert "[locore-plugin: locore_plugin.adapters.superglobal]" in line and "SuperGlobal" in line
    assert out.index("re-rankers:") < out.index("superglobal") < out.index("extractors:") < out.index("  sift ")


def test_console_script_module_entry(tmp_path):
    out = subprocess.run([sys.executable, "-m", "locore_plugin.cli", "list"], cwd=tmp_path, capture_output=True, text=True,
                         check=True)
    assert "superglobal" in out.stdout
