"""The option names of locore-plugin 0.1, accepted for one release: each maps to today's name with
a LocoreDeprecationWarning (a FutureWarning, shown to users) and builds the same re-ranker or extractor; both names at once is an error."""
import numpy as np
import pytest

from locore_plugin import create_extractor, create_reranker
from locore_plugin.options import LocoreDeprecationWarning, renamed_options

SMALL_LOCORE = dict(pretrained=False, window=5, stride=2,
                    config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                attention_window=16, max_position_embeddings=258, local_dim=8, global_dim=8))


def test_renamed_options_by_hand():
    with pytest.warns(LocoreDeprecationWarning, match="'num_locals' is deprecated .* use 'query_length' and 'gallery_length'"):
        assert renamed_options({"query_length": None, "gallery_length": None, "top_k": 3}, {"num_locals": 6},
                               {"num_locals": ("query_length", "gallery_length")}, "x") == {
            "query_length": 6, "gallery_length": 6, "top_k": 3}
    assert renamed_options({"top_k": 3}, {}, {"M": "top_k"}, "x") == {"top_k": 3}  # nothing deprecated: silent
    with pytest.raises(TypeError, match=r"unexpected option\(s\) \['nope'\]"):
        renamed_options({}, {"nope": 1}, {"num_locals": "query_length"}, "x")
    with pytest.raises(TypeError, match="under both"), pytest.warns(LocoreDeprecationWarning):
        renamed_options({"top_k": 3}, {"M": 5}, {"M": "top_k"}, "x")


@pytest.mark.parametrize("name, old, new, attributes", [
    ("locore-tiny", dict(num_locals=6, shortlist=9, alpha=0.3, temperature=2.0),
     dict(query_length=6, gallery_length=6, top_k=9, fusion=(0.3, 2.0)), ("query_length", "gallery_length", "top_k", "fusion")),
    ("locore-tiny", dict(num_locals=6, temperature=2.0), dict(query_length=6, fusion=(0.5, 2.0)), ("fusion",)),
    ("superglobal", dict(M=50), dict(top_k=50), ("top_k",)),
    ("gv", dict(max_locals=30), dict(query_length=30, gallery_length=30), ("query_length", "gallery_length")),
])
def test_old_reranker_options_build_the_same_reranker(name, old, new, attributes):
    extra = SMALL_LOCORE if name.startswith("locore") else {}
    with pytest.warns(LocoreDeprecationWarning, match="deprecated"):
        before = create_reranker(name, **extra, **old)
    after = create_reranker(name, **extra, **new)
    for attribute in attributes:
        assert getattr(before, attribute) == getattr(after, attribute)


def test_old_and_new_name_together_is_an_error():
    with pytest.raises(TypeError, match="under both"), pytest.warns(LocoreDeprecationWarning):
        create_reranker("superglobal", M=50, top_k=40)
    with pytest.raises(TypeError, match="not both"), pytest.warns(LocoreDeprecationWarning):
        create_reranker("locore-tiny", **SMALL_LOCORE, alpha=0.2, fusion=(0.1, 1.0))


def test_r2former_official_fusion_is_now_default():
    config = dict(hidden=16, depth=1, pair_depth=1, heads=2, local_dim=8, global_dim=8, num_patches=16, num_corr=2)
    with pytest.warns(LocoreDeprecationWarning, match="fusion='default'"):
        before = create_reranker("r2former", pretrained=False, config=config, fusion="official", query_length=4, gallery_length=4)
    after = create_reranker("r2former", pretrained=False, config=config, fusion="default", query_length=4, gallery_length=4)
    assert before.fusion == after.fusion and after.fusion[1] == 1.0


def test_old_extractor_and_training_list_options():
    with pytest.warns(LocoreDeprecationWarning, match="'max_keypoints' is deprecated"):
        assert create_extractor("sift", max_keypoints=40).num_locals == 40
    from locore_plugin import ImageFeatures
    from locore_plugin.data.training_lists import TrainingLists

    features = [ImageFeatures(global_desc=np.ones(2)) for _ in range(4)]
    neighbours = np.array([[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]])
    with pytest.warns(LocoreDeprecationWarning, match="'topk' is deprecated .* 'list_length'"):
        assert TrainingLists(features, neighbours, np.array([0, 0, 1, 1]), topk=2).list_length == 2
