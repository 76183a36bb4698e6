"""``locore-plugin bench``: the cost of re-ranking one query (LoCoRE supplementary Sec. 4.3 metrics).

For every registered re-ranker (or a chosen list), on synthetic descriptors of the shapes the
re-ranker takes (no I/O, no feature extraction): parameters of its ``.module`` (feature backbones
are not part of a re-ranker; 0 without a module, e.g. SuperGlobal), FLOPs
(``torch.utils.flop_counter``), latency mean +- std over ``runs`` runs after ``warmup`` warm-ups,
throughput (FLOP/s and queries/s) and peak memory (CUDA max allocated on a GPU, the peak increase
of the resident set on a CPU). Learned re-rankers use random weights: the cost does not depend on
them. Re-rankers with a sliding window (LoCoRE) are also timed on a ``sliding``-candidate shortlist.

Re-rankers whose factory takes ``attn_implementation`` are also run with the reference and the
fast attention side by side, alternating runs so that both see the same machine load; the
speed-up and the largest difference of the module's outputs (LoCoRE: per-token logits) are the
headline of the run.
"""
from __future__ import annotations

import argparse
import ctypes
import inspect
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
from transformers.models.longformer.modeling_longformer import LongformerSelfAttention

from .atomic import atomic_write
from .attention import FAST, REFERENCE
from .features import ImageFeatures
from .progress import progress
from .registry import create_reranker, lookup, registered_rerankers
from .runtime import resolve_device

# Descriptor sizes for re-rankers that do not state theirs: SuperGlobal's CVNet-R50 globals and SIFT locals.
DEFAULT_GLOBAL_DIM, DEFAULT_LOCAL_DIM, DEFAULT_LOCALS = 2048, 128, 1000

# FlopCounterMode has formulas for the CUDA fused attention kernels but not for the CPU one.
_CPU_SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
if _CPU_SDPA not in flop_counter.flop_registry:

    @flop_counter.register_flop_formula(_CPU_SDPA)
    def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


@dataclass
class CostRecord:
    """One re-ranker in one setting: the cost of re-ranking one query's shortlist."""

    name: str
    device: str
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
    tokens: int
    reference_ms: float
    fast_ms: float
    speedup: float
    max_abs_diff: float
    reference_flops: int
    fast_flops: int
    reference_attention_ms: float  # the self-attention modules alone, summed over layers
    fast_attention_ms: float
    attention_speedup: float
    runs: int
    threads: int


def synthetic_features(reranker, count: int, locals_per_image: int, seed: int = 0) -> list[ImageFeatures]:
    """``count`` images with every field (global, locals, mask, xy, scale, weight) at the re-ranker's dims.

    A quarter of the local slots are padded, as real descriptor files are.
    """
    local_dim, global_dim = _dims(reranker)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        g = rng.standard_normal(global_dim).astype(np.float32)
        local = rng.standard_normal((locals_per_image, local_dim)).astype(np.float32)
        local /= np.linalg.norm(local, axis=1, keepdims=True)
        mask = rng.random(locals_per_image) > 0.25
        mask[0] = True
        out.append(ImageFeatures(
            global_desc=g / np.linalg.norm(g), local=local, mask=mask,
            xy=rng.random((locals_per_image, 2)).astype(np.float32),  # normalised image coordinates
            scale=rng.integers(1, 3, locals_per_image).astype(np.float32),  # valid as scale ids (LoCoRE) and as scales (RRT)
            weight=np.sort(rng.random(locals_per_image).astype(np.float32))[::-1].copy(),
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
    """Locals per image the re-ranker keeps (its sequence length), else the default."""
    for name in (f"{role}_length", "num_locals", "max_locals"):
        if getattr(reranker, name, None):
            return int(getattr(reranker, name))
    return DEFAULT_LOCALS


def build(name: str, device, **options):
    """The registered re-ranker, with random weights where it is learned (``pretrained=False``,
    which every factory accepts: training-free ones ignore it)."""
    return create_reranker(name, device=device, pretrained=False, **options)


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


def count_flops(fn: Callable[[], object]) -> int:
    with flop_counter.FlopCounterMode(display=False) as counter:
        fn()
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
                   seed: int = 0) -> list[CostRecord]:
    """The cost records of one re-ranker: ``top-{gallery}``, plus ``sliding-{sliding}`` when it has a sliding window."""
    device = resolve_device(device)
    settings = [(f"top-{gallery}", gallery, {})]
    reranker = build(name, device)
    if getattr(reranker, "window", None) and getattr(reranker, "shortlist", None) and sliding:
        settings.append((f"sliding-{sliding}", sliding, {"shortlist": sliding}))
    records = []
    for setting, size, options in settings:
        if options:
            reranker = build(name, device, **options)
        query = synthetic_features(reranker, 1, _locals(reranker, "query"), seed)[0]
        shortlist = synthetic_features(reranker, size, _locals(reranker, "gallery"), seed + 1)
        scores = np.sort(np.random.default_rng(seed).random(size).astype(np.float32))[::-1].copy()

        def run():
            return reranker.rerank(query, shortlist, scores)

        run()  # first call: lazy initialisation stays out of the FLOPs and the timings
        flops = count_flops(run)
        with _PeakMemory(device) as memory:
            (times,) = time_runs([run], device, warmup, runs, desc=f"{name} {setting}")
        mean = statistics.fmean(times)
        module = getattr(reranker, "module", None)
        records.append(CostRecord(
            name=name, device=_device_name(device), setting=setting, gallery=size,
            params=sum(p.numel() for p in module.parameters()) if module is not None else 0, flops=flops,
            latency_ms_mean=mean, latency_ms_std=statistics.stdev(times) if len(times) > 1 else 0.0,
            flop_per_s=flops / (mean / 1000), queries_per_s=1000 / mean, peak_mem_mb=memory.peak_mb, runs=runs,
            threads=torch.get_num_threads(),
        ))
    return records


def has_attention_choice(name: str) -> bool:
    """Whether the re-ranker's factory takes ``attn_implementation`` (reference vs fast attention)."""
    factory = lookup(registered_rerankers(), name, "re-ranker").factory
    return "attn_implementation" in inspect.signature(factory).parameters


def compare_attention(name: str, device="cpu", gallery: int = 100, warmup: int = 10, runs: int = 10,
                      seed: int = 0) -> AttentionRecord:
    """Reference vs fast attention of one re-ranker on one query of ``gallery`` images, same weights."""
    device = resolve_device(device)
    models = {impl: build(name, device, attn_implementation=impl, shortlist=gallery) for impl in (REFERENCE, FAST)}
    models[FAST].module.load_state_dict(models[REFERENCE].module.state_dict())
    reranker = models[REFERENCE]
    query = synthetic_features(reranker, 1, _locals(reranker, "query"), seed)[0]
    shortlist = synthetic_features(reranker, gallery, _locals(reranker, "gallery"), seed + 1)
    scores = np.sort(np.random.default_rng(seed).random(gallery).astype(np.float32))[::-1].copy()
    outputs, runners = {}, {}
    for impl, model in models.items():
        model.module.register_forward_hook(lambda module, args, output, impl=impl: outputs.__setitem__(impl, output))
        runners[impl] = lambda model=model: model.rerank(query, shortlist, scores)
    flops = {impl: count_flops(run) for impl, run in runners.items()}
    reference, fast = (outputs[impl].float() for impl in (REFERENCE, FAST))
    clocks = {impl: _AttentionClock(model.module, device) for impl, model in models.items()}
    times = time_runs([runners[REFERENCE], runners[FAST]], device, warmup, runs, desc=f"{name} attention")
    reference_ms, fast_ms = (statistics.fmean(t) for t in times)
    attention_ms = {impl: clock.total_ms / (warmup + runs) for impl, clock in clocks.items()}
    return AttentionRecord(
        name=name, device=_device_name(device), tokens=int(reference.shape[1]), reference_ms=reference_ms,
        fast_ms=fast_ms, speedup=reference_ms / fast_ms, max_abs_diff=float((reference - fast).abs().max()),
        reference_flops=flops[REFERENCE], fast_flops=flops[FAST], reference_attention_ms=attention_ms[REFERENCE],
        fast_attention_ms=attention_ms[FAST], attention_speedup=attention_ms[REFERENCE] / attention_ms[FAST],
        runs=runs, threads=torch.get_num_threads(),
    )


class _AttentionClock:
    """Accumulates the wall time spent inside a module's Longformer self-attention layers (forward hooks)."""

    def __init__(self, module: torch.nn.Module, device: torch.device):
        self.total_ms, self.device = 0.0, device
        for layer in module.modules():
            if isinstance(layer, LongformerSelfAttention):
                layer.register_forward_pre_hook(self._start)
                layer.register_forward_hook(self._stop)

    def _start(self, module, args):
        _sync(self.device)
        self.started = time.perf_counter()

    def _stop(self, module, args, output):
        _sync(self.device)
        self.total_ms += (time.perf_counter() - self.started) * 1000


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def run_bench(names: Optional[Sequence[str]] = None, device="cpu", gallery: int = 100, sliding: int = 400,
              warmup: int = 10, runs: int = 10, attention: bool = True, seed: int = 0) -> list[dict]:
    """Every record of a benchmark run (cost records, then attention comparisons), as dicts."""
    if warmup < 0 or runs < 1 or gallery < 1 or sliding < 0:
        raise ValueError("need warmup >= 0, runs >= 1, gallery >= 1 and sliding >= 0")
    entries = registered_rerankers()
    names = list(names) if names else sorted(entries)
    for name in names:
        lookup(entries, name, "re-ranker")
    records = []
    for name in progress(names, desc="bench", unit="re-ranker"):
        records += [asdict(r) for r in bench_reranker(name, device, gallery, sliding, warmup, runs, seed)]
    if attention:
        for name in [n for n in names if has_attention_choice(n)]:
            records.append(asdict(compare_attention(name, device, gallery, warmup, runs, seed)))
    return records


def markdown(records: Sequence[dict]) -> str:
    """Markdown tables: the reference vs fast attention first (the headline), then the cost per re-ranker."""
    costs = [r for r in records if "setting" in r]
    attention = [r for r in records if "speedup" in r]
    lines = [f"Device: {records[0]['device'] if records else '-'}"]
    if attention:
        lines += ["", "| model | tokens | reference (ms) | fast (ms) | speed-up | attention alone: ref / fast (ms), speed-up "
                  "| max abs diff | GFLOPs ref / fast |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['name']} | {r['tokens']} | {r['reference_ms']:.0f} | {r['fast_ms']:.0f} | "
                  f"**{r['speedup']:.2f}x** | {r['reference_attention_ms']:.0f} / {r['fast_attention_ms']:.0f}, "
                  f"{r['attention_speedup']:.2f}x | {r['max_abs_diff']:.1e} | "
                  f"{r['reference_flops'] / 1e9:.0f} / {r['fast_flops'] / 1e9:.0f} |" for r in attention]
    if costs:
        lines += ["", "| re-ranker | setting | params (M) | GFLOPs | latency (ms) | GFLOP/s | queries/s | peak mem (MB) |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['name']} | {r['setting']} | {r['params'] / 1e6:.1f} | {r['flops'] / 1e9:.1f} | "
                  f"{r['latency_ms_mean']:.0f} ± {r['latency_ms_std']:.0f} | {r['flop_per_s'] / 1e9:.1f} | "
                  f"{r['queries_per_s']:.3f} | {r['peak_mem_mb']:.0f} |" for r in costs]
    return "\n".join(lines)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="cost per query of the re-rankers (params, FLOPs, latency, memory)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="re-rankers to measure (default: every registered one)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--json", type=Path, help="write the records here (a JSON list)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed runs first (default: 10)")
    parser.add_argument("--runs", type=int, default=10, help="timed runs (default: 10)")
    parser.add_argument("--gallery", type=int, default=100, help="re-ranked images per query (default: 100)")
    parser.add_argument("--sliding", type=int, default=400, help="shortlist of the sliding-window setting (0: skip)")
    parser.add_argument("--no-attention", dest="attention", action="store_false",
                        help="skip the reference vs fast attention comparison")

    def run(args):
        records = run_bench(args.names, args.device, args.gallery, args.sliding, args.warmup, args.runs, args.attention)
        print(markdown(records))
        if args.json:
            atomic_write(args.json, json.dumps(records, indent=1))
        return 0

    parser.set_defaults(run=run)
