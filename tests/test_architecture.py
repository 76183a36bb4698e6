"""The layering contracts of pyproject.toml (checked by ``lint-imports`` in .ci/run) cover every
shared module: a new module in locore_plugin/ must be listed, or the contract would not see it."""
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_the_no_method_imports_contract_lists_every_shared_module():
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    (shared,) = [c for c in contracts if c["type"] == "forbidden" and "locore_plugin.adapters" in c["forbidden_modules"]]
    modules = {f"locore_plugin.{p.stem}" for p in (ROOT / "locore_plugin").glob("*.py") if p.stem != "__init__"}
    packages = {f"locore_plugin.{p.parent.name}" for p in (ROOT / "locore_plugin").glob("*/__init__.py")}
    assert set(shared["source_modules"]) == modules | packages  # a package stands for its modules


def test_every_package_is_installed():
    """setuptools installs only the packages pyproject lists: a sub-package missing there would
    work from the source tree and vanish from a wheel."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = {f"locore_plugin.adapters.{p.parent.name}" for p in (ROOT / "adapters").glob("*/__init__.py")}
    packages |= {f"locore_plugin.{p.parent.name}" for p in (ROOT / "locore_plugin").glob("*/__init__.py")}
    assert packages <= set(setuptools["packages"])
