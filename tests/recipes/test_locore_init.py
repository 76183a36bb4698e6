"""LoCoRE initialisation from RoBERTa / Longformer checkpoints: small random ones written to disk, converted, checked."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LongformerConfig, LongformerForMaskedLM, RobertaConfig, RobertaForMaskedLM

from locore_plugin import ImageFeatures, create_reranker
from locore_plugin.adapters.locore import extend_positions, init_from_language_model

SCRIPT = Path(__file__).resolve().parents[2] / "recipes" / "locore_init.py"
ARCH = dict(vocab_size=40, hidden_size=32, num_attention_heads=2, intermediate_size=64, layer_norm_eps=1e-5,
            pad_token_id=1, type_vocab_size=1)


@pytest.fixture(scope="module")
def longformer_dir(tmp_path_factory):
    """A random 8-layer 'longformer-base-4096' in miniature: 64 positions (+2 reserved), window 8."""
    folder = tmp_path_factory.mktemp("longformer")
    torch.manual_seed(0)
    LongformerForMaskedLM(LongformerConfig(**ARCH, num_hidden_layers=8, max_position_embeddings=66, attention_window=8)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def roberta_dir(tmp_path_factory):
    """A random 3-layer 'roberta-tiny-cased' in miniature: 32 positions (+2 reserved)."""
    folder = tmp_path_factory.mktemp("roberta")
    torch.manual_seed(1)
    RobertaForMaskedLM(RobertaConfig(**ARCH, num_hidden_layers=3, max_position_embeddings=34)).save_pretrained(folder)
    return folder


def source_state(folder, prefix):
    from safetensors.torch import load_file

    return {k[len(prefix):]: v for k, v in load_file(str(folder / "model.safetensors")).items() if k.startswith(prefix)}


def backbone_state(model):
    return model.language_model.longformer.state_dict()


def test_extend_positions_by_hand():
    table = torch.tensor([[9.0], [8.0], [0.0], [1.0], [3.0]])  # 2 reserved rows, then 3 learned positions
    assert extend_positions(table, 9, "tile")[:, 0].tolist() == [9, 8, 0, 1, 3, 0, 1, 3, 0]
    # 3 learned rows resampled onto 5: x = 0, .5, 1, 1.5, 2 -> 0, .5, 1, 2, 3
    assert extend_positions(table, 7, "interpolate")[:, 0].tolist() == [9, 8, 0, 0.5, 1, 2, 3]
    assert extend_positions(table, 4)[:, 0].tolist() == [9, 8, 0, 1]
    with pytest.raises(ValueError, match="unknown position extension"):
        extend_positions(table, 9, "mirror")


def test_base_from_longformer_interpolates_positions(longformer_dir):
    source = source_state(longformer_dir, "longformer.")
    model = init_from_language_model(longformer_dir, "locore-base", local_dim=24, global_dim=32)
    state = backbone_state(model)
    assert model.config.num_hidden_layers == 8 and model.config.attention_window == (512,) * 8
    for key, value in source.items():
        if key.startswith("encoder."):
            assert torch.equal(state[key], value), key
    assert not torch.equal(state["encoder.layer.0.attention.self.query_global.weight"],
                           state["encoder.layer.0.attention.self.query.weight"])  # a Longformer's own global q/k/v
    old = source["embeddings.position_embeddings.weight"].numpy()
    new = state["embeddings.position_embeddings.weight"].numpy()
    assert new.shape == (5122, 32)
    x = np.arange(5120) * (64 - 1) / (5120 - 1)  # independent linear interpolation of the 64 learned rows
    lo = np.floor(x).astype(int)
    hi = np.minimum(lo + 1, 63)
    expected = old[2:][lo] * (1 - (x - lo))[:, None] + old[2:][hi] * (x - lo)[:, None]
    np.testing.assert_allclose(new[2:], expected, atol=1e-5)
    np.testing.assert_array_equal(new[:2], old[:2])
    words = torch.from_numpy(np.asarray(source["embeddings.word_embeddings.weight"]))
    assert torch.equal(state["sep_embedding"], words[2]) and torch.equal(state["pad_embedding"], words[1])
    assert "embeddings.word_embeddings.weight" not in state
    assert isinstance(model.local_to_lm, torch.nn.Linear) and isinstance(model.global_to_lm, torch.nn.Identity)


def test_small_keeps_the_first_six_layers_and_tiles_on_request(longformer_dir):
    source = source_state(longformer_dir, "longformer.")
    model = init_from_language_model(longformer_dir, "locore-small", positions="tile")
    state = backbone_state(model)
    assert model.config.num_hidden_layers == 6
    assert not any(k.startswith("encoder.layer.6.") for k in state)
    for key in (k for k in source if k.startswith("encoder.layer.5.")):
        assert torch.equal(state[key], source[key])
    old, new = source["embeddings.position_embeddings.weight"], state["embeddings.position_embeddings.weight"]
    assert torch.equal(new[2:66], old[2:]) and torch.equal(new[66:130], old[2:]) and torch.equal(new[5120:], old[64:66])  # k = 5118, 5119 -> 62, 63


def test_tiny_from_roberta_copies_local_attention_into_global(roberta_dir):
    source = source_state(roberta_dir, "roberta.")
    model = init_from_language_model(roberta_dir, "locore-tiny")
    state = backbone_state(model)
    assert model.config.attention_window == (1024,) * 3
    for layer in range(3):
        for proj in ("query", "key", "value"):
            for part in ("weight", "bias"):
                local = source[f"encoder.layer.{layer}.attention.self.{proj}.{part}"]
                assert torch.equal(state[f"encoder.layer.{layer}.attention.self.{proj}.{part}"], local)
                assert torch.equal(state[f"encoder.layer.{layer}.attention.self.{proj}_global.{part}"], local)
    old, new = source["embeddings.position_embeddings.weight"], state["embeddings.position_embeddings.weight"]
    assert new.shape[0] == 5122 and torch.equal(new[2 + 32 * 7 : 2 + 32 * 8], old[2:])  # repeated


def test_errors(roberta_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no config.json"):
        init_from_language_model(tmp_path, "locore-tiny")
    with pytest.raises(ValueError, match="has 3 layers, 6 were asked for"):
        init_from_language_model(roberta_dir, "locore-small")
    with pytest.raises(ValueError, match="unknown LoCoRE variant"):
        init_from_language_model(roberta_dir, "locore-huge")


def test_recipe_script_writes_a_loadable_checkpoint_that_runs(longformer_dir, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("locore_init", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "locore-small-init"
    script.main(["locore-small", "--source", str(longformer_dir), "--out", str(out), "--local-dim", "24",
                 "--global-dim", "16", "--attention-window", "16"])
    assert "locore-small:" in capsys.readouterr().out
    reranker = create_reranker("locore-small", checkpoint=out, device="cpu", query_length=4, window=3, stride=2, top_k=5)
    assert reranker.config.num_hidden_layers == 6 and reranker.config.local_dim == 24
    assert reranker.config.attention_window == (16,) * 6
    rng = np.random.default_rng(0)
    images = [ImageFeatures(global_desc=rng.normal(size=16), local=rng.normal(size=(4, 24)), scale=rng.integers(0, 3, 4))
              for _ in range(7)]
    result = reranker.rerank(images[0], images[1:])
    assert sorted(result.order) == list(range(6)) and np.isfinite(result.scores).all()
