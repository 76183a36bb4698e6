"""The blocked Longformer self-attention against ``transformers``' ``LongformerSelfAttention`` (the reference)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LongformerConfig, LongformerModel
from transformers.models.longformer.modeling_longformer import LongformerSelfAttention

from locore_plugin import create_reranker
from locore_plugin.adapters.locore.attention import BlockedLongformerSelfAttention, blocked_attention, reference_attention

NEG, POS = torch.finfo(torch.float32).min, torch.finfo(torch.float32).max


def reference_module(hidden=32, heads=4, window=8, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    config = LongformerConfig(hidden_size=hidden, num_attention_heads=heads, attention_window=[window],
                              num_hidden_layers=1, attention_probs_dropout_prob=0.0)
    module = LongformerSelfAttention(config, 0).to(dtype).eval()
    for linear in (module.query, module.key, module.value, module.query_global, module.key_global, module.value_global):
        torch.nn.init.normal_(linear.weight, std=0.3)  # sharp attention, so that a wrong key shows
        torch.nn.init.normal_(linear.bias, std=0.1)
    return module


def layer_inputs(batch, length, hidden, masked, globals_, seed=1):
    """Hidden states and the encoder's mask (NEG masked / 0 local / POS global), given per-row index lists."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, hidden, generator=generator)
    mask = torch.zeros(batch, length)
    for row in range(batch):
        mask[row, masked[row]] = NEG
        mask[row, globals_[row]] = POS
    return x, dict(attention_mask=mask, is_index_masked=mask < 0, is_index_global_attn=mask > 0,
                   is_global_attn=bool((mask > 0).any()))


def both(reference, x, kwargs, block_size=None):
    blocked = BlockedLongformerSelfAttention(reference, block_size)
    with torch.no_grad():
        return reference(x, **kwargs)[0], blocked(x, **kwargs)[0]


@pytest.mark.parametrize("length,window,block", [(8, 8, None), (16, 4, None), (48, 8, 5), (64, 16, 3), (96, 32, None)])
def test_same_output_as_reference(length, window, block):
    """Several lengths and windows; block sizes that do not divide the length pad the last block."""
    reference = reference_module(window=window)
    g = torch.Generator().manual_seed(length)
    masked = [torch.randperm(length, generator=g)[: 1 + length // 8] for _ in range(3)]
    globals_ = [torch.arange(3), torch.tensor([length // 2, length - 1]), torch.tensor([], dtype=torch.long)]
    globals_ = [gl[~torch.isin(gl, m)] for gl, m in zip(globals_, masked)]
    x, kwargs = layer_inputs(3, length, 32, masked, globals_)
    expected, actual = both(reference, x, kwargs, block)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    assert (actual[kwargs["is_index_masked"]] == 0).all()


def test_without_any_global_token():
    reference = reference_module(window=8)
    x, kwargs = layer_inputs(2, 32, 32, [torch.tensor([30, 31]), torch.tensor([0])], [torch.tensor([], dtype=torch.long)] * 2)
    assert not kwargs["is_global_attn"]
    expected, actual = both(reference, x, kwargs)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def model_pair(window, seed=0):
    torch.manual_seed(seed)
    config = LongformerConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2,
                              attention_window=[window, 2 * window], vocab_size=20, max_position_embeddings=300,
                              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = LongformerModel(config, add_pooling_layer=False).eval()
    for name, p in model.named_parameters():
        if "attention.self" in name and name.endswith("weight"):
            torch.nn.init.normal_(p, std=0.3)
    return model


@pytest.mark.parametrize("length", [37, 64, 101, 250])
def test_longformer_model_pads_non_multiples_identically(length):
    """Through ``LongformerModel`` (which pads to a multiple of the largest window): lengths that are not
    multiples, padded input tokens (attention_mask 0) and global tokens, two layers with different windows."""
    model = model_pair(window=16)
    g = torch.Generator().manual_seed(length)
    ids = torch.randint(3, 20, (2, length), generator=g)
    attention = torch.ones(2, length, dtype=torch.long)
    attention[0, -5:] = 0
    attention[1, torch.randperm(length, generator=g)[:7]] = 0
    global_mask = torch.zeros(2, length, dtype=torch.long)
    global_mask[0, :4] = 1
    global_mask[1, length // 3] = 1
    kwargs = dict(input_ids=ids, attention_mask=attention, global_attention_mask=global_mask)
    with torch.no_grad():
        expected = model(**kwargs).last_hidden_state
        for layer in model.encoder.layer:
            layer.attention.self = blocked_attention(layer.attention.self)
        actual = model(**kwargs).last_hidden_state
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)


def test_gradients_match_reference():
    """Training uses the same path: the projections receive the same gradients."""
    reference = reference_module(window=8)
    x, kwargs = layer_inputs(2, 32, 32, [torch.tensor([5, 31]), torch.tensor([], dtype=torch.long)], [torch.tensor([0, 9]), torch.tensor([20])])
    blocked = BlockedLongformerSelfAttention(reference).train()
    reference.train()  # dropout probability is 0: training mode changes nothing else
    grads = []
    for module in (reference, blocked):
        module.zero_grad()
        (module(x, **kwargs)[0] ** 2).sum().backward()
        grads.append({n: p.grad.clone() for n, p in module.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-4, rtol=1e-4, msg=name)


def test_shares_the_projections_and_switches_back():
    reference = reference_module()
    blocked = blocked_attention(reference)
    assert blocked.query is reference.query and blocked.value_global is reference.value_global
    assert blocked.state_dict().keys() == reference.state_dict().keys()
    assert blocked_attention(blocked) is blocked
    back = reference_attention(blocked)
    assert type(back) is LongformerSelfAttention and back.key_global is reference.key_global
    assert reference_attention(reference) is reference


def test_float64_and_attention_maps_run_the_reference_code():
    """float64 (the reference rounds its probabilities to float32) and output_attentions delegate exactly."""
    reference = reference_module(dtype=torch.float64)
    x, kwargs = layer_inputs(1, 16, 32, [torch.tensor([3])], [torch.tensor([0])])
    x = x.double()
    kwargs["attention_mask"] = kwargs["attention_mask"].double()
    expected, actual = both(reference, x, kwargs)
    assert torch.equal(actual, expected)
    reference = reference.float()
    with torch.no_grad():
        maps = BlockedLongformerSelfAttention(reference)(x.float(), **{**kwargs, "attention_mask": kwargs["attention_mask"].float()},
                                                        output_attentions=True)
    assert len(maps) == 3  # output, local probabilities, global probabilities


def test_bad_block_size():
    with pytest.raises(ValueError, match="block_size"):
        BlockedLongformerSelfAttention(reference_module(), block_size=-1)


# ---- the LoCoRE sequence at its full length -----------------------------------------------------------


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def locore_layout(window, num_gallery=100, num_locals=48, hidden=16, seed=0):
    """One LoCoRE sequence: [global][48 locals][SEP] per image, query first, padded descriptors, query block and
    SEPs global, window padding (5,050 -> 5,120 tokens at the full length)."""
    g = torch.Generator().manual_seed(seed)
    per_image = num_locals + 2
    length = (1 + num_gallery) * per_image
    padded = -(-length // window) * window
    valid = torch.ones(1 + num_gallery, per_image, dtype=torch.bool)
    valid[:, 1:-1] = torch.rand(1 + num_gallery, num_locals, generator=g) > 0.25
    is_global = torch.zeros(1 + num_gallery, per_image, dtype=torch.bool)
    is_global[:, -1] = True
    is_global[0] = True
    mask = torch.zeros(1, padded)
    mask[0, :length] = torch.where(valid.flatten(), torch.where(is_global.flatten() & valid.flatten(), POS, 0.0), NEG)
    mask[0, length:] = NEG
    x = torch.randn(1, padded, hidden, generator=g)
    return x, dict(attention_mask=mask, is_index_masked=mask < 0, is_index_global_attn=mask > 0, is_global_attn=True)


@pytest.mark.parametrize("window", [512, 1024])  # locore-base/small and locore-tiny
def test_full_locore_length_matches_and_never_builds_a_dense_matrix(window):
    reference = reference_module(hidden=16, heads=2, window=window)
    x, kwargs = locore_layout(window)
    assert x.shape[1] == 5120
    blocked = BlockedLongformerSelfAttention(reference)
    with torch.no_grad():
        expected = reference(x, **kwargs)[0]
        with _LargestTensor() as probe:
            actual = blocked(x, **kwargs)[0]
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)
    # The largest intermediate is the per-block additive mask: every query row holds its block's keys,
    # (block + 2w) window slots and the G global tokens; a dense matrix would hold 5,120 per row.
    keys_per_row = blocked.block_size + window + int(kwargs["is_index_global_attn"].sum())
    assert probe.largest <= 5120 * keys_per_row < 5120 * 5120 / 3


def test_memory_grows_linearly_with_length():
    """With a fixed set of global tokens, doubling the sequence at most doubles the largest intermediate."""
    reference = reference_module(hidden=16, heads=2, window=64)
    blocked = BlockedLongformerSelfAttention(reference)
    largest = []
    for length in (1024, 2048):
        x, kwargs = layer_inputs(1, length, 16, [torch.arange(length - 20, length)], [torch.arange(10)])
        with torch.no_grad(), _LargestTensor() as probe:
            blocked(x, **kwargs)
        largest.append(probe.largest)
    assert largest[1] <= 2 * largest[0]


# ---- golden: the official LoCoRE model ---------------------------------------------------------------


@pytest.mark.golden("locore")
def test_golden_locore_logits_with_both_implementations(golden_case):
    inputs, ref = np.load(golden_case / "inputs.npz"), np.load(golden_case / "outputs.npz")
    _, num_gallery, num_locals = inputs["gallery_local_mask"].shape
    t = lambda k: torch.from_numpy(inputs[k])
    kwargs = dict(query_local=t("query_local_features"), query_scale=t("query_local_scales"),
                  query_mask=t("query_local_mask") == 0, gallery_local=t("gallery_local_features"),
                  gallery_scale=t("gallery_local_scales"), gallery_mask=t("gallery_local_mask") == 0,
                  query_global=t("query_global_features")[:, 0], gallery_global=t("gallery_global_features")[:, :, 0])
    logits = {}
    for name in ("blocked", "transformers"):
        reranker = create_reranker("locore-base", checkpoint=golden_case / "weights.safetensors", device="cpu",
                                   query_length=num_locals, window=num_gallery, attn_implementation=name)
        with torch.inference_mode():
            logits[name] = reranker.module(**kwargs).numpy()
        np.testing.assert_allclose(logits[name], ref["token_logits_f32"], atol=1e-4, rtol=0)
    assert np.abs(logits["blocked"] - logits["transformers"]).max() <= 1e-4
