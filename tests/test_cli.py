import subprocess
import sys

from locore_plugin.cli import main


def test_list_prints_name_provider_and_description(capsys):
    assert main(["list"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("superglobal "))
    assert "[locore-plugin: locore_plugin.adapters.superglobal]" in line and "SuperGlobal" in line


def test_console_script_module_entry():
    out = subprocess.run([sys.executable, "-m", "locore_plugin.cli", "list"], capture_output=True, text=True, check=True)
    assert "superglobal" in out.stdout
