"""The one KEY=VALUE grammar of every command line, against hand-written expectations."""
import pytest

from locore_plugin.options import parse_assignment, parse_value


@pytest.mark.parametrize("text, expected", [
    ("3", 3), ("1e-3", 1e-3), ("true", True), ("True", True), ("false", False), ("None", None), ("null", None),
    ('"text"', "text"), ("[0.0, 1.0]", [0.0, 1.0]), ("(0.55, 0.3)", (0.55, 0.3)), ("{ depth = 2 }", {"depth": 2}),
    ("{'depth': 2}", {"depth": 2}), ("/ckpt/locore_base", "/ckpt/locore_base"), ("max-end", "max-end"),
    ("runs/x.pt", "runs/x.pt"), ("", ""),
])
def test_values_read_as_toml_python_or_text(text, expected):
    assert parse_value(text) == expected and type(parse_value(text)) is type(expected)


def test_assignments_and_the_error_that_shows_the_syntax():
    assert parse_assignment("ames-dinov2.fusion=None") == ("ames-dinov2.fusion", None)
    assert parse_assignment("path=a=b") == ("path", "a=b")  # the first = splits
    with pytest.raises(ValueError, match=r"must look like KEY=VALUE.*None.*\(0\.5, 0\.3\).*got 'fusion'"):
        parse_assignment("fusion")


def test_eval_option_none_reaches_the_factory():
    from locore_plugin.evaluation import MethodSpec, apply_options

    methods = [MethodSpec("ames-dinov2", {}), MethodSpec("superglobal+locore-tiny", {})]
    apply_options(methods, ["ames-dinov2.fusion=None", "locore-tiny.fusion=(0, 1)", "ames-dinov2.top_k=(100)"])
    assert methods[0].options == {"fusion": None, "top_k": 100}
    assert methods[1].stage_options == {"locore-tiny": {"fusion": (0, 1)}}


def test_read_recipe_file_reads_toml_and_json_and_applies_dotted_overrides(tmp_path):
    from locore_plugin.options import read_recipe_file

    (tmp_path / "r.toml").write_text('lr = 1e-4\n[data]\nlist_length = 100\n')
    (tmp_path / "r.json").write_text('{"lr": 1e-4, "data": {"list_length": 100}}')
    for name in ("r.toml", "r.json"):
        assert read_recipe_file(tmp_path / name, ["data.list_length=50", "new.table.key=x"]) == {
            "lr": 1e-4, "data": {"list_length": 50}, "new": {"table": {"key": "x"}}}
    with pytest.raises(ValueError, match="'lr' is not a table"):
        read_recipe_file(tmp_path / "r.toml", ["lr.x=1"])
    (tmp_path / "bad.toml").write_text("lr = = 1")
    with pytest.raises(ValueError, match="bad.toml"):
        read_recipe_file(tmp_path / "bad.toml")
    (tmp_path / "r.yaml").write_text("lr: 1")
    with pytest.raises(ValueError, match=r"must be \.toml or \.json"):
        read_recipe_file(tmp_path / "r.yaml")
    with pytest.raises(FileNotFoundError, match="training config not found"):
        read_recipe_file(tmp_path / "none.toml", what="training config")
