import numpy as np
import pytest

from locore_plugin import ImageFeatures
from locore_plugin.features import stack_globals, stack_locals


def test_defaults_and_dtypes():
    f = ImageFeatures(local=np.arange(6, dtype=np.float64).reshape(3, 2))
    assert f.local.dtype == np.float32 and f.mask.tolist() == [True, True, True] and f.num_locals == 3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "needs a global descriptor"),
        ({"global_desc": np.ones((2, 2))}, "shape"),
        ({"global_desc": np.array([1.0, np.nan])}, "NaN"),
        ({"local": np.ones(3)}, "shape"),
        ({"local": np.ones((3, 2)), "mask": np.ones(3)}, "boolean"),
        ({"local": np.ones((3, 2)), "mask": np.ones(2, bool)}, "shape"),
        ({"local": np.array([[1.0, np.inf]])}, "NaN or Inf"),
        ({"local": np.ones((2, 2)), "xy": np.ones((2, 3))}, "xy must have shape"),
        ({"global_desc": np.ones(2), "scale": np.ones(2)}, "without local"),
    ],
)
def test_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ImageFeatures(**kwargs)


def test_nan_in_padding_rows_is_allowed():
    f = ImageFeatures(local=np.array([[1.0, 2.0], [np.nan, 0.0]]), mask=np.array([True, False]))
    assert f.num_locals == 1


def test_stack_locals_pads_and_truncates_by_weight():
    a = ImageFeatures(
        local=np.arange(8, dtype=np.float32).reshape(4, 2),
        mask=np.array([True, True, False, True]),
        weight=np.array([0.1, 0.9, 5.0, 0.5]),
    )
    b = ImageFeatures(local=np.ones((1, 2)), weight=np.ones(1))
    out = stack_locals([a, b], length=2, columns=("weight",))
    # a: valid rows 0, 1, 3 -> the two heaviest are 1 (0.9) and 3 (0.5), kept in file order
    np.testing.assert_array_equal(out["local"][0], [[2, 3], [6, 7]])
    np.testing.assert_allclose(out["weight"][0], [0.9, 0.5])
    np.testing.assert_array_equal(out["mask"], [[True, True], [True, False]])
    np.testing.assert_array_equal(out["local"][1], [[1, 1], [0, 0]])


def test_stack_locals_without_weight_keeps_first_rows():
    a = ImageFeatures(local=np.arange(6, dtype=np.float32).reshape(3, 2))
    np.testing.assert_array_equal(stack_locals([a], 2)["local"][0], [[0, 1], [2, 3]])


def test_stack_errors():
    with pytest.raises(ValueError, match="different dimensions"):
        stack_globals([ImageFeatures(global_desc=np.ones(2)), ImageFeatures(global_desc=np.ones(3))])
    with pytest.raises(ValueError, match=r"needs the column\(s\) \['scale'\]"):
        stack_locals([ImageFeatures(local=np.ones((2, 2)))], 4, columns=("scale",), method="rrt")
