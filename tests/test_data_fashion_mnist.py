import gzip

import numpy as np
import pytest
import torch

from epsscale.data.fashion_mnist import DEFAULT_ROOT, load_fashion_mnist, read_idx, to_model_space
from epsscale.data.images import quantize_adm

needs_data = pytest.mark.skipif(not (DEFAULT_ROOT / "t10k-images-idx3-ubyte.gz").exists(), reason="dataset-fashion-mnist not installed")


@needs_data
def test_test_split_loads():
    images, labels = load_fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and set(np.unique(labels)) == set(range(10))


def test_model_space_round_trip():
    u8 = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    x = to_model_space(u8)
    assert x.shape == (5, 1, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert torch.all(x[..., :2, :] == -1)
    back = quantize_adm(x, crop=28)
    assert back.shape == (5, 28, 28, 1)
    assert np.abs(back[..., 0].astype(int) - u8.astype(int)).max() <= 1


def test_missing_data_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_fashion_mnist("train", tmp_path)
    with pytest.raises(ValueError):
        load_fashion_mnist("validation", tmp_path)


def test_idx_reader_rejects_damage(tmp_path):
    good = tmp_path / "x.gz"
    header = bytes([0, 0, 8, 3]) + (2).to_bytes(4, "big") + (3).to_bytes(4, "big") + (3).to_bytes(4, "big")
    with gzip.open(good, "wb") as f:
        f.write(header + bytes(18))
    assert read_idx(good).shape == (2, 3, 3)
    bad = tmp_path / "y.gz"
    with gzip.open(bad, "wb") as f:
        f.write(header + bytes(5))
    with pytest.raises(ValueError, match="payload"):
        read_idx(bad)
    (tmp_path / "z.gz").write_bytes(b"garbage")
    with pytest.raises(ValueError):
        read_idx(tmp_path / "z.gz")
