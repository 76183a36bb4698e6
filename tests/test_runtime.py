"""The one device and dtype rule (locore_plugin.runtime)."""
import pytest
import torch

from locore_plugin.runtime import resolve_device, resolve_dtype


def test_auto_is_cuda_when_available_else_cpu():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None).type == resolve_device("auto").type == expected
    assert resolve_device("cpu", local_rank=3) == torch.device("cpu")


def test_a_torchrun_worker_gets_its_own_gpu_when_none_is_named():
    assert resolve_device("cuda", local_rank=2) == torch.device("cuda", 2)
    assert resolve_device("cuda:1", local_rank=2) == torch.device("cuda", 1)  # an explicit index wins
    assert resolve_device("cuda") == torch.device("cuda")


def test_dtypes_by_rerankers_names():
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype(None) is torch.float32
    assert resolve_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        resolve_dtype("fp8")
