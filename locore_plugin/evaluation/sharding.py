"""Evaluation past one process and past one sitting.

``torchrun --nproc_per_node=N -m locore_plugin.evaluation ...`` (multi-node through torchrun's
rendezvous as well) starts N copies of the run: every rank loads the dataset, re-ranks its share
of the queries' batches on its own device, and the re-ranked heads are gathered so that every
rank holds the whole ranking; rank 0 writes the results. :class:`Shard` is this process's place
(``RANK`` / ``WORLD_SIZE`` from torchrun; one process without them), its collectives run on gloo
(CPU objects, any device).

:class:`FinishedQueries` keeps the heads of the queries a rank has re-ranked on disk, written
atomically every ``FLUSH_SECONDS``: a killed run, with any number of processes, re-ranks only the
queries no file holds yet.
"""
from __future__ import annotations

import io
import os
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from locore_plugin.io.atomic import atomic_write, set_aside

FLUSH_SECONDS = 30.0


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls) -> "Shard":
        """torchrun's ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``; the process group (gloo) is
        joined here when there is more than one process."""
        shard = cls(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                    int(os.environ.get("LOCAL_RANK", "0")))
        if shard.world_size > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("gloo")
        return shard

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def total(self, count: int) -> int:
        """The sum of ``count`` over the ranks (for one progress bar of the whole run)."""
        if self.world_size == 1:
            return int(count)
        import torch
        import torch.distributed as dist

        value = torch.tensor([int(count)], dtype=torch.int64)
        dist.all_reduce(value)
        return int(value.item())

    def gather(self, value) -> list:
        """``value`` of every rank, in rank order."""
        if self.world_size == 1:
            return [value]
        import torch.distributed as dist

        out = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()


class FinishedQueries:
    """The re-ranked heads of finished queries, ``{stem}.rank<r>.npz`` per rank (query ids and
    heads padded with -1). :meth:`load` reads every rank's file, whatever the number of processes
    that wrote them; :meth:`add` keeps a head and writes this rank's file at most every
    ``flush_seconds``; :meth:`clear` removes them all once the result is cached."""

    def __init__(self, stem: Path, rank: int = 0, flush_seconds: float = FLUSH_SECONDS):
        self.stem, self.rank, self.flush_seconds = Path(stem), int(rank), float(flush_seconds)
        self._rows: dict[int, np.ndarray] = {}
        self._written = time.monotonic()
        self._dirty = False

    def _files(self) -> list[Path]:
        return sorted(self.stem.parent.glob(f"{self.stem.name}.rank*.npz"))

    @property
    def path(self) -> Path:
        return self.stem.with_name(f"{self.stem.name}.rank{self.rank}.npz")

    def load(self) -> dict[int, np.ndarray]:
        found = {}
        for path in self._files():
            try:
                with np.load(path) as stored:
                    queries, heads = stored["queries"], stored["heads"]
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
                set_aside(path, error)
                continue
            rows = {int(q): head[head >= 0] for q, head in zip(queries, heads)}
            found.update(rows)
            if path == self.path:
                self._rows.update(rows)  # rewritten with this rank's new rows
        return found

    def add(self, query: int, head: np.ndarray) -> None:
        self._rows[int(query)] = np.asarray(head)
        self._dirty = True
        if time.monotonic() - self._written >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        if not self._dirty:
            return
        width = max(len(h) for h in self._rows.values())
        heads = np.full((len(self._rows), width), -1, np.int64)
        for i, head in enumerate(self._rows.values()):
            heads[i, : len(head)] = head
        buffer = io.BytesIO()
        np.savez(buffer, queries=np.fromiter(self._rows, np.int64, len(self._rows)), heads=heads)
        atomic_write(self.path, buffer.getvalue())
        self._written, self._dirty = time.monotonic(), False

    def clear(self) -> None:
        for path in self._files():
            path.unlink(missing_ok=True)
