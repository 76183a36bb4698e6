import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from locore_plugin.checkpoints import StateDictMismatchError, load_strict, read_state_dict


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
