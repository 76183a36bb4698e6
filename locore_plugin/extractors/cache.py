"""The feature cache: features by (image content, bbox), the most recent in memory and all of them
on disk when asked, so repeated queries are not extracted again."""
from __future__ import annotations

import io
import os
import zipfile
from collections import OrderedDict
from dataclasses import fields
from pathlib import Path
from typing import Optional, Union

import numpy as np

from locore_plugin.features import ImageFeatures
from locore_plugin.io.atomic import atomic_write, set_aside


class FeatureCache:
    """Features by (image content, bbox): the ``size`` most recently used in memory, and in
    ``directory`` (one ``.npz`` per image) when it is given. ``dense_dtype="float16"`` keeps dense
    maps in half precision, in memory and on disk alike (a full-resolution CVNet map is about
    12 MB in float32), so a resumed run sees the features the first one used.

    ``disk_limit`` (bytes) bounds the directory: past it, the least recently used entries (by
    modification time, refreshed on every read) are deleted until it holds 90% of the limit, so
    a whole gallery's dense maps never fill the disk; a deleted entry is extracted again if asked."""

    def __init__(self, size: int = 1024, directory: Union[str, Path, None] = None, dense_dtype: Optional[str] = None,
                 disk_limit: Optional[int] = None):
        if size < 0:
            raise ValueError(f"cache_size must be >= 0, got {size}")
        if dense_dtype not in (None, "float16", "float32"):
            raise ValueError(f"dense_dtype must be None, 'float16' or 'float32', got {dense_dtype!r}")
        if disk_limit is not None and disk_limit <= 0:
            raise ValueError(f"the cache's disk limit must be > 0 bytes, got {disk_limit}")
        self.size = int(size)
        self.directory = None if directory is None else Path(directory)
        self.dense_dtype = dense_dtype
        self.disk_limit = disk_limit
        self._disk_used: Optional[int] = None  # bytes under directory, counted on the first write
        self._memory: OrderedDict[tuple, ImageFeatures] = OrderedDict()

    def stored(self, features: ImageFeatures) -> ImageFeatures:
        """The features as this cache keeps them (dense maps in ``dense_dtype``)."""
        if self.dense_dtype is None or features.dense is None or features.dense.dtype == np.dtype(self.dense_dtype):
            return features
        values = {f.name: getattr(features, f.name) for f in fields(features)}
        return ImageFeatures(**{**values, "dense": features.dense.astype(self.dense_dtype)})

    def get(self, identity: str, key: tuple) -> Optional[ImageFeatures]:
        if key in self._memory:
            self._memory.move_to_end(key)
            return self._memory[key]
        path = self._path(identity, key)
        if path is None or not path.is_file():
            return None
        try:
            with np.load(path) as stored:
                features = ImageFeatures(**{name: stored[name] for name in stored.files})
        except (OSError, ValueError, EOFError, KeyError, TypeError, zipfile.BadZipFile) as error:
            set_aside(path, error)
            return None
        if self.disk_limit is not None:
            os.utime(path)  # read = used: the least recently used entries are the ones evicted
        self._remember(key, features)
        return features

    def put(self, identity: str, key: tuple, features: ImageFeatures) -> None:
        self._remember(key, features)
        path = self._path(identity, key)
        if path is None:
            return
        arrays = {f.name: getattr(features, f.name) for f in fields(features) if getattr(features, f.name) is not None}
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        payload = buffer.getvalue()
        atomic_write(path, payload)  # a crash never leaves a truncated entry
        if self.disk_limit is not None:
            if self._disk_used is None:
                self._disk_used = sum(entry.stat().st_size for entry in self.directory.rglob("*.npz"))
            else:
                self._disk_used += len(payload)
            if self._disk_used > self.disk_limit:
                self._evict(keep=path)

    def _evict(self, keep: Path) -> None:
        """Delete the least recently used entries (never ``keep``) down to 90% of the limit."""
        entries = sorted(((e.stat().st_mtime_ns, e.stat().st_size, e) for e in self.directory.rglob("*.npz")),
                         key=lambda entry: entry[0])
        used = sum(size for _, size, _ in entries)
        for _, size, entry in entries:
            if used <= 0.9 * self.disk_limit:
                break
            if entry != keep:
                entry.unlink(missing_ok=True)
                used -= size
        self._disk_used = used

    def _remember(self, key, features) -> None:
        if self.size == 0:
            return
        self._memory[key] = features
        self._memory.move_to_end(key)
        while len(self._memory) > self.size:
            self._memory.popitem(last=False)

    def _path(self, identity: str, key: tuple) -> Optional[Path]:
        if self.directory is None:
            return None
        content, bbox = key
        suffix = "" if bbox is None else "_" + "_".join(str(v) for v in bbox)
        return self.directory / identity / f"{content}{suffix}.npz"
