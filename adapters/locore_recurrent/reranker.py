"""The recurrent LoCoRE re-ranker: LoCoRE's inputs, reductions, sliding window, fusion and token
loss (:mod:`locore_plugin.listwise`) around a recurrent network, which has no context limit and
so can also score a whole shortlist in one pass (``window="all"``)."""
from __future__ import annotations

from dataclasses import replace
from typing import Optional, Union

import torch

from locore_plugin.io.checkpoints import count_blocks, load_strict, read_checkpoint, save_pretrained_folder
from locore_plugin.listwise import ListwiseSequenceReranker

from .configuration import BLOCK_NAMES, RecurrentConfig
from .modeling import LocoreRecurrentModel

ONE_PASS = "all"  # window= value: the whole top-k in one sequence


class RecurrentLocoreReranker(ListwiseSequenceReranker):
    """LoCoRE-RWKV / LoCoRE-Mamba re-ranking of the first ``top_k`` candidates.

    Options as :class:`~locore_plugin.adapters.locore.LocoreReranker` (``query_length`` locals
    per image, ``window`` / ``stride``, ``top_k``, ``order``, ``fusion``, ``reduction``,
    ``config`` overrides of :class:`RecurrentConfig`), plus ``window="all"``: the first ``top_k``
    in one sequence, which a recurrent model can afford (cost linear in its length). No official
    weights exist: ``checkpoint`` is a ``save_pretrained`` folder (or its ``model.safetensors``
    with the ``config.json`` beside it); ``pretrained=False`` builds random weights.
    """

    def __init__(self, variant: str, checkpoint=None, pretrained: bool = True, device=None, dtype="fp32",
                 batch_size: int = 4, verbose: int = 0, query_length: int = 48, window: Union[int, str] = 100,
                 stride: int = 50, top_k: int = 400, order: str = "end-to-start", fusion="default",
                 reduction: str = "max-end", use_global: Optional[bool] = None, config: Optional[dict] = None,
                 gallery_length: Optional[int] = None):
        if not pretrained and checkpoint is not None:
            raise ValueError("pretrained=False builds random weights; do not also pass a checkpoint")
        if pretrained and checkpoint is None:
            raise ValueError(f"{variant} has no published weights: pass checkpoint= (a folder saved by training) "
                             "or pretrained=False for a randomly initialised model")
        if gallery_length is not None and gallery_length != query_length:
            raise ValueError(f"every image has the same slot in the sequence: gallery_length ({gallery_length}) "
                             f"must equal query_length ({query_length})")
        if window == ONE_PASS:
            window = int(top_k)
        elif isinstance(window, str):
            raise ValueError(f"window must be a number of images or {ONE_PASS!r}, got {window!r}")
        self.configure(device=device, dtype=dtype, batch_size=batch_size, verbose=verbose, length=int(query_length),
                       window=int(window), stride=int(stride), top_k=int(top_k), order=order, fusion=fusion,
                       reduction=reduction)
        self.variant = variant
        overrides = dict(config or {})
        if use_global is not None:
            overrides["use_global"] = bool(use_global)
        state = None
        if checkpoint is not None:
            read_back = read_checkpoint(checkpoint, config_beside=True)
            read_back.check_name(variant)
            state = read_back.state
            saved = (RecurrentConfig.from_json(read_back.config, read_back.source) if read_back.config is not None
                     else _config_from_state(variant, state))
            self.config = replace(saved, **overrides)
        else:
            self.config = RecurrentConfig.variant(variant, **overrides)
        self.method_label = f"LoCoRE-{BLOCK_NAMES[self.config.block_type]}"
        self.module = LocoreRecurrentModel(self.config)
        if state is not None:
            load_strict(self.module, state, f"{variant} checkpoint {checkpoint}")
        self.module.to(self.device, self.dtype).eval()

    def save_pretrained(self, directory) -> None:
        """``model.safetensors`` (float32) and ``config.json`` (:meth:`RecurrentConfig.to_json`)."""
        save_pretrained_folder(directory, self.module, self.variant, self.config.to_json(), dtype=torch.float32)


def _config_from_state(variant: str, state: dict[str, torch.Tensor]) -> RecurrentConfig:
    """A weights file without its config.json: the variant's architecture with the sizes its tensors imply."""
    sizes = {"num_layers": count_blocks(state, "layers."), "use_global": "global_to_hidden.weight" in state}
    if "local_to_hidden.weight" in state:
        sizes["hidden_size"], sizes["local_dim"] = (int(n) for n in state["local_to_hidden.weight"].shape)
    if sizes["use_global"]:
        sizes["global_dim"] = int(state["global_to_hidden.weight"].shape[1])
    if "scale_encoder.weight" in state:
        sizes["num_scales"] = int(state["scale_encoder.weight"].shape[0])
    return RecurrentConfig.variant(variant, **sizes)
