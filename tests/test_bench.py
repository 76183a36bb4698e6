"""``locore-plugin bench`` on small inputs: well-formed records and JSON, FLOP formulas, no timings asserted."""
from __future__ import annotations

import json

import pytest
import torch

from locore_plugin.bench import count_flops, run_bench
from locore_plugin.cli import main

COST_FIELDS = {"name", "device", "params", "flops", "latency_ms_mean", "latency_ms_std", "peak_mem_mb", "queries_per_s",
               "setting", "flop_per_s"}
ATTENTION_FIELDS = {"name", "tokens", "reference_ms", "fast_ms", "speedup", "max_abs_diff", "reference_attention_ms",
                    "fast_attention_ms", "attention_speedup"}


def test_flop_counts_by_hand():
    a, b = torch.randn(3, 5), torch.randn(5, 7)
    assert count_flops(lambda: a @ b) == 2 * 3 * 5 * 7
    q, k = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 6, 8)
    # the CPU fused attention kernel: Q K^T and P V, 2 * (4 x 6 x 8) multiply-adds per head
    assert count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, k)) == 2 * 2 * (2 * 4 * 6 * 8)


def test_cli_writes_json_and_table(tmp_path, capsys):
    path = tmp_path / "out" / "bench.json"
    assert main(["bench", "superglobal", "locore-tiny", "--gallery", "2", "--sliding", "4", "--warmup", "0",
                 "--runs", "1", "--json", str(path)]) == 0
    records = json.loads(path.read_text())
    costs = [r for r in records if "setting" in r]
    assert [(r["name"], r["setting"]) for r in costs] == [
        ("superglobal", "top-2"), ("locore-tiny", "top-2"), ("locore-tiny", "sliding-4")]
    for r in costs:
        assert COST_FIELDS <= r.keys()
        assert r["device"].startswith("cpu") and r["latency_ms_mean"] > 0 and r["latency_ms_std"] >= 0
        assert r["queries_per_s"] == pytest.approx(1000 / r["latency_ms_mean"])
        assert r["flop_per_s"] == pytest.approx(r["flops"] / (r["latency_ms_mean"] / 1000))
        assert r["peak_mem_mb"] >= 0 and r["runs"] == 1
    superglobal, tiny, sliding = costs
    assert superglobal["params"] == 0 and superglobal["flops"] > 0
    from locore_plugin.adapters.locore import parameter_count

    assert tiny["params"] == sliding["params"] == parameter_count("locore-tiny")
    assert sliding["gallery"] == 4 and tiny["flops"] > 0
    (attention,) = [r for r in records if "speedup" in r]
    assert ATTENTION_FIELDS <= attention.keys() and attention["name"] == "locore-tiny"
    assert attention["tokens"] == (1 + 2) * 50  # [global][48 locals][SEP] per image, query first
    assert attention["max_abs_diff"] <= 1e-4 and attention["reference_flops"] > 0 and attention["fast_flops"] > 0
    assert attention["speedup"] == pytest.approx(attention["reference_ms"] / attention["fast_ms"])
    out = capsys.readouterr().out
    assert "| locore-tiny | top-2 |" in out and "| locore-tiny | 150 |" in out and "x** |" in out


def test_bad_options_and_names():
    with pytest.raises(ValueError, match="runs"):
        run_bench(["superglobal"], runs=0)
    with pytest.raises(KeyError, match="unknown re-ranker"):
        run_bench(["no-such-reranker"])
