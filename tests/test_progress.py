"""Progress output: redrawn on a terminal, a line every LOG_INTERVAL seconds in a log."""
import io
import time

from locore_plugin import progress as progress_module
from locore_plugin.progress import progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def _lines(stream):
    return [line for line in stream.getvalue().replace("\r", "\n").splitlines() if line.strip()]


def test_a_log_gets_the_end_line_and_not_every_update():
    from tqdm.auto import tqdm

    plain, log = io.StringIO(), io.StringIO()
    for bar in (tqdm(range(40), file=plain), progress(range(40), desc="work", file=log)):
        for _ in bar:
            time.sleep(0.01)  # 0.4 s: a plain bar redraws every 0.1 s
    assert len(_lines(plain)) >= 4
    assert len(_lines(log)) == 2 and "40/40" in _lines(log)[-1]


def test_a_terminal_redraws_as_usual(monkeypatch):
    bar = progress(range(3), file=Terminal())
    assert bar.mininterval < progress_module.LOG_INTERVAL
    assert progress(range(3), file=io.StringIO()).mininterval == progress_module.LOG_INTERVAL
