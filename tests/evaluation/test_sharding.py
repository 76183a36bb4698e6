"""Evaluation past one process and one sitting: a killed re-ranking resumes with the queries no
file holds, and two torchrun processes (gloo, CPU) give the same results as one."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from locore_plugin.data import synthetic
from locore_plugin.evaluation import rerank_top
from locore_plugin.evaluation.sharding import FinishedQueries
from locore_plugin.interface import ranked


class Reverser:
    """Reverses each shortlist; counts the queries it saw and fails once ``fail_after`` are done."""

    def __init__(self, fail_after=None):
        self.seen, self.fail_after = [], fail_after

    def rerank_many(self, queries, shortlists, scores):
        if self.fail_after is not None and len(self.seen) >= self.fail_after:
            raise RuntimeError("killed")
        self.seen += list(queries)
        return [ranked(np.arange(len(s), dtype=float)) for s in shortlists]


def test_a_killed_reranking_resumes_with_the_queries_no_file_holds(tmp_path):
    nq, n = 10, 6
    ranking = np.tile(np.arange(n), (nq, 1)) + np.arange(nq)[:, None]
    scores, kept = -np.tile(np.arange(n, dtype=float), (nq, 1)), np.full(nq, n)
    queries = list(range(nq))
    whole = rerank_top(Reverser(), queries, lambda ids: list(ids), ranking, scores, kept, top_k=4, batch_size=2)
    np.testing.assert_array_equal(whole[:, :4], ranking[:, 3::-1])  # the head reversed
    np.testing.assert_array_equal(whole[:, 4:], ranking[:, 4:])
    stem = tmp_path / "row.finished-0"
    killed = Reverser(fail_after=6)
    with pytest.raises(RuntimeError, match="killed"):
        rerank_top(killed, queries, lambda ids: list(ids), ranking, scores, kept, top_k=4, batch_size=2,
                   finished=FinishedQueries(stem, flush_seconds=0))
    assert FinishedQueries(stem).load().keys() == set(range(6))
    again = Reverser()
    resumed = rerank_top(again, queries, lambda ids: list(ids), ranking, scores, kept, top_k=4, batch_size=2,
                         finished=FinishedQueries(stem, flush_seconds=0))
    assert again.seen == [6, 7, 8, 9]  # only what no file held
    np.testing.assert_array_equal(resumed, whole)
    FinishedQueries(stem).clear()
    assert not list(tmp_path.iterdir())


def test_two_torchrun_processes_give_the_table_of_one(tmp_path):
    root = tmp_path / "data"
    synthetic.write(root, seed=0, size="tiny")
    args = ["--data-root", str(root), "--dataset", "synthetic", "--desc", synthetic.DESCRIPTOR, "--reranker", "superglobal",
            "--reranker", "gv", "--batch-size", "1", "--no-plots"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "locore_plugin.evaluation", *args, "--out", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                          "locore_plugin.evaluation", *args, "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (json.loads((tmp_path / d / "results.json").read_text())["results"] for d in ("one", "two"))
    assert a == b and a["gv"]["synthetic"]["medium"]["value"] != a["global"]["synthetic"]["medium"]["value"]
    assert (tmp_path / "one" / "per_query_ap.csv").read_text() == (tmp_path / "two" / "per_query_ap.csv").read_text()
    assert not list((tmp_path / "two" / "cache").rglob("*.finished-*"))  # the result holds them now
