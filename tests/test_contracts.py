"""Contracts every registered re-ranker keeps, checked over ``list_rerankers()`` (so a third-party
plugin installed beside this one is checked too): one ``pretrained`` rule for all of them."""
import pytest

from locore_plugin import TrainableReranker, create_reranker, list_rerankers

NAMES = [entry.name for entry in list_rerankers()]


@pytest.mark.parametrize("name", NAMES)
def test_the_pretrained_rule(name):
    """A learned method (registered ``learned=True``) never builds random weights silently: without
    a checkpoint it asks for ``pretrained=False``, and then it is trainable. A training-free one
    builds without options and accepts ``pretrained=False``."""
    entry = {e.name: e for e in list_rerankers()}[name]
    random_weights = create_reranker(name, pretrained=False)
    if entry.metadata.get("learned"):
        with pytest.raises(ValueError, match=r"checkpoint=.*pretrained=False"):
            create_reranker(name)
        assert isinstance(random_weights, TrainableReranker)
    else:
        create_reranker(name)
        assert not isinstance(random_weights, TrainableReranker)


@pytest.mark.parametrize("name", NAMES)
def test_unknown_options_are_refused(name):
    with pytest.raises(TypeError):
        create_reranker(name, pretrained=False, no_such_option_anywhere=1)
