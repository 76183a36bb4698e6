"""The restricted unpickler: official containers load, anything that could run code is refused."""
from __future__ import annotations

import io
import os
import pickle
from collections import OrderedDict

import numpy as np
import pytest
import torch

from locore_plugin import read_pickle


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _write(path, obj, protocol=pickle.HIGHEST_PROTOCOL):
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


def test_crafted_reduce_is_refused_without_running(tmp_path):
    marker = tmp_path / "ran"
    path = _write(tmp_path / "evil.pkl", {"gnd": [_Exploit(marker)]})
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load global '(posix|os|nt)\.system'") as info:
        read_pickle(path)
    assert str(path) in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["builtins.eval", "builtins.getattr", "numpy.load", "torch.load", "subprocess.Popen"])
def test_other_globals_are_refused(tmp_path, name):
    module, attr = name.rsplit(".", 1)
    payload = b"\x80\x02c" + f"{module}\n{attr}\n".encode() + b"X\x01\x00\x00\x001\x85R."  # GLOBAL; call with ('1',)
    path = tmp_path / "g.pkl"
    path.write_bytes(payload)
    with pytest.raises(pickle.UnpicklingError, match=f"'{module}.{attr}'"):
        read_pickle(path)


def test_codecs_encode_only_latin1(tmp_path):
    payload = b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x06\x00\x00\x00base64\x86R."
    path = tmp_path / "c.pkl"
    path.write_bytes(payload)
    with pytest.raises(pickle.UnpicklingError, match="base64"):
        read_pickle(path)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_plain_data_and_numpy_round_trip(tmp_path, protocol):
    data = {
        "gnd": [{"easy": [1, 2], "hard": [], "junk": [3], "bbx": [0.5, 1.0, 2.0, 3.5]}],
        "names": ("a", "b"), "flags": {1, 2}, "frozen": frozenset([3]), "none": None, "c": 1 + 2j, "raw": b"\x00\xff",
        "order": OrderedDict(x=1),
        "f32": np.arange(6, dtype=np.float32).reshape(2, 3), "i64": np.arange(4)[::2], "u16": np.arange(3, dtype=np.uint16),
        "rec": np.zeros(2, dtype=[("metadata", "<f4", (5,)), ("descriptor", "<f2", (4,))]),
        "scalar": np.float64(2.5), "obj": np.array([[1, 2], "x"], dtype=object), "dtype": np.dtype("<f2"),
    }
    loaded = read_pickle(_write(tmp_path / "d.pkl", data, protocol))
    assert loaded["gnd"] == data["gnd"] and loaded["names"] == data["names"] and loaded["flags"] == {1, 2}
    assert loaded["frozen"] == frozenset([3]) and loaded["raw"] == b"\x00\xff" and loaded["order"] == OrderedDict(x=1)
    for key in ("f32", "i64", "u16", "rec"):
        assert loaded[key].dtype == data[key].dtype and np.array_equal(loaded[key], data[key])
    assert loaded["scalar"] == 2.5 and loaded["dtype"] == np.dtype("<f2") and loaded["obj"][0] == [1, 2]


def test_official_nn_pickle_of_a_torch_tensor(tmp_path):
    """ROxf/RPar nn_*.pkl are written as pickle.dump(torch.from_numpy(scores)): read back as numpy."""
    scores = np.stack([np.random.default_rng(0).random((3, 5)), np.arange(15.0).reshape(3, 5)]).astype(np.float32)
    loaded = read_pickle(_write(tmp_path / "nn_dinov2.pkl", torch.from_numpy(scores)))
    assert isinstance(loaded, np.ndarray) and loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, scores)
    sliced = read_pickle(_write(tmp_path / "t.pkl", torch.arange(12.0).reshape(3, 4)[:, 1::2]))
    np.testing.assert_array_equal(sliced, np.arange(12.0).reshape(3, 4)[:, 1::2])


def test_torch_blob_with_code_is_refused(tmp_path):
    """The embedded torch.save blob is read with weights_only=True, so it cannot smuggle a call either."""
    marker = tmp_path / "ran"
    blob = io.BytesIO()
    torch.save(_Exploit(marker), blob, _use_new_zipfile_serialization=False)
    payload = (b"\x80\x02ctorch.storage\n_load_from_bytes\nC" + bytes([len(blob.getvalue())])
               if len(blob.getvalue()) < 256 else None)
    assert payload is not None
    payload += blob.getvalue() + b"\x85R."
    path = tmp_path / "blob.pkl"
    path.write_bytes(payload)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        read_pickle(path)
    assert not marker.exists()


@pytest.mark.parametrize("payload", [
    b"\x80\x02))R.",  # REDUCE on a tuple: "'tuple' object is not callable" inside the unpickler
    b"\x80\x02]q\x00(K\x01K\x02",  # truncated: no STOP
    b"\x80\x02cnumpy.core.multiarray\nscalar\nq\x00cnumpy\ndtype\nX\x02\x00\x00\x00O8\x85R)R.",
])
def test_every_refusal_is_an_unpickling_error_that_names_the_file(tmp_path, payload):
    path = tmp_path / "nn_crafted.pkl"
    path.write_bytes(payload)
    with pytest.raises(pickle.UnpicklingError, match="nn_crafted.pkl"):
        read_pickle(path)


def test_missing_file_names_file_and_source(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"gnd_roxford5k\.pkl.*cmp\.felk\.cvut\.cz/revisitop"):
        read_pickle(tmp_path / "gnd_roxford5k.pkl")


def test_real_gnd_pickles_load(shared_data):
    for name, (ndb, nq) in {"roxford5k": (4993, 70), "rparis6k": (6322, 70)}.items():
        data = read_pickle(shared_data("revisitop") / f"gnd_{name}.pkl")
        assert sorted(data) == ["gnd", "imlist", "qimlist"]
        assert len(data["imlist"]) == ndb and len(data["gnd"]) == len(data["qimlist"]) == nq
        assert sorted(data["gnd"][0]) == ["bbx", "easy", "hard", "junk"]
