import numpy as np

from locore_plugin.fusion import fuse_scores


def test_fusion_by_hand():
    # 0.5 * 0.8 + 0.5 * sigmoid(0.1 * 0) = 0.65;  0.25 * 0.2 + 0.75 * sigmoid(2 * 1) = 0.05 + 0.75 * 0.880797
    np.testing.assert_allclose(fuse_scores([0.8], [0.0], 0.5, 0.1), [0.65], atol=1e-7)
    np.testing.assert_allclose(fuse_scores([0.2], [1.0], 0.25, 2.0), [0.05 + 0.75 * 0.8807971], atol=1e-6)
    assert fuse_scores(np.zeros(3), np.zeros(3), 1.0, 1.0).tolist() == [0, 0, 0]
