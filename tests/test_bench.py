"""``locore-plugin bench`` on small inputs: well-formed records and JSON, FLOP formulas, no timings asserted."""
from __future__ import annotations

import json

import pytest
import torch

from locore_plugin.bench import count_flops, run_bench
from locore_plugin.cli import main

COST_FIELDS = {"name", "device", "dtype", "params", "flops", "latency_ms_mean", "latency_ms_std", "peak_mem_mb",
               "queries_per_s", "setting", "flop_per_s", "floor_ms", "efficiency"}
ATTENTION_FIELDS = {"name", "dtype", "implementations", "output_shape", "reference_ms", "fast_ms", "speedup", "max_abs_diff",
                    "reference_attention_ms", "fast_attention_ms", "attention_speedup", "fast_attention_flops",
                    "fast_attention_floor_ms", "reference_floor_ms", "fast_floor_ms", "reference_efficiency", "fast_efficiency"}


def test_flop_counts_by_hand():
    a, b = torch.randn(3, 5), torch.randn(5, 7)
    assert count_flops(lambda: a @ b) == 2 * 3 * 5 * 7
    q, k = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 6, 8)
    # the CPU fused attention kernel: Q K^T and P V, 2 * (4 x 6 x 8) multiply-adds per head
    assert count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, k)) == 2 * 2 * (2 * 4 * 6 * 8)


def test_multihead_attention_fast_path_is_counted_as_its_unfused_ops():
    torch.manual_seed(0)
    attention = torch.nn.MultiheadAttention(8, 2, batch_first=True).eval()
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        fused = count_flops(lambda: attention(x, x, x, need_weights=False))
    # in-projection (3 x 8 -> 8), Q K^T and P V over 5 keys, out-projection, for 3 x 5 tokens
    assert fused == 2 * 15 * 8 * 24 + 2 * 2 * 15 * 5 * 8 + 2 * 15 * 8 * 8


def test_cli_writes_json_and_table(tmp_path, capsys):
    path = tmp_path / "out" / "bench.json"
    assert main(["bench", "superglobal", "locore-tiny", "--gallery", "2", "--sliding", "4", "--warmup", "0",
                 "--runs", "1", "--json", str(path)]) == 0
    records = json.loads(path.read_text())
    (probe,) = [r for r in records if "probe" in r]
    assert probe["dtype"] == "float32" and probe["flop_per_s"] == max(probe["start_flop_per_s"], probe["end_flop_per_s"]) > 0
    rate = probe["flop_per_s"]
    costs = [r for r in records if "setting" in r]
    assert [(r["name"], r["setting"]) for r in costs] == [
        ("superglobal", "top-2"), ("locore-tiny", "top-2"), ("locore-tiny", "sliding-4")]
    for r in costs:
        assert COST_FIELDS <= r.keys()
        assert r["device"].startswith("cpu") and r["latency_ms_mean"] > 0 and r["latency_ms_std"] >= 0
        assert r["queries_per_s"] == pytest.approx(1000 / r["latency_ms_mean"])
        assert r["flop_per_s"] == pytest.approx(r["flops"] / (r["latency_ms_mean"] / 1000))
        assert r["floor_ms"] == pytest.approx(r["flops"] / rate * 1000)
        assert r["efficiency"] == pytest.approx(r["floor_ms"] / r["latency_ms_mean"])
        assert r["peak_mem_mb"] >= 0 and r["runs"] == 1
    superglobal, tiny, sliding = costs
    assert superglobal["params"] == 0 and superglobal["flops"] > 0
    from locore_plugin.adapters.locore import parameter_count

    assert tiny["params"] == sliding["params"] == parameter_count("locore-tiny")
    assert sliding["gallery"] == 4 and tiny["flops"] > 0
    (attention,) = [r for r in records if "speedup" in r]
    assert ATTENTION_FIELDS <= attention.keys() and attention["name"] == "locore-tiny"
    assert attention["implementations"] == ["transformers", "blocked"]
    assert attention["output_shape"] == [1, (1 + 2) * 50, 2]  # [global][48 locals][SEP] per image, query first
    assert attention["max_abs_diff"] <= 1e-4 and attention["reference_flops"] > 0 and attention["fast_flops"] > 0
    assert 0 < attention["fast_attention_flops"] < attention["fast_flops"]
    assert attention["fast_attention_ms"] > 0 and attention["fast_attention_ms"] < attention["fast_ms"]
    assert attention["speedup"] == pytest.approx(attention["reference_ms"] / attention["fast_ms"])
    out = capsys.readouterr().out
    assert "| locore-tiny | float32 | top-2 |" in out and "| locore-tiny | float32 | transformers / blocked |" in out
    assert "x** |" in out and "GEMM probe (float32" in out


@pytest.mark.parametrize("name", ["ames-dinov2", "rrt", "r2former"])
def test_pairwise_attention_comparison_runs_both_paths_on_the_same_weights(name):
    """The pair-wise methods register (reference, sdpa): the comparison times the attention layers
    of both (forward hooks fire) and their pair logits agree."""
    from locore_plugin.bench import compare_attention

    record = compare_attention(name, gallery=3, warmup=0, runs=1)
    assert record.implementations == ("reference", "sdpa")
    assert record.output_shape[0] == 3  # one output row per pair
    assert record.max_abs_diff <= 1e-4
    assert record.reference_attention_ms > 0 and record.fast_attention_ms > 0
    assert 0 < record.fast_attention_flops < record.fast_flops


def test_bf16_benchmark_probes_its_own_dtype_and_compares_with_float32():
    records = run_bench(["ames-dinov2"], gallery=12, warmup=0, runs=1, attention=False, dtype="bf16")
    probe, cost, precision = records
    assert probe["dtype"] == cost["dtype"] == precision["dtype"] == "bfloat16" and cost["efficiency"] > 0
    # same weights and input: bfloat16 moves the pair logits a little, not the top of the ranking wholesale
    assert precision["gallery"] == 12 and precision["top10_agreement"] >= 0.7
    assert 0 < precision["max_abs_output_diff"] < 0.5 * precision["max_abs_output"]


def test_a_chain_is_timed_on_the_one_shortlist():
    """A chain (a+b) is not a registry entry: no sliding setting of its own, and it still runs."""
    from locore_plugin.bench import bench_reranker

    (record,) = bench_reranker("superglobal+superglobal", gallery=3, sliding=6, warmup=0, runs=1)
    assert (record.name, record.setting, record.params) == ("superglobal+superglobal", "top-3", 0)
    assert record.flops > 0 and record.latency_ms_mean > 0


def test_one_pass_rerankers_are_timed_at_each_length_with_linear_cost():
    """A recurrent LoCoRE scores (1 + n) images in one sequence: its FLOPs grow linearly with 1 + n
    (slightly less than proportionally: the padded locals of the random images are left out)."""
    from locore_plugin.bench import bench_reranker

    records = {r.setting: r for r in bench_reranker("locore-mamba", gallery=2, sliding=0, warmup=0, runs=1, one_pass=(4, 9))}
    assert set(records) == {"top-2", "one-pass-4", "one-pass-9"}
    assert records["one-pass-9"].gallery == 9
    assert 1.85 < records["one-pass-9"].flops / records["one-pass-4"].flops <= 10 / 5
    with pytest.raises(ValueError, match="one-pass lengths"):
        from locore_plugin.bench import run_bench
        run_bench(["locore-mamba"], one_pass=(0,))
