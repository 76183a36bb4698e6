"""The features of one image, in the columns the official descriptor files carry."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

_PER_LOCAL = {"xy": (2,), "scale": (), "weight": ()}


@dataclass(frozen=True, eq=False)
class ImageFeatures:
    """Descriptors of one image.

    ``global_desc`` (D,), ``local`` (L, D), ``mask`` (L,) bool with True = valid descriptor (the
    official files store the opposite, 1 = padding; readers convert once, at the file boundary),
    and the optional per-local columns ``xy`` (L, 2), ``scale`` (L,), ``weight`` (L,) (detector
    weight). Arrays are stored as float32 numpy arrays; NaN/Inf in a valid row is an error.
    """

    global_desc: Optional[np.ndarray] = None
    local: Optional[np.ndarray] = None
    mask: Optional[np.ndarray] = None
    xy: Optional[np.ndarray] = None
    scale: Optional[np.ndarray] = None
    weight: Optional[np.ndarray] = None
    dense: Optional[np.ndarray] = None

    def __post_init__(self):
        if self.global_desc is None and self.local is None and self.dense is None:
            raise ValueError("ImageFeatures needs a global descriptor, local descriptors or a dense map")
        if self.dense is not None:
            dense = np.asarray(self.dense)
            dense = np.ascontiguousarray(dense) if dense.dtype == np.float16 else _as_float32(dense, "dense")
            if dense.ndim != 3 or 0 in dense.shape:
                raise ValueError(f"dense must have shape (C, h, w), got {dense.shape}")
            if not np.isfinite(dense).all():
                raise ValueError("dense contains NaN or Inf")
            object.__setattr__(self, "dense", dense)
        if self.global_desc is not None:
            g = _as_float32(self.global_desc, "global_desc")
            if g.ndim != 1:
                raise ValueError(f"global_desc must have shape (D,), got {g.shape}")
            if not np.isfinite(g).all():
                raise ValueError("global_desc contains NaN or Inf")
            object.__setattr__(self, "global_desc", g)
        if self.local is None:
            for name in ("mask", *_PER_LOCAL):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} given without local descriptors")
            return
        local = _as_float32(self.local, "local")
        if local.ndim != 2:
            raise ValueError(f"local must have shape (L, D), got {local.shape}")
        n = local.shape[0]
        mask = np.ones(n, bool) if self.mask is None else np.asarray(self.mask)
        if mask.shape != (n,):
            raise ValueError(f"mask must have shape ({n},), got {mask.shape}")
        if mask.dtype != bool:
            raise ValueError(f"mask must be boolean (True = valid descriptor), got dtype {mask.dtype}")
        object.__setattr__(self, "local", local)
        object.__setattr__(self, "mask", mask)
        if not np.isfinite(local[mask]).all():
            raise ValueError("local descriptors contain NaN or Inf in valid rows")
        for name, tail in _PER_LOCAL.items():
            value = getattr(self, name)
            if value is None:
                continue
            value = _as_float32(value, name)
            if value.shape != (n, *tail):
                raise ValueError(f"{name} must have shape {(n, *tail)}, got {value.shape}")
            if not np.isfinite(value[mask]).all():
                raise ValueError(f"{name} contains NaN or Inf in valid rows")
            object.__setattr__(self, name, value)

    @property
    def num_locals(self) -> int:
        """Number of valid local descriptors."""
        return 0 if self.local is None else int(self.mask.sum())

    def require(self, *columns: str, method: str) -> None:
        """Raise a ValueError naming the columns ``method`` needs that these features lack."""
        missing = [c for c in columns if getattr(self, c) is None]
        if missing:
            raise ValueError(f"{method} needs the column(s) {missing}, which these features lack")


def _as_float32(value, name: str) -> np.ndarray:
    array = np.asarray(value)
    if not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"{name} must be numeric, got dtype {array.dtype}")
    return np.ascontiguousarray(array, dtype=np.float32)


def stack_globals(features: Sequence[ImageFeatures], method: str = "this method") -> np.ndarray:
    """Global descriptors of several images as one (N, D) float32 array."""
    for f in features:
        f.require("global_desc", method=method)
    dims = {f.global_desc.shape[0] for f in features}
    if len(dims) > 1:
        raise ValueError(f"global descriptors have different dimensions: {sorted(dims)}")
    return np.stack([f.global_desc for f in features])


def stack_locals(
    features: Sequence[ImageFeatures], length: int, columns: Sequence[str] = (), method: str = "this method"
) -> dict[str, np.ndarray]:
    """Pad the valid local descriptors of several images to ``length`` rows.

    Returns ``local`` (N, length, D), ``mask`` (N, length) bool (True = valid) and each requested
    per-local column. An image with more than ``length`` valid locals keeps the ``length`` with the
    largest detector weight when it has one (the official files are sorted that way, so this is
    their first rows), else its first ``length``; either way in their original order.
    """
    for f in features:
        f.require("local", *columns, method=method)
    dims = {f.local.shape[1] for f in features}
    if len(dims) > 1:
        raise ValueError(f"local descriptors have different dimensions: {sorted(dims)}")
    dim = dims.pop()
    out = {"local": np.zeros((len(features), length, dim), np.float32), "mask": np.zeros((len(features), length), bool)}
    for name in columns:
        out[name] = np.zeros((len(features), length, *_PER_LOCAL[name]), np.float32)
    for i, f in enumerate(features):
        keep = np.flatnonzero(f.mask)
        if len(keep) > length:
            if f.weight is not None:
                keep = np.sort(keep[np.argsort(-f.weight[keep], kind="stable")[:length]])
            else:
                keep = keep[:length]
        n = len(keep)
        out["local"][i, :n] = f.local[keep]
        out["mask"][i, :n] = True
        for name in columns:
            out[name][i, :n] = getattr(f, name)[keep]
    return out

