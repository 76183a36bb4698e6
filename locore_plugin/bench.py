"""``locore-plugin bench``: the cost of re-ranking one query (LoCoRE supplementary Sec. 4.3 metrics).

For every registered re-ranker (or a chosen list), on synthetic descriptors of the shapes the
re-ranker takes (no I/O, no feature extraction): parameters of the parts of its ``.module`` that
run while it re-ranks (a feature backbone its checkpoint also holds, CVNet's ``encoder_q``, is not
part of the re-ranker, as the paper counts; 0 without a module, e.g. SuperGlobal), FLOPs
(``torch.utils.flop_counter``), latency mean +- std over ``runs`` runs after ``warmup`` warm-ups,
throughput (FLOP/s and queries/s) and peak memory (CUDA max allocated on a GPU, the peak increase
of the resident set on a CPU). Learned re-rankers use random weights: the cost does not depend on
them. Re-rankers with a sliding window (LoCoRE) are also timed on a ``sliding``-candidate shortlist,
those that score a whole shortlist in one sequence (``one_pass``: LoCoRE-RWKV / -Mamba) in one pass
over each of the ``one_pass`` lengths (default 100, 400, 1,000: the cost should grow linearly),
and those that register ``official_options`` (a faster default than the official computation,
e.g. CVNet's batched pairs) also with those options, as the setting ``top-N official``.

Every figure is in the benchmarked ``dtype``, against a GEMM-rate probe of that dtype timed in
the same run (a large square matmul, at the start and at the end; the faster counts): each record
carries ``floor_ms`` (its FLOPs at the probe's rate) and ``efficiency`` (achieved / probe rate).

In a reduced precision (``bf16``, ``fp16``) every re-ranker is also compared with its float32
self on the same input and weights: top-10 agreement, whether the order is the same, and the
largest difference of the module's outputs.

Re-rankers registered with ``attn_implementations=(reference, fast)`` are also run with both
attention implementations side by side, same weights, alternating runs so that both see the same
machine load; the speed-up, the self-attention layers alone (``locore_plugin.nn.attention_layers``)
against their own FLOP floor, and the largest difference of the module's outputs (LoCoRE:
per-token logits; pair-wise methods: pair logits) are the headline of the run.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils import flop_counter

from locore_plugin.features import ImageFeatures
from locore_plugin.io.atomic import atomic_write
from locore_plugin.nn import attention_layers
from locore_plugin.progress import progress
from locore_plugin.registry import create_reranker, lookup, registered_rerankers
from locore_plugin.runtime import resolve_device, resolve_dtype

# Descriptor sizes for re-rankers that do not state theirs: SuperGlobal's CVNet-R50 globals and SIFT locals.
DEFAULT_GLOBAL_DIM, DEFAULT_LOCAL_DIM, DEFAULT_LOCALS = 2048, 128, 1000
ONE_PASS_LENGTHS = (100, 400, 1000)  # shortlists a one-pass re-ranker is timed on: the cost should grow linearly

# FlopCounterMode has formulas for the CUDA fused attention kernels but not for the CPU one.
_CPU_SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
if _CPU_SDPA not in flop_counter.flop_registry:

    @flop_counter.register_flop_formula(_CPU_SDPA)
    def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

# ... nor for the fused inference kernel of nn.MultiheadAttention (the pair-wise reference path):
# its input projection, Q K^T, P V and output projection, as the unfused path counts them.
_NATIVE_MHA = torch.ops.aten._native_multi_head_attention
if _NATIVE_MHA not in flop_counter.flop_registry:

    @flop_counter.register_flop_formula(_NATIVE_MHA)
    def _native_mha_flops(query_shape, key_shape, value_shape, embed_dim, num_head, *args, out_shape=None, **kwargs) -> int:
        batch, length, _ = query_shape
        keys = key_shape[1]
        projections = 2 * batch * length * embed_dim * 3 * embed_dim + 2 * batch * length * embed_dim * embed_dim
        return projections + 2 * 2 * batch * length * keys * embed_dim


@dataclass
class CostRecord:
    """One re-ranker in one setting: the cost of re-ranking one query's shortlist."""

    name: str
    device: str
    dtype: str
    setting: str  # "top-100": one query, 100 re-ranked images; "sliding-400": LoCoRE's sliding windows
    gallery: int
    params: int
    flops: int
    latency_ms_mean: float
    latency_ms_std: float
    flop_per_s: float
    queries_per_s: float
    peak_mem_mb: float
    runs: int
    threads: int


@dataclass
class AttentionRecord:
    """The reference and the fast attention of one model on the same input, same weights."""

    name: str
    device: str
    dtype: str
    implementations: tuple[str, str]  # (reference, fast)
    output_shape: tuple[int, ...]  # of the module outputs compared, concatenated over its calls
    reference_ms: float
    fast_ms: float
    speedup: float
    max_abs_diff: float
    reference_flops: int
    fast_flops: int
    reference_attention_ms: float  # the self-attention modules alone, summed over layers and calls
    fast_attention_ms: float
    attention_speedup: float
    fast_attention_flops: int
    runs: int
    threads: int


@dataclass
class PrecisionRecord:
    """A reduced-precision model against its float32 self (same weights, same input)."""

    name: str
    device: str
    dtype: str
    gallery: int
    top10_agreement: float  # |top 10 in dtype & top 10 in float32| / 10
    same_order: bool  # the whole re-ranked order is the float32 one
    max_abs_output_diff: float  # of the module's outputs (LoCoRE: per-token logits; pair-wise: pair logits)
    max_abs_output: float  # the float32 outputs' largest magnitude, for scale


@dataclass
class GemmProbe:
    """The matmul rate of the benchmarked dtype on the benchmarked device, timed in the same run."""

    probe: str
    device: str
    dtype: str
    size: int
    start_flop_per_s: float
    end_flop_per_s: float
    flop_per_s: float  # the faster of the two: what the hardware reached


def _lengths(text: str) -> tuple[int, ...]:
    """``"100,400,1000"`` -> (100, 400, 1000); ``""`` -> ()."""
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated lengths, got {text!r}") from None


def synthetic_features(reranker, count: int, locals_per_image: int, seed: int = 0) -> list[ImageFeatures]:
    """``count`` images with every field (global, locals, mask, xy, scale, weight) at the re-ranker's
    dims, and a dense map of the re-ranker's ``dense_shape`` (C, h, w) where it states one.

    A quarter of the local slots are padded, as real descriptor files are.
    """
    local_dim, global_dim = _dims(reranker)
    dense_shape = getattr(reranker, "dense_shape", None)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        dense = None if dense_shape is None else rng.standard_normal(dense_shape).astype(np.float32)
        g = rng.standard_normal(global_dim).astype(np.float32)
        local = rng.standard_normal((locals_per_image, local_dim)).astype(np.float32)
        local /= np.linalg.norm(local, axis=1, keepdims=True)
        mask = rng.random(locals_per_image) > 0.25
        mask[0] = True
        out.append(ImageFeatures(
            global_desc=g / np.linalg.norm(g), local=local, mask=mask,
            xy=rng.random((locals_per_image, 2)).astype(np.float32),  # normalised image coordinates
            scale=rng.integers(1, 3, locals_per_image).astype(np.float32),  # valid as scale ids (LoCoRE) and as scales (RRT)
            weight=np.sort(rng.random(locals_per_image).astype(np.float32))[::-1].copy(), dense=dense,
        ))
    return out


def _dims(reranker) -> tuple[int, int]:
    """(local, global) descriptor dims a re-ranker states (directly or in its ``config``), else the defaults."""
    config = getattr(reranker, "config", None)

    def stated(name, default):
        value = getattr(reranker, name, None) or getattr(config, name, None)
        return int(value) if value else default

    return stated("local_dim", DEFAULT_LOCAL_DIM), stated("global_dim", DEFAULT_GLOBAL_DIM)


def _locals(reranker, role: str) -> int:
    """Locals per image the re-ranker keeps (its ``query_length`` / ``gallery_length``, the shared
    vocabulary), else the default (a method of global descriptors only)."""
    return int(getattr(reranker, f"{role}_length", None) or DEFAULT_LOCALS)


def build(name: str, device, dtype="float32", **options):
    """The registered re-ranker, with random weights where it is learned (``pretrained=False``,
    which every factory accepts: training-free ones ignore it)."""
    return create_reranker(name, device=device, dtype=dtype, pretrained=False, **options)


def one_query(reranker, gallery: int, seed: int) -> tuple[ImageFeatures, list[ImageFeatures], np.ndarray]:
    """A synthetic query, ``gallery`` shortlisted images at the re-ranker's sizes and their
    descending global scores: the input every benchmark setting times."""
    query = synthetic_features(reranker, 1, _locals(reranker, "query"), seed)[0]
    shortlist = synthetic_features(reranker, gallery, _locals(reranker, "gallery"), seed + 1)
    scores = np.sort(np.random.default_rng(seed).random(gallery).astype(np.float32))[::-1].copy()
    return query, shortlist, scores


def gemm_rate(device, dtype, size: Optional[int] = None, runs: int = 5) -> float:
    """FLOP/s of the best of ``runs`` ``size`` x ``size`` matmuls in ``dtype`` (2048 on a CPU, 8192 on a GPU)."""
    device, dtype = resolve_device(device), resolve_dtype(dtype)
    size = size or (8192 if device.type == "cuda" else 2048)
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=generator).to(device=device, dtype=dtype) for _ in range(2))
    (times,) = time_runs([lambda: a @ b], device, warmup=1, runs=runs)
    return 2 * size**3 / (min(times) / 1000)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _PeakMemory:
    """Peak memory increase over the block: CUDA max allocated, or the process's resident set sampled by a thread."""

    def __init__(self, device: torch.device):
        self.device, self.peak_mb = device, 0.0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            _release_freed_memory()
            self.base = self.peak = _rss_bytes()
            self.stop = threading.Event()
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while not self.stop.wait(0.002):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.stop.set()
            self.thread.join()
            peak = max(self.peak, _rss_bytes())
        self.peak_mb = max(0, peak - self.base) / 2**20


def _release_freed_memory() -> None:
    """Hand memory freed by earlier runs back to the OS (glibc keeps it), so the peak is this block's own."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_bytes() -> int:
    """Current resident set size (Linux ``/proc``), else the lifetime peak ``getrusage`` reports."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def count_flops(fn: Callable[[], object], module: Optional[torch.nn.Module] = None) -> int:
    """FLOPs of one call. ``module``'s parameters are frozen meanwhile: the counter's module tracker
    hooks the gradient of every argument that requires one, which fails under inference mode for a
    parameter passed as an argument (transformers' Mamba hands its convolution weights to a kernel layer)."""
    frozen = [p for p in module.parameters() if p.requires_grad] if module is not None else []
    for p in frozen:
        p.requires_grad_(False)
    try:
        with flop_counter.FlopCounterMode(display=False) as counter:
            fn()
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return int(counter.get_total_flops())


def time_runs(fns: Sequence[Callable[[], object]], device, warmup: int, runs: int, desc: str = "") -> list[list[float]]:
    """Milliseconds of each of ``fns`` over ``runs`` runs after ``warmup``; several fns alternate run by run."""
    times: list[list[float]] = [[] for _ in fns]
    for i in progress(range(warmup + runs), desc=desc, leave=False, disable=not desc):
        for fn, acc in zip(fns, times):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            if i >= warmup:
                acc.append((time.perf_counter() - start) * 1000)
    return times


def bench_reranker(name: str, device="cpu", gallery: int = 100, sliding: int = 400, warmup: int = 10, runs: int = 10,
                   seed: int = 0, dtype="float32", one_pass: Sequence[int] = ONE_PASS_LENGTHS) -> list[CostRecord]:
    """The cost records of one re-ranker: ``top-{gallery}``, plus ``sliding-{sliding}`` when it has a
    sliding window, ``one-pass-{n}`` for each ``one_pass`` length when it scores a whole shortlist in
    one sequence, and ``top-{gallery} official`` when it registers ``official_options``."""
    device = resolve_device(device)
    settings = [(f"top-{gallery}", gallery, {})]
    reranker = build(name, device, dtype)
    entry = registered_rerankers().get(name)  # None for a chain (a+b), timed on the one shortlist
    if entry is not None and entry.metadata.official_options:
        settings.append((f"top-{gallery} official", gallery, dict(entry.metadata.official_options)))
    if entry is not None and entry.metadata.sliding_window and sliding:
        settings.append((f"sliding-{sliding}", sliding, {"top_k": sliding}))
    if entry is not None and entry.metadata.one_pass:
        settings += [(f"one-pass-{n}", n, {"top_k": n, "window": "all"}) for n in one_pass]
    records = []
    for setting, size, options in settings:
        if options:
            reranker = build(name, device, dtype, **options)
        query, shortlist, scores = one_query(reranker, size, seed)

        def run():
            return reranker.rerank(query, shortlist, scores)

        module = getattr(reranker, "module", None)
        params = _parameters_run(module, run) if module is not None else 0  # also the first call: lazy initialisation
        flops = count_flops(run, module)
        with _PeakMemory(device) as memory:
            (times,) = time_runs([run], device, warmup, runs, desc=f"{name} {setting}")
        mean = statistics.fmean(times)
        records.append(CostRecord(
            name=name, device=_device_name(device), dtype=_dtype_name(dtype), setting=setting, gallery=size,
            params=params, flops=flops,
            latency_ms_mean=mean, latency_ms_std=statistics.stdev(times) if len(times) > 1 else 0.0,
            flop_per_s=flops / (mean / 1000), queries_per_s=1000 / mean, peak_mem_mb=memory.peak_mb, runs=runs,
            threads=torch.get_num_threads(),
        ))
    return records


def _parameters_run(module: torch.nn.Module, run: Callable[[], object]) -> int:
    """Parameters of the submodules that run during one ``run`` (each counted once)."""
    ran = set()
    handles = [m.register_forward_pre_hook(lambda m, args: ran.add(m)) for m in module.modules()]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return sum(p.numel() for m in ran for p in m.parameters(recurse=False))


def attention_implementations(name: str) -> Optional[tuple[str, str]]:
    """(reference, fast) attention implementation names a re-ranker registers, or None."""
    names = lookup(registered_rerankers(), name, "re-ranker").metadata.attn_implementations
    return names or None


def compare_attention(name: str, device="cpu", gallery: int = 100, warmup: int = 10, runs: int = 10,
                      seed: int = 0, dtype="float32") -> AttentionRecord:
    """Reference vs fast attention of one re-ranker on one query of ``gallery`` images, same weights."""
    implementations = attention_implementations(name)
    if implementations is None:
        raise ValueError(f"{name!r} registers no attn_implementations to compare")
    device = resolve_device(device)
    models = {impl: build(name, device, dtype, attn_implementation=impl) for impl in implementations}
    reference_impl, fast_impl = implementations
    models[fast_impl].module.load_state_dict(models[reference_impl].module.state_dict())
    reranker = models[reference_impl]
    query, shortlist, scores = one_query(reranker, gallery, seed)
    runners = {impl: (lambda model=model: model.rerank(query, shortlist, scores)) for impl, model in models.items()}
    outputs = {impl: _module_outputs(model.module, runners[impl]) for impl, model in models.items()}
    flops = {impl: count_flops(run) for impl, run in runners.items()}
    fast_attention_flops = _attention_flops(models[fast_impl].module, runners[fast_impl])
    clocks = {impl: _AttentionClock(model.module, device) for impl, model in models.items()}
    times = time_runs([runners[reference_impl], runners[fast_impl]], device, warmup, runs, desc=f"{name} attention")
    for clock in clocks.values():
        clock.remove()
    reference_ms, fast_ms = (statistics.fmean(t) for t in times)
    attention_ms = {impl: clock.total_ms / (warmup + runs) for impl, clock in clocks.items()}
    reference, fast = outputs[reference_impl], outputs[fast_impl]
    return AttentionRecord(
        name=name, device=_device_name(device), dtype=_dtype_name(dtype), implementations=implementations,
        output_shape=tuple(reference.shape), reference_ms=reference_ms, fast_ms=fast_ms, speedup=reference_ms / fast_ms,
        max_abs_diff=float((reference - fast).abs().max()), reference_flops=flops[reference_impl],
        fast_flops=flops[fast_impl], reference_attention_ms=attention_ms[reference_impl],
        fast_attention_ms=attention_ms[fast_impl],
        attention_speedup=attention_ms[reference_impl] / attention_ms[fast_impl] if attention_ms[fast_impl] else float("nan"),
        fast_attention_flops=fast_attention_flops, runs=runs, threads=torch.get_num_threads(),
    )


def compare_precision(name: str, device="cpu", gallery: int = 100, seed: int = 0, dtype="bfloat16") -> PrecisionRecord:
    """``dtype`` against float32 on one query of ``gallery`` synthetic images: the float32 model's
    weights rounded to ``dtype``, the same input, the same attention implementation."""
    device = resolve_device(device)
    reference = build(name, device, "float32")
    reduced = build(name, device, dtype)
    if getattr(reference, "module", None) is not None:
        reduced.module.load_state_dict(reference.module.state_dict())
    query, shortlist, scores = one_query(reference, gallery, seed)
    results, outputs = {}, {}
    for key, model in (("float32", reference), ("reduced", reduced)):
        def run(model=model, key=key):
            results[key] = model.rerank(query, shortlist, scores)
        if getattr(model, "module", None) is not None:
            outputs[key] = _module_outputs(model.module, run)
        else:
            run()
            outputs[key] = torch.as_tensor(results[key].scores, dtype=torch.float32)
    want, got = results["float32"].order, results["reduced"].order
    return PrecisionRecord(
        name=name, device=_device_name(device), dtype=_dtype_name(dtype), gallery=gallery,
        top10_agreement=len(set(want[:10]) & set(got[:10])) / min(10, len(want)), same_order=bool((want == got).all()),
        max_abs_output_diff=float((outputs["float32"] - outputs["reduced"]).abs().max()),
        max_abs_output=float(outputs["float32"].abs().max()),
    )


def _module_outputs(module: torch.nn.Module, run: Callable[[], object]) -> torch.Tensor:
    """The module's outputs over one ``run`` (float32, concatenated along the batch over its calls)."""
    seen = []
    handle = module.register_forward_hook(lambda m, args, output: seen.append(output.detach().float().cpu()))
    try:
        run()
    finally:
        handle.remove()
    return torch.cat(seen) if len(seen) > 1 else seen[0]


def _attention_flops(module: torch.nn.Module, run: Callable[[], object]) -> int:
    """FLOPs spent inside the module's attention layers over one ``run``."""
    layers = {id(m) for m in attention_layers(module)}
    root = type(module).__name__
    names = {f"{root}.{n}" for n, m in module.named_modules() if id(m) in layers}
    with flop_counter.FlopCounterMode(display=False) as counter:
        run()
    return int(sum(sum(ops.values()) for key, ops in counter.get_flop_counts().items() if key in names))


class _AttentionClock:
    """Accumulates the wall time spent inside a module's attention layers (forward hooks)."""

    def __init__(self, module: torch.nn.Module, device: torch.device):
        self.total_ms, self.device, self.handles = 0.0, device, []
        for layer in attention_layers(module):
            self.handles += [layer.register_forward_pre_hook(self._start), layer.register_forward_hook(self._stop)]

    def _start(self, module, args):
        _sync(self.device)
        self.started = time.perf_counter()

    def _stop(self, module, args, output):
        _sync(self.device)
        self.total_ms += (time.perf_counter() - self.started) * 1000

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def _dtype_name(dtype) -> str:
    return str(resolve_dtype(dtype)).removeprefix("torch.")


def run_bench(names: Optional[Sequence[str]] = None, device="cpu", gallery: int = 100, sliding: int = 400,
              warmup: int = 10, runs: int = 10, attention: bool = True, seed: int = 0, dtype="float32",
              one_pass: Sequence[int] = ONE_PASS_LENGTHS) -> list[dict]:
    """Every record of a benchmark run, as dicts: the GEMM probe, the cost records, then the attention
    comparisons, each with its floors and efficiencies against the probe."""
    if warmup < 0 or runs < 1 or gallery < 1 or sliding < 0 or any(n < 1 for n in one_pass):
        raise ValueError("need warmup >= 0, runs >= 1, gallery >= 1, sliding >= 0 and one-pass lengths >= 1")
    device = resolve_device(device)
    entries = registered_rerankers()
    names = list(names) if names else sorted(entries)
    for name in names:
        lookup(entries, name, "re-ranker")
    start_rate = gemm_rate(device, dtype)
    records = []
    for name in progress(names, desc="bench", unit="re-ranker"):
        records += [asdict(r) for r in bench_reranker(name, device, gallery, sliding, warmup, runs, seed, dtype, one_pass)]
    if attention:
        for name in [n for n in names if attention_implementations(n)]:
            records.append(asdict(compare_attention(name, device, gallery, warmup, runs, seed, dtype)))
    if resolve_dtype(dtype) != torch.float32:
        for name in names:
            records.append(asdict(compare_precision(name, device, gallery, seed, dtype)))
    end_rate = gemm_rate(device, dtype)
    probe = GemmProbe("gemm", _device_name(device), _dtype_name(dtype), 8192 if device.type == "cuda" else 2048,
                      start_rate, end_rate, max(start_rate, end_rate))
    return [asdict(probe)] + [with_floors(record, probe.flop_per_s) for record in records]


def with_floors(record: dict, gemm_flop_per_s: float) -> dict:
    """``record`` with its FLOP floors (ms at the GEMM rate) and efficiencies (achieved / GEMM rate)."""
    record = dict(record)
    if "top10_agreement" in record:
        return record
    if "setting" in record:
        record["floor_ms"] = record["flops"] / gemm_flop_per_s * 1000
        record["efficiency"] = record["flop_per_s"] / gemm_flop_per_s
    else:
        for impl in ("reference", "fast"):
            record[f"{impl}_floor_ms"] = record[f"{impl}_flops"] / gemm_flop_per_s * 1000
            record[f"{impl}_efficiency"] = record[f"{impl}_floor_ms"] / record[f"{impl}_ms"]
        record["fast_attention_floor_ms"] = record["fast_attention_flops"] / gemm_flop_per_s * 1000
    return record


def markdown(records: Sequence[dict]) -> str:
    """Markdown tables: the GEMM probe, the reference vs fast attention (the headline), then the cost per re-ranker."""
    probes = [r for r in records if "probe" in r]
    costs = [r for r in records if "setting" in r]
    attention = [r for r in records if "speedup" in r]
    precision = [r for r in records if "top10_agreement" in r]
    lines = [f"Device: {records[0]['device'] if records else '-'}"]
    for r in probes:
        lines.append(f"GEMM probe ({r['dtype']}, {r['size']}^2 matmul, start / end of the run): "
                     f"{r['start_flop_per_s'] / 1e9:.0f} / {r['end_flop_per_s'] / 1e9:.0f} GFLOP/s; floors and "
                     f"efficiencies use {r['flop_per_s'] / 1e9:.0f}")
    if attention:
        lines += ["", "| model | dtype | reference / fast | reference (ms) | fast (ms) | speed-up | attention alone: ref / fast "
                  "(ms), speed-up | fast attention floor (ms) | fast floor (ms), efficiency | max abs diff |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['name']} | {r['dtype']} | {' / '.join(r['implementations'])} | {r['reference_ms']:.0f} | "
                  f"{r['fast_ms']:.0f} | **{r['speedup']:.2f}x** | {r['reference_attention_ms']:.0f} / "
                  f"{r['fast_attention_ms']:.0f}, {r['attention_speedup']:.2f}x | {r['fast_attention_floor_ms']:.0f} | "
                  f"{r['fast_floor_ms']:.0f}, {100 * r['fast_efficiency']:.0f}% | {r['max_abs_diff']:.1e} |" for r in attention]
    if costs:
        lines += ["", "| re-ranker | dtype | setting | params (M) | GFLOPs | latency (ms) | floor (ms) | GFLOP/s | efficiency "
                  "| queries/s | peak mem (MB) |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['name']} | {r['dtype']} | {r['setting']} | {r['params'] / 1e6:.1f} | {r['flops'] / 1e9:.1f} | "
                  f"{r['latency_ms_mean']:.0f} ± {r['latency_ms_std']:.0f} | {r['floor_ms']:.0f} | "
                  f"{r['flop_per_s'] / 1e9:.1f} | {100 * r['efficiency']:.0f}% | {r['queries_per_s']:.3f} | "
                  f"{r['peak_mem_mb']:.0f} |" for r in costs]
    if precision:
        lines += ["", "| re-ranker | dtype vs float32 | gallery | top-10 agreement | same order | max abs output diff "
                  "| max abs output |", "|---|---|---:|---:|---|---:|---:|"]
        lines += [f"| {r['name']} | {r['dtype']} | {r['gallery']} | {100 * r['top10_agreement']:.0f}% | "
                  f"{'yes' if r['same_order'] else 'no'} | {r['max_abs_output_diff']:.2e} | {r['max_abs_output']:.2e} |"
                  for r in precision]
    return "\n".join(lines)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="cost per query of the re-rankers (params, FLOPs, latency, memory)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="re-rankers to measure (default: every registered one)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"),
                        help="precision of the models, the inputs and the GEMM probe (default: fp32)")
    parser.add_argument("--json", type=Path, help="write the records here (a JSON list)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed runs first (default: 10)")
    parser.add_argument("--runs", type=int, default=10, help="timed runs (default: 10)")
    parser.add_argument("--gallery", type=int, default=100, help="re-ranked images per query (default: 100)")
    parser.add_argument("--sliding", type=int, default=400, help="shortlist of the sliding-window setting (0: skip)")
    parser.add_argument("--one-pass", type=_lengths, default=ONE_PASS_LENGTHS, metavar="N,N,...",
                        help="shortlist lengths of the one-pass setting, comma-separated ('' to skip; default: 100,400,1000)")
    parser.add_argument("--no-attention", dest="attention", action="store_false",
                        help="skip the reference vs fast attention comparison")

    def run(args):
        records = run_bench(args.names, args.device, args.gallery, args.sliding, args.warmup, args.runs, args.attention,
                            dtype=args.dtype, one_pass=args.one_pass)
        print(markdown(records))
        if args.json:
            atomic_write(args.json, json.dumps(records, indent=1))
        return 0

    parser.set_defaults(run=run)
