"""Reading the official checkpoints as they are, and loading them strictly."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional, Union

import numpy as np
import torch

PathLike = Union[str, Path]
WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"  # what save_pretrained writes

_multiarray = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core
# Pickles name these under numpy.core (numpy 1) or numpy._core (numpy 2): allow both spellings.
_NUMPY_GLOBALS = [
    *((getattr(_multiarray.multiarray, f), f"numpy.{core}.multiarray.{f}") for f in ("_reconstruct", "scalar") for core in ("core", "_core")),
    np.ndarray,
    np.dtype,
    *(type(np.dtype(t)) for t in ("float16", "float32", "float64", "int32", "int64", "bool")),
]


def read_state_dict(path: PathLike, strip_prefixes: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file with their own key names.

    ``.safetensors`` files are read with safetensors; anything else with
    ``torch.load(weights_only=True)`` (numpy arrays and scalars allowed, as training scripts store
    metrics beside the weights), unwrapping the official ``{'state': ...}`` (AMES, RRT),
    ``{'model_state_dict': ...}`` (R2Former) and ``{'state_dict': ...}`` / ``{'model': ...}`` containers. A key prefix in ``strip_prefixes``
    (e.g. R2Former's ``Reranker.``) is removed where every key carries it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except SafetensorError as error:
            raise ValueError(f"{path} is not a readable safetensors file ({error})") from None
    else:
        with torch.serialization.safe_globals(_NUMPY_GLOBALS):
            state = torch.load(path, map_location="cpu", weights_only=True)
        for container in ("state", "model_state_dict", "state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(container), dict):
                state = state[container]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    for prefix in strip_prefixes:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


class StateDictMismatchError(RuntimeError):
    """The checkpoint's keys or shapes do not fit the model."""


def load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load ``state`` into ``module``; any missing, unexpected or mis-shaped key is an error that names them."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mis_shaped = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(state)
        if state[k].shape != expected[k].shape
    )
    if missing or unexpected or mis_shaped:
        parts = [f"{source} does not fit {type(module).__name__}:"]
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mis_shaped)):
            if keys:
                parts.append(f"  {label} ({len(keys)}): {', '.join(keys)}")
        raise StateDictMismatchError("\n".join(parts))
    module.load_state_dict(state, strict=True)


def count_blocks(state: dict[str, torch.Tensor], prefix: str) -> int:
    """How many numbered blocks ``{prefix}{i}.`` the state dict holds (``prefix`` ends with a dot):
    the depth of a stack of layers, read from the key indices."""
    heads = (k[len(prefix):].split(".", 1)[0] for k in state if k.startswith(prefix))
    indices = {int(h) for h in heads if h.isdigit()}
    if indices and indices != set(range(len(indices))):
        raise StateDictMismatchError(f"the blocks {prefix}* of the checkpoint are not numbered 0..n-1: {sorted(indices)}")
    return len(indices)


def save_directory(directory: PathLike, module: torch.nn.Module, config: dict, dtype: Optional[torch.dtype] = None) -> None:
    """What ``save_pretrained`` writes: the state dict under its official key names as safetensors
    (cast to ``dtype`` when given), beside ``config.json`` (the method's architecture config)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", dtype if dtype is not None and v.is_floating_point() else v.dtype).contiguous()
             for k, v in module.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=1))


def read_checkpoint(checkpoint: PathLike) -> tuple[Optional[dict], dict[str, torch.Tensor]]:
    """(config, state dict) of an official checkpoint file (config None) or a ``save_pretrained`` folder."""
    path = Path(checkpoint)
    if path.is_dir():
        if not (path / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{path} is a folder without {CONFIG_FILE}; pass the weights file itself")
        return json.loads((path / CONFIG_FILE).read_text()), read_state_dict(path / WEIGHTS_FILE)
    return None, read_state_dict(path)
