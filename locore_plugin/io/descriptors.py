"""The official AMES / LoCoRE descriptor files: readers, writers, lazy galleries and shortlists.

Layout of a dataset folder ``{root}/{dataset}/`` (``root`` from ``LOCORE_DATA`` or an argument),
as pavelsuma/ames (``extract/``, ``src/utils/``) and MrZilinXiao/LongContextReranker write it:

* ``{desc}_{query,gallery}_local.hdf5``: dataset ``features`` [N, topk, 5 + D] float32, columns
  x, y, scale, mask (1 = padding), detector weight, then the descriptor; rows sorted by weight.
  Some published files use a structured row instead: ``metadata`` (topk, 5) float32 and
  ``descriptor`` (topk, D) float16, as fields of a compound ``features`` [N] or as two datasets.
* ``{desc}_{query,gallery}_global.pt``: raw float32 [N, D], no header (``torch.FloatStorage.from_file``
  / ``np.memmap``).
* ``nn_{name}.pkl``: [2, nq, K] global similarities and gallery indices, both stored as floats
  (a pickled float64 torch tensor for ROxf/RPar).
* ``gnd_{dataset}.pkl``: ``{"gnd": [{"easy", "hard", "junk", "bbx"}...], "imlist", "qimlist"}``.

+1M: the gallery is the dataset's gallery followed by ``{root}/revisitop1m/{desc}_local.hdf5`` and
``{desc}_global.pt``, read lazily; shortlists for it live in ``{root}/{dataset}+1m/``.
The mask is converted once, here: :class:`~locore_plugin.features.ImageFeatures` holds True = valid.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from locore_plugin.features import ImageFeatures, stack_locals
from locore_plugin.progress import progress

from .atomic import set_aside
from .pickles import OFFICIAL_DATA, read_pickle

DATA_ENV = "LOCORE_DATA"
DISTRACTORS = "revisitop1m"
META = 5  # x, y, scale, mask (1 = padding), detector weight
LAYOUTS = ("flat", "structured")


def data_root(root=None) -> Path:
    """The dataset root: ``root`` if given, else ``$LOCORE_DATA``."""
    root = root if root is not None else os.environ.get(DATA_ENV)
    if not root:
        raise FileNotFoundError(f"no data root: pass one or set {DATA_ENV}; {OFFICIAL_DATA}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data root {root} does not exist; {OFFICIAL_DATA}")
    return root


def descriptor_paths(directory, desc: str, split: Optional[str]) -> tuple[Path, Path]:
    """``({desc}_{split}_local.hdf5, {desc}_{split}_global.pt)``; split None for revisitop1m's ``{desc}_local.hdf5``."""
    stem = f"{desc}_{split}" if split else desc
    directory = Path(directory)
    return directory / f"{stem}_local.hdf5", directory / f"{stem}_global.pt"


def _require(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; {OFFICIAL_DATA}")
    return path


class LocalReader:
    """One local-descriptor HDF5 file (either layout), read by rows on demand."""

    def __init__(self, path):
        import h5py

        self.path = _require(Path(path))
        self._file = h5py.File(self.path, "r")
        keys = set(self._file.keys())
        if "features" in keys and self._file["features"].dtype.names is None:
            self.layout = "flat"
            self._features = self._file["features"]
            if self._features.ndim != 3 or self._features.shape[2] <= META:
                raise ValueError(f"{self.path}: 'features' must be [N, topk, 5 + D], got {self._features.shape}")
            self.num_images, self.topk, width = self._features.shape
            self.dim = width - META
            return
        self.layout = "structured"
        if "features" in keys:  # compound rows
            self._features = self._file["features"]
            names = set(self._features.dtype.names)
            if not {"metadata", "descriptor"} <= names:
                raise ValueError(f"{self.path}: compound 'features' needs fields metadata and descriptor, has {sorted(names)}")
            self.num_images = self._features.shape[0]
            meta_shape, desc_shape = self._features.dtype["metadata"].shape, self._features.dtype["descriptor"].shape
        elif {"metadata", "descriptor"} <= keys:  # two datasets
            self._features = None
            self.num_images = self._file["metadata"].shape[0]
            meta_shape, desc_shape = self._file["metadata"].shape[1:], self._file["descriptor"].shape[1:]
        else:
            raise ValueError(f"{self.path}: expected dataset 'features' or 'metadata' + 'descriptor', found {sorted(keys)}")
        if len(meta_shape) != 2 or meta_shape[1] != META or len(desc_shape) != 2 or desc_shape[0] != meta_shape[0]:
            raise ValueError(f"{self.path}: metadata {meta_shape} / descriptor {desc_shape} are not (topk, 5) / (topk, D)")
        self.topk, self.dim = desc_shape

    def __len__(self) -> int:
        return self.num_images

    def read(self, indices, num_locals: Optional[int] = None) -> dict[str, np.ndarray]:
        """Rows ``indices`` (any order, repeats allowed): ``local`` [n, L, D], ``mask`` [n, L] (True = valid),
        ``xy`` [n, L, 2], ``scale`` [n, L], ``weight`` [n, L], with L = min(num_locals, topk)."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if indices.size and (indices.min() < 0 or indices.max() >= self.num_images):
            raise IndexError(f"{self.path}: rows {indices.min()}..{indices.max()} outside [0, {self.num_images})")
        length = self.topk if num_locals is None else min(int(num_locals), self.topk)
        rows, inverse = np.unique(indices, return_inverse=True)  # h5py reads increasing rows
        rows = rows.tolist()
        if self.layout == "flat":
            block = self._features[rows, :length] if rows else np.zeros((0, length, META + self.dim), np.float32)
            meta, local = block[..., :META], block[..., META:]
        elif self._features is not None:
            block = self._features[rows] if rows else np.zeros((0,), self._features.dtype)
            meta, local = block["metadata"][:, :length], block["descriptor"][:, :length]
        else:
            meta = self._file["metadata"][rows, :length] if rows else np.zeros((0, length, META), np.float32)
            local = self._file["descriptor"][rows, :length] if rows else np.zeros((0, length, self.dim), np.float16)
        return official_columns(np.asarray(meta, np.float32)[inverse], np.asarray(local, np.float32)[inverse])

    def close(self) -> None:
        self._file.close()


def official_columns(meta: np.ndarray, local: np.ndarray) -> dict[str, np.ndarray]:
    """The ImageFeatures columns of official rows: ``meta`` [..., 5] = x, y, scale, mask (1 = padding),
    detector weight; ``local`` [..., D]. The mask turns into True = valid here, once."""
    return {"local": local, "mask": meta[..., 3] == 0, "xy": meta[..., :2], "scale": meta[..., 2], "weight": meta[..., 4]}


def read_globals(path, num_images: int, dim: Optional[int] = None) -> np.memmap:
    """Memory-map a raw float32 ``*_global.pt`` file as [num_images, D] (D from the file size if not given)."""
    path = _require(Path(path))
    size = path.stat().st_size
    if num_images <= 0 or size % (4 * num_images):
        raise ValueError(f"{path}: {size} bytes is not {num_images} rows of float32")
    inferred = size // (4 * num_images)
    if dim is not None and dim != inferred:
        raise ValueError(f"{path}: holds {num_images} x {inferred} float32, expected dimension {dim}")
    return np.memmap(path, dtype="<f4", mode="r", shape=(num_images, inferred))


@dataclass(frozen=True)
class _Part:
    local: Optional[LocalReader]
    globals: Optional[np.memmap]
    size: int


class DescriptorSet(SequenceABC):
    """Images of one or more files, one after the other, read on demand (never whole into RAM).

    Each part is a ``(local_hdf5 or None, global_pt or None)`` pair; its image count comes from the
    local file, or ``sizes`` where a part has only globals. ``num_locals`` keeps the first
    (strongest) rows of each image.
    """

    def __init__(self, parts: Sequence[tuple], sizes: Optional[Sequence[Optional[int]]] = None,
                 num_locals: Optional[int] = None):
        if not parts:
            raise ValueError("a DescriptorSet needs at least one part")
        sizes = list(sizes) if sizes is not None else [None] * len(parts)
        built = []
        for (local_path, global_path), size in zip(parts, sizes, strict=True):
            if local_path is None and global_path is None:
                raise ValueError("a part needs a local file, a global file, or both")
            local = LocalReader(local_path) if local_path is not None else None
            if local is not None:
                if size is not None and size != len(local):
                    raise ValueError(f"{local.path} holds {len(local)} images, expected {size}")
                size = len(local)
            if size is None:
                raise ValueError(f"{global_path}: the number of images is needed for a global-only part")
            built.append(_Part(local, read_globals(global_path, size) if global_path is not None else None, size))
        for name in ("local", "globals"):
            present = {getattr(p, name) is not None for p in built}
            if len(present) > 1:
                raise ValueError(f"every part must have {name} descriptors, or none")
        dims = {p.globals.shape[1] for p in built if p.globals is not None}
        ldims = {p.local.dim for p in built if p.local is not None}
        if len(dims) > 1 or len(ldims) > 1:
            raise ValueError(f"parts have different descriptor dimensions: global {sorted(dims)}, local {sorted(ldims)}")
        self._parts = built
        self._offsets = np.cumsum([0] + [p.size for p in built])
        self.num_locals = num_locals
        self.has_local = built[0].local is not None
        self.has_global = built[0].globals is not None
        self.global_dim = dims.pop() if dims else None
        self.local_dim = ldims.pop() if ldims else None

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.features(range(*index.indices(len(self))))
        return self.features([index])[0]

    def _split(self, indices) -> tuple[np.ndarray, np.ndarray]:
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"indices {indices.min()}..{indices.max()} outside [0, {len(self)})")
        part = np.searchsorted(self._offsets, indices, side="right") - 1
        return part, indices - self._offsets[part]

    def globals(self, indices) -> np.ndarray:
        """Global descriptors [n, D] float32 of the given images."""
        if not self.has_global:
            raise ValueError("this descriptor set has no global descriptors")
        part, row = self._split(indices)
        out = np.empty((len(row), self.global_dim), np.float32)
        for p in np.unique(part):
            sel = part == p
            out[sel] = self._parts[p].globals[row[sel]]
        return out

    def global_batches(self, batch_size: int = 65536) -> Iterator[tuple[int, np.ndarray]]:
        """``(first index, [b, D] float32)`` over the whole set, in order, for batched searches."""
        if not self.has_global:
            raise ValueError("this descriptor set has no global descriptors")
        for offset, part in zip(self._offsets, self._parts):
            for start in range(0, part.size, batch_size):
                yield int(offset + start), np.asarray(part.globals[start:start + batch_size], np.float32)

    def locals(self, indices) -> dict[str, np.ndarray]:
        """Padded local arrays (see :meth:`LocalReader.read`) of the given images, in their order."""
        if not self.has_local:
            raise ValueError("this descriptor set has no local descriptors")
        part, row = self._split(indices)
        out = None
        for p in np.unique(part):
            sel = np.flatnonzero(part == p)
            block = self._parts[p].local.read(row[sel], self.num_locals)
            if out is None:
                out = {k: np.empty((len(row), *v.shape[1:]), v.dtype) for k, v in block.items()}
            for k, v in block.items():
                out[k][sel] = v
        if out is None:  # no image asked: the reader's own empty arrays
            return self._parts[0].local.read([], self.num_locals)
        return out

    def features(self, indices) -> list[ImageFeatures]:
        """:class:`ImageFeatures` of the given images, in their order."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        g = self.globals(indices) if self.has_global else None
        loc = self.locals(indices) if self.has_local else None
        return [
            ImageFeatures(
                global_desc=None if g is None else g[i],
                **({} if loc is None else {k: v[i] for k, v in loc.items()}),
            )
            for i in range(len(indices))
        ]

    def close(self) -> None:
        for part in self._parts:
            if part.local is not None:
                part.local.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------------------------------
# Shortlists


def read_nn(path) -> tuple[np.ndarray, np.ndarray]:
    """An ``nn_*.pkl`` shortlist: ``(similarities [nq, K] float32, gallery indices [nq, K] int64)``."""
    data = np.asarray(read_pickle(path))
    if data.ndim != 3 or data.shape[0] != 2:
        raise ValueError(f"{path}: expected [2, nq, K] (similarities, indices), got shape {data.shape}")
    indices = data[1]
    if not np.all(np.isfinite(indices)) or np.any(indices != np.round(indices)) or np.any(indices < 0):
        raise ValueError(f"{path}: the index plane holds non-integer or negative values")
    return data[0].astype(np.float32), indices.astype(np.int64)


def write_nn(path, similarities, indices) -> Path:
    """Write a shortlist as the official ROxf/RPar ``nn_*.pkl`` does (pickled float64 torch tensor [2, nq, K]).

    The file appears atomically (written beside it, then renamed); it is pickled straight into it
    from one float64 buffer, so a large shortlist (SOP: 60k x 1,000) is not held twice more in memory."""
    import torch

    similarities, indices = np.asarray(similarities), np.asarray(indices)
    if similarities.shape != indices.shape or similarities.ndim != 2:
        raise ValueError(f"similarities {similarities.shape} and indices {indices.shape} must both be [nq, K]")
    planes = np.empty((2, *similarities.shape), np.float64)
    planes[0], planes[1] = similarities, indices
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            pickle.dump(torch.from_numpy(planes), handle, protocol=2)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


QUERY_BLOCK = 4096  # queries merged at once when building a shortlist


def build_shortlist(queries, gallery: "DescriptorSet | np.ndarray", depth: int, batch_size: int = 65536,
                    verbose: bool = True, exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-``depth`` gallery images per query (faiss), over gallery batches:
    memory holds one gallery batch and the [nq, K] result, never a queries x gallery matrix.

    ``queries`` [nq, D]; ``gallery`` a :class:`DescriptorSet` (read batch by batch) or an [N, D] array.
    Returns ``(similarities [nq, K] float32, indices [nq, K] int64)``, K = min(depth, N), best first,
    ties broken by the lower index. ``exclude_self``: query i is gallery image i (SOP, CUB-200),
    left out of its own list (K = min(depth, N - 1)).
    """
    import faiss

    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.ndim != 2 or not np.isfinite(queries).all():
        raise ValueError(f"queries must be a finite [nq, D] array, got shape {queries.shape}")
    if isinstance(gallery, DescriptorSet):
        total, batches = len(gallery), gallery.global_batches(batch_size)
    else:
        gallery = np.asarray(gallery)
        total = len(gallery)
        batches = ((s, gallery[s:s + batch_size]) for s in range(0, total, batch_size))
    if depth < 1 or total <= int(exclude_self):
        raise ValueError(f"need depth >= 1 and a non-empty gallery (depth {depth}, gallery {total})")
    if exclude_self and len(queries) != total:
        raise ValueError(f"exclude_self: the queries are the gallery, but there are {len(queries)} queries and {total} images")
    k = min(int(depth) + int(exclude_self), total)
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_i = np.full((len(queries), k), np.iinfo(np.int64).max, np.int64)  # empty slots sort last
    with progress(total=total, desc="global shortlist", unit="img", disable=not verbose) as bar:
        for start, block in batches:
            block = np.ascontiguousarray(block, dtype=np.float32)
            if block.shape[1] != queries.shape[1]:
                raise ValueError(f"gallery dimension {block.shape[1]} != query dimension {queries.shape[1]}")
            for rows in range(0, len(queries), QUERY_BLOCK):  # temporaries of one query block at a time
                chunk = slice(rows, rows + QUERY_BLOCK)
                s, i = faiss.knn(queries[chunk], block, min(k, len(block)), metric=faiss.METRIC_INNER_PRODUCT)
                s = np.concatenate([best_s[chunk], s], 1)
                i = np.concatenate([best_i[chunk], i + start], 1)
                order = np.lexsort((i, -s), axis=1)[:, :k]
                best_s[chunk], best_i[chunk] = np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)
            bar.update(len(block))
    if exclude_self:  # drop each query from its list, or its last item where it is not in it (ties)
        keep = best_i != np.arange(len(queries))[:, None]
        keep[keep.all(1), -1] = False
        best_s, best_i = best_s[keep].reshape(len(queries), k - 1), best_i[keep].reshape(len(queries), k - 1)
    return best_s, best_i


def cached_shortlist(cache: Path, queries: DescriptorSet, gallery: DescriptorSet, depth: int,
                     exclude_self: bool = False, batch_size: int = 65536, verbose: bool = True):
    """:func:`build_shortlist` of the query globals against ``gallery``, kept in ``cache`` (an
    ``.npz`` of ``similarities`` float32 and ``indices`` int32/int64, written and read without
    copies: SOP's 60,502 x 1,000 takes 484 MB where the pickled float64 ``nn_*.pkl`` layout
    needed three copies of 968 MB to write) and reused while it is at least ``depth`` deep and
    newer than the global files."""
    expected = min(depth, len(gallery) - int(exclude_self))
    globals_mtime = max(Path(p.globals.filename).stat().st_mtime
                        for s in (queries, gallery) for p in s._parts if p.globals is not None)
    if cache.is_file() and cache.stat().st_mtime >= globals_mtime:
        try:
            with np.load(cache) as stored:
                sims, idx = stored["similarities"], stored["indices"]
        except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as error:  # truncated or foreign: rebuild it
            set_aside(cache, error)
        else:
            if sims.shape == idx.shape and sims.shape[0] == len(queries) and sims.shape[1] >= expected:
                return sims[:, :depth], idx[:, :depth].astype(np.int64)
    sims, idx = build_shortlist(queries.globals(np.arange(len(queries))), gallery, depth, batch_size, verbose, exclude_self)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            np.savez(handle, similarities=sims.astype(np.float32, copy=False),
                     indices=idx.astype(np.int32 if len(gallery) < 2**31 else np.int64))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, cache)
    finally:
        tmp.unlink(missing_ok=True)
    return sims, idx


# ---------------------------------------------------------------------------------------------
# A revisited dataset as a whole


@dataclass
class RevisitedData:
    """Queries, gallery (with +1M distractors appended when asked) and ground truth of one dataset."""

    name: str
    desc: str
    root: Path
    queries: DescriptorSet
    gallery: DescriptorSet
    gnd: list
    plus1m: bool = False

    @property
    def nn_dir(self) -> Path:
        """Where the dataset's ``nn_*.pkl`` files live (``{root}/{dataset}+1m`` for +1M)."""
        return self.root / (f"{self.name}+1m" if self.plus1m else self.name)

    def shortlist(self, depth: Optional[int] = None, nn: Optional[str] = None, cache_dir=None,
                  batch_size: int = 65536, verbose: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """The global shortlist ``(similarities [nq, K], indices [nq, K])``.

        With ``nn`` the published ``nn_{nn}.pkl`` is read (first ``depth`` columns, all if None).
        Without it, the exact inner-product top-``depth`` (default 1600, the official depth) is
        built with faiss and cached as ``{cache_dir or nn_dir}/nn_{desc}_exact.npz``; the cache is
        reused while it is at least as deep and newer than the global descriptor files.
        """
        if nn is not None:
            sims, idx = read_nn(self.nn_dir / f"nn_{nn}.pkl")
            if depth is not None:
                if sims.shape[1] < depth:
                    raise ValueError(f"nn_{nn}.pkl holds {sims.shape[1]} neighbours per query, {depth} asked")
                sims, idx = sims[:, :depth], idx[:, :depth]
            self._check_shortlist(idx, f"nn_{nn}.pkl")
            return sims, idx
        depth = 1600 if depth is None else int(depth)
        cache = Path(cache_dir or self.nn_dir) / f"nn_{self.desc}_exact.npz"
        sims, idx = cached_shortlist(cache, self.queries, self.gallery, depth, batch_size=batch_size, verbose=verbose)
        self._check_shortlist(idx, str(cache))
        return sims, idx

    def _check_shortlist(self, idx: np.ndarray, source: str) -> None:
        if idx.shape[0] != len(self.queries):
            raise ValueError(f"{source}: {idx.shape[0]} queries, the dataset has {len(self.queries)}")
        if idx.size and idx.max() >= len(self.gallery):
            raise ValueError(f"{source}: index {int(idx.max())} outside the gallery of {len(self.gallery)} images")

    def close(self) -> None:
        self.queries.close()
        self.gallery.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# Datasets whose ground truth is another file of the official layout, and the part of it they
# hold: the GLDv2 public validation split shares gnd_gldv2-test.pkl and is its public queries (all
# but the last 750, AMES / ELViS conf/dataset/gldv2-val.yaml and utils/revisited.py).
SHARED_GND = {"gldv2-val": ("gnd_gldv2-test.pkl", slice(0, -750))}


def open_revisited(dataset: str, desc: str, root=None, plus1m: bool = False, num_locals: Optional[int] = None,
                   with_local: bool = True, with_global: bool = True) -> RevisitedData:
    """Open ``{root}/{dataset}`` (``gnd_{dataset}.pkl`` and the ``{desc}_*`` files) lazily.

    ``plus1m`` appends ``{root}/revisitop1m/{desc}_local.hdf5`` / ``{desc}_global.pt`` to the gallery.
    """
    if not (with_local or with_global):
        raise ValueError("open at least the local or the global descriptors")
    root = data_root(root)
    directory = root / dataset
    gnd_name, rows = SHARED_GND.get(dataset, (f"gnd_{dataset}.pkl", slice(None)))
    info = read_pickle(directory / gnd_name)
    if not isinstance(info, dict) or "gnd" not in info:
        raise ValueError(f"{directory / gnd_name}: expected a dict with 'gnd'")
    gnd = list(info["gnd"])[rows]

    def part(folder, split):
        local, glob = descriptor_paths(folder, desc, split)
        return (_require(local) if with_local else None, _require(glob) if with_global else None)

    nq = len(gnd) if rows != slice(None) else len(info.get("qimlist", gnd))
    ndb = len(info["imlist"]) if "imlist" in info else None
    queries = DescriptorSet([part(directory, "query")], [nq], num_locals)
    gallery_parts, sizes = [part(directory, "gallery")], [ndb]
    if plus1m:
        gallery_parts.append(part(root / DISTRACTORS, None))
        sizes.append(None if with_local else _distractor_count(root, desc))
    gallery = DescriptorSet(gallery_parts, sizes, num_locals)
    if len(queries) != len(gnd):
        raise ValueError(f"{dataset}: {len(queries)} query descriptors but {len(gnd)} ground-truth entries")
    return RevisitedData(dataset, desc, root, queries, gallery, gnd, plus1m)


def _distractor_count(root: Path, desc: str) -> int:
    """Images in revisitop1m when only its global file is opened: from the official image list,
    else from the local file's length (present but not read)."""
    local, _ = descriptor_paths(root / DISTRACTORS, desc, None)
    if local.is_file():
        reader = LocalReader(local)
        try:
            return len(reader)
        finally:
            reader.close()
    for name in ("test_gallery.txt", "imlist.txt"):
        path = root / DISTRACTORS / name
        if path.is_file():
            with open(path) as handle:
                return sum(1 for line in handle if line.strip())
    raise FileNotFoundError(f"{root / DISTRACTORS}: need {desc}_local.hdf5 or test_gallery.txt to size the distractors; "
                            f"{OFFICIAL_DATA}")


# ---------------------------------------------------------------------------------------------
# Writers


class DescriptorWriter:
    """Streams images into ``{desc}_{split}_local.hdf5`` and ``{desc}_{split}_global.pt`` (official layout).

    Locals beyond ``topk`` keep the strongest by detector weight; padding rows are zero with
    mask = 1. Files appear under their final names only when all ``num_images`` are written.
    """

    def __init__(self, directory, desc: str, split: Optional[str], num_images: int, topk: int,
                 local_dim: Optional[int] = None, global_dim: Optional[int] = None, layout: str = "flat"):
        import h5py

        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
        if local_dim is None and global_dim is None:
            raise ValueError("give local_dim, global_dim, or both")
        self.local_path, self.global_path = descriptor_paths(directory, desc, split)
        self.local_path.parent.mkdir(parents=True, exist_ok=True)
        self.num_images, self.topk, self.layout = int(num_images), int(topk), layout
        self.local_dim, self.global_dim = local_dim, global_dim
        self._count = 0
        self._h5 = self._features = self._globals = None
        tmp = lambda p: p.with_name(f".{p.name}.{os.getpid()}.tmp")  # noqa: E731
        if local_dim is not None:
            self._h5 = h5py.File(tmp(self.local_path), "w")
            if layout == "flat":
                self._features = self._h5.create_dataset("features", (self.num_images, self.topk, META + local_dim), "<f4")
            else:
                row = np.dtype([("metadata", "<f4", (self.topk, META)), ("descriptor", "<f2", (self.topk, local_dim))])
                self._features = self._h5.create_dataset("features", (self.num_images,), row)
        if global_dim is not None:
            self._globals = np.memmap(tmp(self.global_path), dtype="<f4", mode="w+", shape=(self.num_images, global_dim))

    def append(self, features: Sequence[ImageFeatures]) -> None:
        """Write the next images."""
        n = len(features)
        if self._count + n > self.num_images:
            raise ValueError(f"writing {self._count + n} images into files sized for {self.num_images}")
        if n == 0:
            return
        rows = slice(self._count, self._count + n)
        if self._globals is not None:
            for f in features:
                f.require("global_desc", method="DescriptorWriter")
                if f.global_desc.shape != (self.global_dim,):
                    raise ValueError(f"global descriptor of dimension {f.global_desc.shape[0]}, expected {self.global_dim}")
            self._globals[rows] = np.stack([f.global_desc for f in features])
        if self._features is not None:
            columns = [c for c in ("xy", "scale", "weight") if all(getattr(f, c) is not None for f in features)]
            padded = stack_locals(features, self.topk, columns, method="DescriptorWriter")
            if padded["local"].shape[2] != self.local_dim:
                raise ValueError(f"local descriptors of dimension {padded['local'].shape[2]}, expected {self.local_dim}")
            meta = np.zeros((n, self.topk, META), np.float32)
            if "xy" in padded:
                meta[..., :2] = padded["xy"]
            if "scale" in padded:
                meta[..., 2] = padded["scale"]
            meta[..., 3] = ~padded["mask"]
            if "weight" in padded:
                meta[..., 4] = padded["weight"]
            if self.layout == "flat":
                self._features[rows] = np.concatenate([meta, padded["local"]], -1)
            else:
                block = np.zeros(n, self._features.dtype)
                block["metadata"], block["descriptor"] = meta, padded["local"]
                self._features[rows] = block
        self._count += n

    def close(self) -> tuple[Path, Path]:
        """Finish: check every image was written, then move the files to their final names."""
        if self._count != self.num_images:
            self._discard()
            raise ValueError(f"{self._count} images written, {self.num_images} announced; files discarded")
        if self._h5 is not None:
            tmp = Path(self._h5.filename)
            self._h5.close()
            os.replace(tmp, self.local_path)
        if self._globals is not None:
            self._globals.flush()
            tmp = Path(self._globals.filename)
            del self._globals
            os.replace(tmp, self.global_path)
        self._h5 = self._globals = None
        return self.local_path, self.global_path

    def _discard(self) -> None:
        if self._h5 is not None:
            tmp = Path(self._h5.filename)
            self._h5.close()
            tmp.unlink(missing_ok=True)
        if self._globals is not None:
            tmp = Path(self._globals.filename)
            del self._globals
            tmp.unlink(missing_ok=True)
        self._h5 = self._globals = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        else:
            self._discard()


def write_descriptors(directory, desc: str, split: Optional[str], features: Sequence[ImageFeatures],
                      topk: Optional[int] = None, layout: str = "flat") -> tuple[Path, Path]:
    """Write all ``features`` of one split at once (see :class:`DescriptorWriter`).

    Local and global files are written for whichever the features carry; ``topk`` defaults to the
    largest number of valid locals."""
    if not features:
        raise ValueError("no features to write")
    first = features[0]
    local_dim = first.local.shape[1] if first.local is not None else None
    global_dim = first.global_desc.shape[0] if first.global_desc is not None else None
    if topk is None:
        topk = max((f.num_locals for f in features), default=0) if local_dim is not None else 1
    with DescriptorWriter(directory, desc, split, len(features), max(int(topk), 1), local_dim, global_dim, layout) as w:
        w.append(features)
    return w.local_path, w.global_path
