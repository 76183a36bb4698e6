"""Any architecture from an official-layout checkpoint: AMES, RRT and R2Former files of several
depths and widths (random weights under the official key names, in the official containers) load
with no config but the number of heads, and build the same model as the explicit official config."""
import numpy as np
import pytest
import torch

from locore_plugin import ImageFeatures, create_reranker

# (registered name, official constructor keywords, keywords no tensor shows, official container key)
CASES = {
    "ames-shallow-wide": ("ames-dinov2", dict(local_dim=24, model_dim=48, nhead=3, num_encoder_layers=1,
                                              dim_feedforward=40, activation="gelu", normalize_before=False,
                                              binarized=False), ("nhead", "activation"), "state"),
    "ames-deep-prenorm": ("ames-dinov2", dict(local_dim=12, model_dim=16, nhead=2, num_encoder_layers=3,
                                              dim_feedforward=8, activation="relu", normalize_before=True,
                                              binarized=False), ("nhead", "activation"), "state"),
    "ames-binary": ("ames-dinov2-binary", dict(local_dim=20, model_dim=16, nhead=4, num_encoder_layers=2,
                                               dim_feedforward=24, activation="relu", normalize_before=False,
                                               binarized=True), ("nhead", "activation"), "state"),
    "rrt-shallow": ("rrt", dict(d_global=10, d_model=16, seq_len=1004, d_K=256, nhead=4, num_encoder_layers=1,
                                dim_feedforward=12, dropout=0.0, activation="relu", normalize_before=False),
                    ("nhead", "activation", "dropout"), "state"),
    "rrt-deep-prenorm": ("rrt", dict(d_global=6, d_model=8, seq_len=30, d_K=8, nhead=2, num_encoder_layers=3,
                                     dim_feedforward=32, dropout=0.0, activation="gelu", normalize_before=True),
                         ("nhead", "activation", "dropout"), "state"),
    "r2former-small": ("r2former", dict(decoder_depth=1, decoder_num_heads=2, decoder_embed_dim=16,
                                        decoder_mlp_ratio=2, num_patches=20, input_dim=8, num_corr=3, local_dim=8),
                       ("decoder_num_heads", "num_corr", "input_dim", "local_dim"), "model_state_dict"),
    "r2former-wide": ("r2former", dict(decoder_depth=3, decoder_num_heads=3, decoder_embed_dim=24,
                                       decoder_mlp_ratio=3, num_patches=60, input_dim=6, num_corr=4, local_dim=6),
                      ("decoder_num_heads", "num_corr", "input_dim", "local_dim"), "model_state_dict"),
}


def images(config, count, rng, n=7):
    local_dim = config.get("local_dim", config.get("d_model"))
    global_dim = config.get("d_global", config.get("input_dim", 4))
    return [
        ImageFeatures(global_desc=rng.normal(size=global_dim), local=rng.normal(size=(n, local_dim)),
                      scale=np.ones(n), xy=rng.uniform(0, 1, (n, 2)), weight=rng.uniform(0.1, 1, n))
        for _ in range(count)
    ]


@pytest.mark.parametrize("case", sorted(CASES))
def test_official_file_of_any_size_loads_with_only_the_heads(case, tmp_path):
    name, official, unseen, container = CASES[case]
    torch.manual_seed(0)
    explicit = create_reranker(name, pretrained=False, config=official, query_length=8, gallery_length=8, fusion=None)
    torch.save({container: explicit.module.state_dict(), "epoch": 3}, tmp_path / "official.pt")
    inferred = create_reranker(name, checkpoint=tmp_path / "official.pt", config={k: official[k] for k in unseen},
                               query_length=8, gallery_length=8, fusion=None)
    assert _sizes(inferred.module) == _sizes(explicit.module)
    rng = np.random.default_rng(1)
    queries, gallery = images(official, 2, rng), images(official, 5, rng)
    for a, b in zip(explicit.rerank_many(queries, [gallery] * 2), inferred.rerank_many(queries, [gallery] * 2)):
        np.testing.assert_array_equal(a.scores, b.scores)


def _sizes(module):
    config = module.config
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def test_only_heads_come_from_the_variant_and_a_bad_split_says_so(tmp_path):
    """No config at all: every size from the file; the variant's 2 heads do not divide a width of 15."""
    torch.manual_seed(0)
    official = dict(local_dim=6, model_dim=15, nhead=5, num_encoder_layers=1, dim_feedforward=8)
    module = create_reranker("ames-dinov2", pretrained=False, config=official).module
    torch.save({"state": module.state_dict()}, tmp_path / "ames.pt")
    with pytest.raises(ValueError, match=r"model_dim=15 is not divisible by nhead=2 .*cannot be read from a checkpoint"):
        create_reranker("ames-dinov2", checkpoint=tmp_path / "ames.pt")
    sized = create_reranker("ames-dinov2", checkpoint=tmp_path / "ames.pt", config={"nhead": 5}).module.config
    assert {k: sized[k] for k in official} == official


def test_official_keyword_names_and_their_errors():
    rrt = create_reranker("rrt", pretrained=False, config=dict(num_global_features=12, num_local_features=8, nhead=2,
                                                               num_encoder_layers=1, dim_K=256, seq_len=1004))
    assert (rrt.global_dim, rrt.local_dim) == (12, 8)
    with pytest.raises(ValueError, match=r"unknown rrt config key\(s\) \['d_global_features'\]; accepted: .*num_global_features"):
        create_reranker("rrt", pretrained=False, config=dict(d_global_features=12))
    with pytest.raises(ValueError, match="gives 'd_global' twice"):
        create_reranker("rrt", pretrained=False, config=dict(d_global=12, num_global_features=12))
    with pytest.raises(ValueError, match=r"num_classes=1 is not supported.*softmax"):
        create_reranker("r2former", pretrained=False, config=dict(num_classes=1))
    with pytest.raises(ValueError, match="decoder_norm_layer"):
        create_reranker("r2former", pretrained=False, config=dict(decoder_norm_layer="nn.LayerNorm"))
    import functools

    norm = functools.partial(torch.nn.LayerNorm, eps=1e-6)
    r2 = create_reranker("r2former", pretrained=False, config=dict(decoder_norm_layer=norm, decoder_depth=1, img_size=224))
    assert r2.module.config.depth == 1
    ames = create_reranker("ames-dinov2", pretrained=False, config=dict(data_root="/data", num_encoder_layers=1))
    assert len(ames.module.decoder.layers) == 1
