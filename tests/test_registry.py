"""Hooks, the registry, chains, and plugins from entry points."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import locore_plugin
from locore_plugin import ImageFeatures, ImageReranker, create_reranker, list_rerankers
from locore_plugin.hookspecs import hookimpl
from locore_plugin.interface import ranked
from locore_plugin.registry import UnknownNameError


class Reverse(ImageReranker):
    """Puts the shortlist in reverse order; scores = position."""

    def __init__(self, device="cpu", dtype=None, batch_size=1, verbose=0):
        pass

    def _rerank_many(self, queries, shortlists, global_scores):
        return [ranked(np.arange(len(s), dtype=np.float32)) for s in shortlists]


class ReversePlugin:
    @hookimpl
    def register_rerankers(self, register):
        register("test-reverse", Reverse, description="reverses the shortlist")


@pytest.fixture
def reverse_plugin(register_plugin):
    return register_plugin(ReversePlugin(), "test-reverse-plugin")


def features(n, dim=4, seed=0):
    rng = np.random.default_rng(seed)
    return [ImageFeatures(global_desc=v / np.linalg.norm(v)) for v in rng.normal(size=(n, dim))]


def test_builtins_are_listed_with_their_provider():
    entry = {e.name: e for e in list_rerankers()}["superglobal"]
    assert entry.distribution == "locore-plugin" and entry.plugin == "locore_plugin.adapters.superglobal"
    assert entry.description


def test_hook_register_rerankers_adds_a_reranker_without_code_changes(reverse_plugin):
    names = {e.name: e for e in list_rerankers()}
    assert names["test-reverse"].plugin == "test-reverse-plugin"
    result = create_reranker("test-reverse").rerank(features(1)[0], features(4))
    assert result.order.tolist() == [3, 2, 1, 0]


def test_unknown_name_lists_close_matches():
    with pytest.raises(UnknownNameError, match="Did you mean: superglobal"):
        create_reranker("superglobl")


def test_duplicate_registration_names_both_plugins(reverse_plugin, register_plugin):
    class Again:
        @hookimpl
        def register_rerankers(self, register):
            register("test-reverse", Reverse)

    register_plugin(Again(), "again")
    with pytest.raises(ValueError, match="registered twice.*test-reverse-plugin.*again"):
        list_rerankers()


def test_factory_must_return_an_image_reranker(register_plugin):
    class Bad:
        @hookimpl
        def register_rerankers(self, register):
            register("test-bad", lambda **kw: object())

    register_plugin(Bad(), "bad")
    with pytest.raises(TypeError, match="not an ImageReranker"):
        create_reranker("test-bad")


def test_chain_feeds_each_stage_the_previous_order_and_scores(reverse_plugin):
    query, shortlist = features(1)[0], features(6, seed=1)
    chain = create_reranker("superglobal+test-reverse", stage_options={"superglobal": {"K": 2}})
    first = create_reranker("superglobal", K=2).rerank(query, shortlist)
    result = chain.rerank(query, shortlist)
    # reverse of superglobal's order; the last stage's scores (position in its input) mapped back
    assert result.order.tolist() == first.order[::-1].tolist()
    np.testing.assert_array_equal(result.scores[first.order], np.arange(6))
    assert chain.name == "superglobal+test-reverse"


def test_chain_options_must_name_stages():
    with pytest.raises(ValueError, match="not in"):
        create_reranker("superglobal+superglobal", stage_options={"nope": {}})


ENTRY_POINT_PLUGIN = textwrap.dedent(
    """
    import numpy as np
    from locore_plugin import ImageReranker
    from locore_plugin.hookspecs import hookimpl
    from locore_plugin.interface import ranked

    class Constant(ImageReranker):
        def _rerank_many(self, queries, shortlists, global_scores):
            return [ranked(np.zeros(len(s), np.float32)) for s in shortlists]

    @hookimpl
    def register_rerankers(register):
        register("ep-constant", lambda **kw: Constant(), description="from an entry point")
    """
)


@pytest.fixture
def installed_distribution(tmp_path):
    """A real distribution on sys.path: a module plus dist-info with a locore_plugin entry point."""
    (tmp_path / "ep_plugin.py").write_text(ENTRY_POINT_PLUGIN)
    info = tmp_path / "ep_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[locore_plugin]\nep_plugin = ep_plugin\n")
    return tmp_path


def run_listing(path, env_value):
    env = {k: v for k, v in os.environ.items() if k != "LOCORE_PLUGINS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(path), env.get("PYTHONPATH")]))
    if env_value is not None:
        env["LOCORE_PLUGINS"] = env_value
    code = "import locore_plugin; print(sorted((e.name, e.distribution) for e in locore_plugin.list_rerankers()))"
    # cwd: away from the source tree, which would shadow the installed package
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=path, capture_output=True, text=True, check=True).stdout


@pytest.mark.parametrize("env_value, loaded", [(None, True), ("ep_plugin", True), ("", False), ("other", False)])
def test_entry_point_plugins_and_the_env_var(installed_distribution, env_value, loaded):
    out = run_listing(installed_distribution, env_value)
    assert ("('ep-constant', 'ep-plugin')" in out) is loaded
    assert "'superglobal'" in out  # built-ins always load


def test_public_api_names():
    for name in ("ImageFeatures", "ImageReranker", "RerankResult", "create_reranker", "list_rerankers"):
        assert hasattr(locore_plugin, name)


def test_registry_metadata_is_typed_and_normalised():
    entries = {e.name: e for e in list_rerankers()}
    assert entries["rrt"].metadata.inputs == entries["locore-tiny"].metadata.inputs == ("global", "local")
    assert entries["superglobal"].metadata.learned is None and entries["ames-dinov2"].metadata.learned is True
    assert entries["locore-tiny"].metadata.attn_implementations == ("transformers", "blocked")
    assert entries["gv"].metadata.columns == ("xy",) and entries["gv"].metadata.extractor == "sift"


@pytest.mark.parametrize("metadata, error", [
    ({"input": "global"}, r"unknown metadata \['input'\].*accepted"),  # a misspelt field
    ({"_plugin": "locore_plugin.adapters.superglobal"}, r"unknown metadata \['_plugin'\]"),  # no spoofed provenance
    ({"inputs": "global+pixels"}, r"inputs \['pixels'\] are not among"),
], ids=["misspelt-field", "spoofed-provenance", "bad-value"])
def test_bad_metadata_names_the_plugin_the_name_and_the_field(register_plugin, metadata, error):
    class Plugin:
        @hookimpl
        def register_rerankers(self, register):
            register("test-bad-metadata", Reverse, **metadata)

    register_plugin(Plugin(), "bad-metadata")
    with pytest.raises(ValueError, match=r"plugin 'bad-metadata', re-ranker 'test-bad-metadata': " + error):
        list_rerankers()
