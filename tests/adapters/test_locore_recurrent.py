"""LoCoRE-RWKV and LoCoRE-Mamba: no official code exists, so the tests check the properties the
design promises (padding never changes a valid token, both directions reach every image, the
stock ``transformers`` blocks are used as they are), checkpoints, training and the one-pass path."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import MambaModel, RwkvModel

from locore_plugin import ImageFeatures, create_reranker, list_rerankers
from locore_plugin.adapters.locore_recurrent import (
    BLOCK_TYPES,
    CONFIGS,
    LocoreRecurrentModel,
    RecurrentConfig,
    parameter_count,
)

NAMES = sorted(CONFIGS)
LOCAL_DIM, GLOBAL_DIM, LOCALS = 12, 10, 5
SMALL = dict(hidden_size=16, num_layers=2, cross_attention_every=1, num_attention_heads=2, intermediate_size=24,
             local_dim=LOCAL_DIM, global_dim=GLOBAL_DIM, state_size=4, hidden_dropout_prob=0.0)


def small_model(name, seed=0, **overrides) -> LocoreRecurrentModel:
    torch.manual_seed(seed)
    return LocoreRecurrentModel(RecurrentConfig.variant(name, **{**SMALL, **overrides})).eval()


def small_reranker(name, **options):
    defaults = dict(pretrained=False, device="cpu", query_length=LOCALS, window=4, stride=2, top_k=9, config=SMALL)
    torch.manual_seed(0)
    return create_reranker(name, **{**defaults, **options})


def random_inputs(seed, batch=2, gallery=4, locals_=LOCALS, valid_fraction=0.7):
    """Model kwargs with random padding; every image keeps its first local valid."""
    g = torch.Generator().manual_seed(seed)
    query_mask = torch.rand(batch, locals_, generator=g) < valid_fraction
    gallery_mask = torch.rand(batch, gallery, locals_, generator=g) < valid_fraction
    query_mask[:, 0] = gallery_mask[..., 0] = True
    return dict(
        query_local=torch.randn(batch, locals_, LOCAL_DIM, generator=g),
        query_scale=torch.randint(0, 3, (batch, locals_), generator=g), query_mask=query_mask,
        gallery_local=torch.randn(batch, gallery, locals_, LOCAL_DIM, generator=g),
        gallery_scale=torch.randint(0, 3, (batch, gallery, locals_), generator=g), gallery_mask=gallery_mask,
        query_global=torch.randn(batch, GLOBAL_DIM, generator=g), gallery_global=torch.randn(batch, gallery, GLOBAL_DIM, generator=g),
    )


def valid_token_outputs(model, kwargs) -> list[torch.Tensor]:
    """Each row's logits at its valid tokens, in sequence order."""
    with torch.no_grad():
        logits = model(**kwargs)
    batch, gallery = kwargs["gallery_mask"].shape[:2]
    ones = torch.ones(batch, 1 + gallery, 1, dtype=torch.bool)
    valid = torch.cat([ones, torch.cat([kwargs["query_mask"][:, None], kwargs["gallery_mask"]], 1), ones], 2)
    return [row[mask] for row, mask in zip(logits, valid.flatten(1))]


def random_images(rng, count, valid=LOCALS):
    return [ImageFeatures(global_desc=rng.normal(size=GLOBAL_DIM), local=rng.normal(size=(valid, LOCAL_DIM)),
                          scale=rng.integers(0, 3, valid)) for _ in range(count)]


def test_registered_with_the_listwise_metadata():
    entries = {e.name: e for e in list_rerankers()}
    for name in NAMES:
        assert entries[name].metadata.learned and entries[name].metadata.sliding_window
        assert set(entries[name].metadata.inputs) == {"global", "local"}
    assert {CONFIGS[n]["block_type"] for n in NAMES} == set(BLOCK_TYPES)


def test_variants_are_sized_next_to_locore_tiny():
    """README states these counts; both sit within 1.35x of locore-tiny's 19.2M parameters."""
    from locore_plugin.adapters.locore import parameter_count as transformer_count

    tiny = transformer_count("locore-tiny")
    counts = {name: parameter_count(name) for name in NAMES}
    assert counts == {"locore-mamba": 20_656_130, "locore-rwkv": 24_954_882}
    assert all(tiny / 1.35 < c < tiny * 1.35 for c in counts.values())


@pytest.mark.parametrize("name", NAMES)
def test_padding_never_changes_a_valid_token(name):
    """Three views of the same valid tokens: random values in the padded slots, extra padded slots
    (a longer length), and each row alone instead of in a batch with rows of other lengths."""
    model = small_model(name)
    kwargs = random_inputs(1)
    reference = valid_token_outputs(model, kwargs)

    scrambled = dict(kwargs)
    scrambled["query_local"] = torch.where(kwargs["query_mask"][..., None], kwargs["query_local"], 1e3)
    scrambled["gallery_local"] = torch.where(kwargs["gallery_mask"][..., None], kwargs["gallery_local"],
                                             torch.randn_like(kwargs["gallery_local"]) * 50)
    longer = dict(kwargs)  # 3 more padded slots per image
    for side in ("query", "gallery"):
        longer[f"{side}_local"] = torch.nn.functional.pad(kwargs[f"{side}_local"], (0, 0, 0, 3), value=7.0)
        longer[f"{side}_scale"] = torch.nn.functional.pad(kwargs[f"{side}_scale"], (0, 3))
        longer[f"{side}_mask"] = torch.nn.functional.pad(kwargs[f"{side}_mask"], (0, 3), value=False)
    for variant in (scrambled, longer):
        for got, want in zip(valid_token_outputs(model, variant), reference):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for row in range(2):
        alone = valid_token_outputs(model, {k: v[row : row + 1] for k, v in kwargs.items()})[0]
        torch.testing.assert_close(alone, reference[row], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_padded_slots_read_the_last_valid_local(name):
    """max-end (the last local slot) of an image whose last slots are padded is its last valid local's score."""
    model = small_model(name)
    kwargs = random_inputs(2)
    with torch.no_grad():
        logits = model(**kwargs)
    per_image = LOCALS + 2
    mask = kwargs["gallery_mask"]
    for b, k in zip(*torch.nonzero(~mask[..., -1], as_tuple=True)):
        last_valid = int(torch.nonzero(mask[b, k])[-1])
        block = logits[b, (1 + k) * per_image : (2 + k) * per_image]
        torch.testing.assert_close(block[LOCALS], block[1 + last_valid])  # slot 0 is the global token


@pytest.mark.parametrize("name", NAMES)
def test_both_directions_reach_every_image(name):
    """The first gallery image's tokens change when only the last image changes, and the reverse;
    with the backward mixers silenced the first image cannot see the last at all."""
    kwargs = random_inputs(3)
    per_image, gallery = LOCALS + 2, kwargs["gallery_local"].shape[1]

    def change(model, changed, watched):
        moved = dict(kwargs, gallery_global=kwargs["gallery_global"].clone())
        moved["gallery_global"][:, changed] += 1.0
        rows = slice((1 + watched) * per_image, (2 + watched) * per_image)
        with torch.no_grad():
            return float((model(**moved)[:, rows] - model(**kwargs)[:, rows]).abs().max())

    model = small_model(name)
    backward_reach, forward_reach = change(model, gallery - 1, 0), change(model, 0, gallery - 1)
    for layer in model.layers:
        mixer = layer.backward_mixer
        torch.nn.init.zeros_((mixer.output if name == "locore-rwkv" else mixer.out_proj).weight)
    assert change(model, gallery - 1, 0) == 0.0
    assert backward_reach > 1e-6 and forward_reach > 1e-6


@pytest.mark.parametrize("block_type", BLOCK_TYPES)
def test_a_layer_is_the_stock_block_when_its_backward_mixer_is_silenced(block_type):
    """With the backward mixer's output projection at zero, a layer computes ``transformers``' own block."""
    config = RecurrentConfig.variant(f"locore-{block_type}", **SMALL)
    torch.manual_seed(0)
    layer = LocoreRecurrentModel(config).layers[1]
    output = layer.backward_mixer.output if block_type == "rwkv" else layer.backward_mixer.out_proj
    torch.nn.init.zeros_(output.weight)
    hidden = torch.randn(2, 11, config.hidden_size)
    stock_model = (RwkvModel if block_type == "rwkv" else MambaModel)(config.block_config())
    stock = (stock_model.blocks if block_type == "rwkv" else stock_model.layers)[1]
    ours = {k: v for k, v in layer.state_dict().items() if not k.startswith("backward_mixer.")}
    renamed = {"rwkv": {"norm.": "ln1.", "forward_mixer.": "attention.", "ffn_norm.": "ln2.", "ffn.": "feed_forward."},
               "mamba": {"forward_mixer.": "mixer."}}[block_type]
    stock.load_state_dict({_rename(k, renamed): v for k, v in ours.items()})
    with torch.no_grad():
        want = stock(hidden)
        want = want[0] if isinstance(want, tuple) else want  # RwkvBlock returns (hidden, state, attentions)
        got = layer(hidden, torch.arange(11).expand(2, -1))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _rename(key, prefixes):
    for ours, theirs in prefixes.items():
        if key.startswith(ours):
            return theirs + key[len(ours):]
    return key


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_every_parameter(name):
    reranker = small_reranker(name)
    rng = np.random.default_rng(0)
    lists = [random_images(rng, 5), random_images(rng, 5, valid=3)]
    labels = [np.array([1, 0, 0, 1]), np.array([0, 1, 0, 0])]
    reranker.module.train()
    loss = reranker.training_loss([l[0] for l in lists], [l[1:] for l in lists], labels)
    loss.backward()
    silent = [n for n, p in reranker.module.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert np.isfinite(loss.item()) and silent == []


@pytest.mark.parametrize("name", NAMES)
def test_save_pretrained_round_trip_and_bare_weights(name, tmp_path):
    rng = np.random.default_rng(1)
    reranker = small_reranker(name)
    reranker.save_pretrained(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["reranker"] == name
    options = dict(device="cpu", query_length=LOCALS, window=4, stride=2, top_k=9)
    loaded = create_reranker(name, checkpoint=tmp_path / "ckpt", **options)
    assert loaded.config == reranker.config
    query, *shortlist = random_images(rng, 10)
    first, second = reranker.rerank(query, shortlist), loaded.rerank(query, shortlist)
    assert (first.order == second.order).all() and np.array_equal(first.scores, second.scores)
    # the weights file alone: the architecture's sizes come from its tensors
    bare = tmp_path / "bare"
    bare.mkdir()
    (tmp_path / "ckpt" / "model.safetensors").rename(bare / "model.safetensors")
    from_tensors = create_reranker(name, checkpoint=bare / "model.safetensors", config={"num_attention_heads": 2,
                                   "intermediate_size": 24, "state_size": 4, "cross_attention_every": 1, "hidden_dropout_prob": 0.0}, **options)
    assert from_tensors.config == reranker.config
    assert np.array_equal(from_tensors.rerank(query, shortlist).scores, first.scores)


@pytest.mark.parametrize("name", NAMES)
def test_one_pass_equals_one_window_and_covers_long_shortlists(name):
    rng = np.random.default_rng(2)
    query, *shortlist = random_images(rng, 13)
    one_pass = small_reranker(name, window="all", top_k=9).rerank(query, shortlist)
    one_window = small_reranker(name, window=9, top_k=9).rerank(query, shortlist)
    assert (one_pass.order == one_window.order).all() and np.array_equal(one_pass.scores, one_window.scores)
    sliding = small_reranker(name, window=4, stride=2, top_k=9).rerank(query, shortlist)
    assert not np.array_equal(sliding.scores, one_pass.scores)  # windows see other neighbours: a different function
    # a shortlist of 400 in one sequence (2,806 tokens), no context limit
    query, *long_list = random_images(rng, 401, valid=5)
    result = small_reranker(name, window="all", top_k=400).rerank(query, long_list)
    assert sorted(result.order.tolist()) == list(range(400))


@pytest.mark.parametrize("name", NAMES)
def test_options_and_input_are_validated(name):
    with pytest.raises(ValueError, match="number of images or 'all'"):
        small_reranker(name, window="whole")
    with pytest.raises(ValueError, match="unknown .* config key"):
        small_reranker(name, config={**SMALL, "attention_window": 8})
    with pytest.raises(ValueError, match="no published weights"):
        create_reranker(name)
    with pytest.raises(ValueError, match="not a multiple"):
        RecurrentConfig.variant(name, hidden_size=10, num_attention_heads=4)
    reranker = small_reranker(name)
    rng = np.random.default_rng(3)
    query, *shortlist = random_images(rng, 4)
    wrong = ImageFeatures(global_desc=query.global_desc, local=rng.normal(size=(5, LOCAL_DIM + 1)), scale=np.zeros(5))
    with pytest.raises(ValueError, match="dimension"):
        reranker.rerank(wrong, shortlist)
    with pytest.raises(ValueError, match="no valid local"):
        reranker.rerank(ImageFeatures(global_desc=query.global_desc, local=np.zeros((0, LOCAL_DIM)), scale=np.zeros(0)),
                        shortlist)


@pytest.mark.parametrize("name", NAMES)
def test_through_rerankers(name, tmp_path):
    from rerankers import Reranker

    small_reranker(name).save_pretrained(tmp_path / "ckpt")
    rng = np.random.default_rng(9)
    query, *docs = random_images(rng, 8)
    options = dict(checkpoint=tmp_path / "ckpt", device="cpu", query_length=LOCALS, window="all", top_k=9, verbose=0)
    ranked = Reranker(name, **options).rank(query, docs)
    expected = create_reranker(name, **options).rerank(query, docs)
    assert [r.doc_id for r in ranked.results] == expected.order.tolist()
    np.testing.assert_allclose([r.score for r in ranked.results], expected.scores[expected.order], rtol=1e-6)
