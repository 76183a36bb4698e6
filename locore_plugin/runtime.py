"""Device and dtype options, spelled as in rerankers (``device="cuda"``, ``dtype="bf16"``)."""
from __future__ import annotations

from typing import Optional, Union

import torch

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp64": torch.float64, "float64": torch.float64,
}


def resolve_device(device: Union[str, torch.device, None], local_rank: Optional[int] = None) -> torch.device:
    """The one device rule of every method, the trainer and the benchmark: ``None``/"auto" means
    CUDA when available, else CPU; with ``local_rank`` (a torchrun worker) a CUDA device without an
    index is that rank's GPU."""
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and local_rank is not None:
        device = torch.device("cuda", local_rank)
    return device


def resolve_dtype(dtype: Union[str, torch.dtype, None]) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}") from None
