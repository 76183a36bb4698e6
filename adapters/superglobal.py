"""SuperGlobal re-ranking (Shao et al., ICCV 2023): MDescAug then RerankwMDA, on global descriptors.

Faithful to the official modules: neighbours are searched only inside the query's top-M list,
the first neighbour (the item itself) has weight 1 and the others beta * similarity, the refined
descriptors are weight-averaged and not L2-renormalised, the query is expanded by the element-wise
max of the K+1 best refined descriptors, and the score is the mean of the two similarities.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from locore_plugin.features import stack_globals
from locore_plugin.hookspecs import hookimpl
from locore_plugin.interface import ImageReranker, RerankResult, with_tail
from locore_plugin.options import renamed_options
from locore_plugin.runtime import resolve_device, resolve_dtype


class SuperGlobalReranker(ImageReranker):
    """Re-ranks the first ``top_k`` (the paper's M) of a shortlist; items beyond keep their order
    and incoming score. Training-free: ``pretrained`` is accepted (the rule every method shares)
    and changes nothing."""

    def __init__(self, top_k=None, K=9, beta=0.15, device=None, dtype="float32", batch_size=64, verbose=0,
                 pretrained: bool = False, **deprecated):
        given = renamed_options({"top_k": top_k}, deprecated, {"M": "top_k"}, "superglobal")
        top_k = 400 if given["top_k"] is None else given["top_k"]
        if top_k < 1 or K < 0:
            raise ValueError(f"SuperGlobal needs top_k >= 1 and K >= 0, got top_k={top_k}, K={K}")
        self.top_k, self.K, self.beta = int(top_k), int(K), float(beta)
        self.device, self.dtype = resolve_device(device), resolve_dtype(dtype)
        self.batch_size = int(batch_size)
        self.verbose = verbose

    def _rerank_many(self, queries, shortlists, global_scores):
        by_depth = defaultdict(list)  # queries whose re-ranked depth min(top_k, N) is the same run together
        for i, shortlist in enumerate(shortlists):
            by_depth[min(self.top_k, len(shortlist))].append(i)
        results = [None] * len(queries)
        for depth, members in by_depth.items():
            for start in range(0, len(members), self.batch_size):
                batch = members[start : start + self.batch_size]
                q = torch.as_tensor(stack_globals([queries[i] for i in batch], "superglobal"))
                x = torch.as_tensor(np.stack([stack_globals(shortlists[i][:depth], "superglobal") for i in batch]))
                if q.shape[1] != x.shape[2]:
                    raise ValueError(f"query global dimension {q.shape[1]} != gallery global dimension {x.shape[2]}")
                local_order, scores = self.refine(q.to(self.device, self.dtype), x.to(self.device, self.dtype))
                for row, i in enumerate(batch):
                    head = RerankResult(order=local_order[row], scores=scores[row])
                    results[i] = with_tail(head, global_scores[i], len(shortlists[i]))
        return results

    @torch.inference_mode()
    def refine(self, q: torch.Tensor, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """q (B, D) queries, x (B, M, D) their top-M descriptors in initial order.

        Returns the new order of the M items (local positions, best first) and each item's final
        score, aligned with the initial order.
        """
        depth = x.shape[1]
        k1 = min(self.K + 1, depth)
        gram = x @ x.transpose(1, 2)
        sims, neighbours = torch.topk(gram, k1, dim=-1)
        weights = sims * self.beta
        weights[..., 0] = 1.0
        dense = torch.zeros_like(gram).scatter_(-1, neighbours, weights)
        x_dba = (dense @ x) / weights.sum(-1, keepdim=True)
        dba_scores = torch.einsum("bd,bmd->bm", q, x_dba)
        dba_order = torch.argsort(dba_scores, dim=-1, descending=True)
        x_sorted = torch.gather(x_dba, 1, dba_order[..., None].expand_as(x_dba))
        expanded_query = x_sorted[:, :k1].amax(dim=1)
        final_sorted = (torch.gather(dba_scores, 1, dba_order) + torch.einsum("bd,bmd->bm", expanded_query, x_sorted)) / 2
        final_order = torch.gather(dba_order, 1, torch.argsort(final_sorted, dim=-1, descending=True))
        final_scores = torch.empty_like(final_sorted).scatter_(1, dba_order, final_sorted)
        return final_order.cpu().numpy(), final_scores.float().cpu().numpy()


@hookimpl
def register_rerankers(register):
    register(
        "superglobal",
        SuperGlobalReranker,
        description="SuperGlobal re-ranking (ICCV 2023): MDescAug + RerankwMDA on global descriptors",
        inputs="global",
    )
