"""Reading the official checkpoints as they are, and loading them strictly."""
from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Union

import numpy as np
import torch

from locore_plugin.options import LocoreDeprecationWarning

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
    ``{'model_state_dict': ...}`` (R2Former), ``{'model_state': ...}`` (CVNet) and
    ``{'state_dict': ...}`` / ``{'model': ...}`` containers. A key prefix in ``strip_prefixes``
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
        for container in ("state", "model_state_dict", "model_state", "state_dict", "model"):
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


SAVED_NAME = "reranker"  # the key of config.json that names the registry entry a folder was saved from
# What locore-plugin 0.1 wrote instead: {"method": name, "model": config} (pair-wise) and the LoCoRE
# config with a "variant" key. Read for one release, with a LocoreDeprecationWarning.


def save_pretrained_folder(directory: PathLike, module: torch.nn.Module, reranker: str, config: dict,
                           dtype: Optional[torch.dtype] = None) -> None:
    """What every ``save_pretrained`` writes: the state dict under its official key names as
    ``model.safetensors`` (cast to ``dtype`` when given), beside ``config.json``: the method's
    architecture config with ``"reranker"``, the registry name to load it under."""
    from safetensors.torch import save_file

    if SAVED_NAME in config:
        raise ValueError(f"an architecture config may not use the key {SAVED_NAME!r}; it names the registry entry")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", dtype if dtype is not None and v.is_floating_point() else v.dtype).contiguous()
             for k, v in module.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    (directory / CONFIG_FILE).write_text(json.dumps({SAVED_NAME: reranker, **config}, indent=1))


@dataclass
class Checkpoint:
    """What a checkpoint holds: tensors under their own names, the saved architecture config
    (None for a bare official file) and the registry name it was saved under (when saved here)."""

    state: dict[str, torch.Tensor]
    config: Optional[dict]
    reranker: Optional[str]
    source: str

    def check_name(self, name: str) -> None:
        """A folder saved under another registry name loads (its config wins), with a warning:
        the named entry's non-architecture defaults (fusion constants, say) are not the saved one's."""
        if self.reranker is not None and self.reranker != name:
            warnings.warn(f"{self.source} was saved from {self.reranker!r} and is loaded as {name!r}", stacklevel=3)


def read_checkpoint(checkpoint: PathLike, strip_prefixes: Iterable[str] = (), config_beside: bool = False) -> Checkpoint:
    """The one checkpoint reader. ``checkpoint``: a ``save_pretrained`` folder
    (``model.safetensors`` + ``config.json``; without the config, its tensors are read as a bare
    official file), an official weights file (``.safetensors``, or a ``.pt``/``.pth`` container, see
    :func:`read_state_dict`), or, when no such path exists, a Hugging Face hub id (fetched only where
    the hub is reachable). ``config_beside``: a weights file takes the ``config.json`` in its folder
    as its config (the layout LoCoRE's official releases use)."""
    path = _local_path(checkpoint)
    if path.is_dir():  # its config.json may be missing: a bare official release
        if not (path / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(f"{path} holds no {WEIGHTS_FILE} (pass a weights file itself, or a save_pretrained folder)")
        config_file, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
    else:
        config_file, weights = (path.parent / CONFIG_FILE if config_beside else None), path
    state = read_state_dict(weights, strip_prefixes)
    if config_file is None or not config_file.is_file():
        return Checkpoint(state, None, None, str(path))
    config, name = _saved_config(json.loads(config_file.read_text()), config_file)
    return Checkpoint(state, config, name, str(path))


def _saved_config(saved: dict, source: Path) -> tuple[dict, Optional[str]]:
    """(architecture config, registry name) of a config.json, in today's schema or 0.1's."""
    saved = dict(saved)
    if SAVED_NAME in saved:
        return saved, saved.pop(SAVED_NAME)
    legacy = "method" if {"method", "model"} <= set(saved) else "variant" if "variant" in saved else None
    if legacy is None:
        return saved, None  # an official config.json (e.g. a LoCoRE release): no registry name
    warnings.warn(f"{source} is in the locore-plugin 0.1 layout ({legacy!r}); save it again to write the current one",
                  LocoreDeprecationWarning, stacklevel=4)
    name = saved.pop(legacy)
    return (saved["model"] if legacy == "method" else saved), name


def _local_path(checkpoint: PathLike) -> Path:
    path = Path(checkpoint)
    if path.exists():
        return path
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", str(checkpoint)) is None:
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(checkpoint), allow_patterns=[WEIGHTS_FILE, CONFIG_FILE]))
    except Exception as error:  # offline, unknown repo, no huggingface_hub: all mean "not available here"
        raise FileNotFoundError(
            f"checkpoint {str(checkpoint)!r} is not a local path and could not be fetched from the Hugging Face hub "
            f"({type(error).__name__}: {error}). Download it elsewhere and pass its folder."
        ) from error
