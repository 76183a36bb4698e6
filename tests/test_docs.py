"""Documentation that cannot rot: every fenced block marked ``<!-- runnable -->`` in README.md and
docs/*.md runs (python in a fresh interpreter, bash in a shell, both in an empty folder), and every
relative link points at a file and heading that exist."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = "<!-- runnable -->"
FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)


def runnable_blocks():
    blocks = []
    for page in PAGES:
        text = page.read_text()
        for match in FENCE.finditer(text):
            before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
            if before.strip() == MARKER:
                line = text[: match.start()].count("\n") + 1
                blocks.append(pytest.param(match.group(1), match.group(2), id=f"{page.name}:{line}"))
    return blocks


def test_there_are_runnable_examples():
    assert len(runnable_blocks()) >= 3


@pytest.mark.parametrize("language, code", runnable_blocks())
def test_runnable_example(language, code, tmp_path):
    if language == "python":
        command = [sys.executable, "-c", code]
    elif language == "bash":
        command = ["bash", "-euo", "pipefail", "-c", code]
    else:
        pytest.fail(f"a runnable block must be python or bash, not {language}")
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_relative_links_resolve(page):
    text = FENCE.sub("", page.read_text())
    for target in re.findall(r"\]\(([^)#\s]*)(#[^)\s]*)?\)", text):
        path, anchor = target
        if re.match(r"\w+://", path) or path.startswith("mailto:"):
            continue
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name} links to {path}, which does not exist"
        if anchor and linked.suffix == ".md":
            headings = {_slug(h) for h in re.findall(r"^#+ (.+)$", FENCE.sub("", linked.read_text()), re.M)}
            assert anchor[1:] in headings, f"{page.name} links to {path}{anchor}; headings: {sorted(headings)}"
