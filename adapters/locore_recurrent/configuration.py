"""The architecture of a recurrent LoCoRE model (supplementary B.2: LoCoRE-RWKV, LoCoRE-Mamba),
kept apart from the modeling code as ``transformers`` does. No official code or checkpoint exists:
the variants are sized next to ``locore-tiny`` (hidden 512, 4 layers; README's table gives the
parameter counts) and ``config.json`` is this project's own layout."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from transformers import MambaConfig, RwkvConfig

BLOCK_NAMES = {"rwkv": "RWKV", "mamba": "Mamba"}  # block_type -> how the paper names the variant
BLOCK_TYPES = tuple(BLOCK_NAMES)

# hidden 512 and 4 recurrent layers as locore-tiny's 4 Longformer layers; a query cross-attention
# block before every second recurrent layer (before layers 1 and 3).
CONFIGS = {
    "locore-rwkv": dict(block_type="rwkv", hidden_size=512, num_layers=4, cross_attention_every=2, num_attention_heads=8,
                        intermediate_size=2048),
    "locore-mamba": dict(block_type="mamba", hidden_size=512, num_layers=4, cross_attention_every=2, num_attention_heads=8,
                         intermediate_size=2048),
}


@dataclass(frozen=True)
class RecurrentConfig:
    """A bi-directional recurrent encoder over the LoCoRE sequence with query cross-attention blocks.

    ``intermediate_size`` is the width of the feed-forward parts: RWKV's channel mixing and the
    cross-attention blocks' MLP (Mamba's blocks have none: their width is ``expand * hidden_size``).
    """

    block_type: str
    hidden_size: int
    num_layers: int
    cross_attention_every: int
    num_attention_heads: int
    intermediate_size: int
    local_dim: int = 768
    global_dim: int = 768
    use_global: bool = True
    num_scales: int = 3
    state_size: int = 16  # Mamba: SSM state per channel
    expand: int = 2  # Mamba: inner width / hidden
    conv_kernel: int = 4  # Mamba: causal convolution width
    layer_norm_eps: float = 1e-5
    hidden_dropout_prob: float = 0.1

    def __post_init__(self):
        if self.block_type not in BLOCK_TYPES:
            raise ValueError(f"unknown recurrent block_type {self.block_type!r}; use one of {BLOCK_TYPES}")
        if min(self.hidden_size, self.num_layers, self.cross_attention_every, self.num_attention_heads) < 1:
            raise ValueError("hidden_size, num_layers, cross_attention_every and num_attention_heads must be >= 1")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}")

    @classmethod
    def variant(cls, name: str, **overrides) -> "RecurrentConfig":
        if name not in CONFIGS:
            raise ValueError(f"unknown recurrent LoCoRE variant {name!r}; use one of {sorted(CONFIGS)}")
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown {name} config key(s) {sorted(unknown)}; known: {sorted(f.name for f in fields(cls))}")
        return cls(**{**CONFIGS[name], **overrides})

    def tokens_per_image(self, num_locals: int) -> int:
        return num_locals + 1 + int(self.use_global)

    @property
    def cross_attention_layers(self) -> int:
        """How many query cross-attention blocks the model has (one before every ``cross_attention_every`` recurrent layers)."""
        return -(-self.num_layers // self.cross_attention_every)

    def block_config(self):
        """The ``transformers`` config its recurrent blocks are built from (vocabulary of 1: no word embeddings are used)."""
        if self.block_type == "mamba":
            return MambaConfig(vocab_size=1, hidden_size=self.hidden_size, num_hidden_layers=self.num_layers,
                               state_size=self.state_size, expand=self.expand, conv_kernel=self.conv_kernel,
                               layer_norm_epsilon=self.layer_norm_eps, use_mambapy=True)
        # context_length only sizes the optional CUDA kernel; the recurrence itself has no limit.
        return RwkvConfig(vocab_size=1, hidden_size=self.hidden_size, num_hidden_layers=self.num_layers,
                          intermediate_size=self.intermediate_size, layer_norm_epsilon=self.layer_norm_eps,
                          context_length=1 << 16, rescale_every=0)

    def to_json(self) -> dict:
        return {"model_type": "locore-recurrent", **asdict(self)}

    @classmethod
    def from_json(cls, data: dict, source: str = "config.json") -> "RecurrentConfig":
        if data.get("model_type") != "locore-recurrent":
            raise ValueError(f"{source} is not a recurrent LoCoRE config (model_type {data.get('model_type')!r})")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
