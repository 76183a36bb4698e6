import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from locore_plugin.io.checkpoints import StateDictMismatchError, load_strict, read_checkpoint, read_state_dict, save_pretrained_folder
from locore_plugin.options import LocoreDeprecationWarning


def tiny():
    return torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2))


def test_reads_official_containers_and_safetensors(tmp_path):
    state = tiny().state_dict()
    torch.save({"state": state, "epoch": 3}, tmp_path / "official.pt")
    save_file(state, str(tmp_path / "model.safetensors"))
    torch.save({f"Reranker.{k}": v for k, v in state.items()}, tmp_path / "nested.pth")
    for path, prefixes in (("official.pt", ()), ("model.safetensors", ()), ("nested.pth", ("Reranker.",))):
        loaded = read_state_dict(tmp_path / path, strip_prefixes=prefixes)
        assert loaded.keys() == state.keys()
        assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_missing_file_and_non_state_dict(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        read_state_dict(tmp_path / "nope.pt")
    torch.save({"state": {"a": 1}}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="state dict of tensors"):
        read_state_dict(tmp_path / "bad.pt")


def test_load_strict_names_every_problem():
    model, state = tiny(), tiny().state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["1.bias"]
    state["0.weight"] = torch.zeros(5, 3)
    with pytest.raises(StateDictMismatchError) as info:
        load_strict(model, state, "my.ckpt")
    text = str(info.value)
    assert "my.ckpt" in text and "missing keys (1): 1.bias" in text and "unexpected keys (1): extra.weight" in text
    assert "0.weight: checkpoint (5, 3) vs model (2, 3)" in text


def test_load_strict_loads_values():
    source, target = tiny(), tiny()
    load_strict(target, source.state_dict())
    assert torch.equal(target[0].weight, source[0].weight)


def test_reads_training_checkpoints_with_numpy_metrics(tmp_path):
    """R2Former's util.save_checkpoint stores the weights under model_state_dict beside numpy recalls."""
    state = tiny().state_dict()
    torch.save({"epoch_num": 3, "model_state_dict": state, "recalls": np.array([0.5, 0.7]), "best": np.float64(0.7)}, tmp_path / "best.pth")
    loaded = read_state_dict(tmp_path / "best.pth")
    assert loaded.keys() == state.keys()


def test_save_pretrained_folder_round_trip_carries_the_registry_name(tmp_path):

    module = torch.nn.Linear(2, 1)
    save_pretrained_folder(tmp_path / "m", module, "ames-dinov2", {"hidden": 3}, dtype=torch.float16)
    assert json.loads((tmp_path / "m" / "config.json").read_text()) == {"reranker": "ames-dinov2", "hidden": 3}
    read_back = read_checkpoint(tmp_path / "m")
    assert read_back.config == {"hidden": 3} and read_back.reranker == "ames-dinov2"
    assert read_back.state["weight"].dtype == torch.float16
    torch.testing.assert_close(read_back.state["weight"].float(), module.weight.detach().half().float())
    read_back.check_name("ames-dinov2")  # silent
    with pytest.warns(UserWarning, match="saved from 'ames-dinov2' and is loaded as 'ames-768'"):
        read_back.check_name("ames-768")
    with pytest.raises(ValueError, match="'reranker'"):
        save_pretrained_folder(tmp_path / "n", module, "x", {"reranker": 1})
    with pytest.raises(FileNotFoundError, match="holds no model.safetensors"):
        read_checkpoint(tmp_path)  # a folder that is no saved model
    (tmp_path / "m" / "config.json").unlink()
    assert read_checkpoint(tmp_path / "m").config is None  # a bare release: sizes come from the tensors


def test_reads_the_0_1_layouts_with_a_deprecation_warning(tmp_path):

    save_pretrained_folder(tmp_path, torch.nn.Linear(2, 1), "rrt", {})
    for legacy, expected in (({"method": "rrt", "model": {"d_model": 8}}, {"d_model": 8}),
                             ({"variant": "locore-tiny", "local_dim": 8}, {"local_dim": 8})):
        (tmp_path / "config.json").write_text(json.dumps(legacy))
        with pytest.warns(LocoreDeprecationWarning, match="0.1 layout"):
            read_back = read_checkpoint(tmp_path)
        assert read_back.config == expected and read_back.reranker == next(iter(legacy.values()))


def test_weights_file_takes_the_config_beside_it_only_when_asked(tmp_path):

    save_file({"w": torch.ones(2)}, str(tmp_path / "weights.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 4}))
    assert read_checkpoint(tmp_path / "weights.safetensors").config is None
    assert read_checkpoint(tmp_path / "weights.safetensors", config_beside=True).config == {"hidden_size": 4}


def test_missing_path_and_unreachable_hub_id_are_clear_errors(tmp_path):

    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        read_checkpoint(tmp_path / "none.pt")
    with pytest.raises(FileNotFoundError, match="not a local path and could not be fetched"):
        read_checkpoint("no-such-user-locore/no-such-model")  # no network here, or no such repo
