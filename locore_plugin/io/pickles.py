"""Reading the official ``.pkl`` files (``gnd_*.pkl``, ``nn_*.pkl``) without trusting them.

``pickle.load`` runs whatever callable a file names. These files only ever hold plain containers,
numbers, strings, numpy arrays and, for the official ``nn_*.pkl`` of ROxford/RParis, a torch
tensor written by ``pickle.dump(torch.from_numpy(...))``. The unpickler below resolves only the
globals those need and refuses any other global by name, before anything is called. A torch
tensor's storage is an embedded ``torch.save`` blob; it is read with ``torch.load(weights_only=True)``
and returned as a numpy array.
"""
from __future__ import annotations

import _compat_pickle
import io
import pickle
from pathlib import Path

import numpy as np

OFFICIAL_DATA = (
    "the revisited Oxford/Paris ground truth (gnd_*.pkl) is published at http://cmp.felk.cvut.cz/revisitop/ ; "
    "AMES/LoCoRE descriptors and nn_*.pkl at http://ptak.felk.cvut.cz/personal/sumapave/public/ames/data/"
)


def _latin1_encode(text, encoding="latin1"):
    """``_codecs.encode`` as protocol-2 pickles use it for bytes; any codec but latin-1 is refused."""
    if encoding.lower().replace("_", "-") not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _torch_storage_from_bytes(blob: bytes):
    import torch

    return torch.load(io.BytesIO(blob), weights_only=True)


def _torch_rebuild_tensor(storage, offset, size, stride, *_):
    import torch

    if not isinstance(storage, torch.storage.TypedStorage):
        raise pickle.UnpicklingError(f"a tensor needs a storage, got {type(storage).__name__}")
    return torch._utils._rebuild_tensor(storage, offset, size, stride).numpy().copy()


def _allowed() -> dict[tuple[str, str], object]:
    allowed = {
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "complex"): complex,
        ("builtins", "bytearray"): bytearray,
        ("builtins", "slice"): slice,
        ("collections", "OrderedDict"): __import__("collections").OrderedDict,
        ("_codecs", "encode"): _latin1_encode,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("torch.storage", "_load_from_bytes"): _torch_storage_from_bytes,
        ("torch._utils", "_rebuild_tensor_v2"): _torch_rebuild_tensor,
    }
    core = np._core if hasattr(np, "_core") else np.core
    for package in ("numpy.core", "numpy._core"):  # numpy 1.x writes numpy.core, numpy 2.x numpy._core
        allowed[(f"{package}.multiarray", "_reconstruct")] = core.multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = core.multiarray.scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = core.numeric._frombuffer
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    _ALLOWED = None

    def find_class(self, module, name):
        if _RestrictedUnpickler._ALLOWED is None:
            _RestrictedUnpickler._ALLOWED = _allowed()
        # Python 2 names (__builtin__.set, ...) as protocol-2 files carry them, mapped like pickle's own find_class
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        try:
            return _RestrictedUnpickler._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global '{module}.{name}': only plain containers, numbers, strings, "
                "numpy arrays and torch tensors are allowed in these files"
            ) from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError(f"refusing persistent id {pid!r}")


def read_pickle(path):
    """Load a ``.pkl`` file with the restricted unpickler (torch tensors come back as numpy arrays)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; {OFFICIAL_DATA}")
    with open(path, "rb") as handle:
        try:
            return _RestrictedUnpickler(handle).load()
        except pickle.UnpicklingError as error:
            raise pickle.UnpicklingError(f"{path}: {error}") from None
        except (TypeError, ValueError, EOFError, AttributeError, IndexError, KeyError) as error:
            # a crafted or truncated file fails inside an allowed constructor: still a refusal that names the file
            raise pickle.UnpicklingError(f"{path}: not a valid pickle of the allowed kinds ({type(error).__name__}: {error})") from None
