"""Feature extractors: the Fashion-MNIST classifier, the FID Inception network, statistics."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from epsscale.metrics import features as F
from epsscale.metrics.features import (
    FMNIST_TRAIN_STATS,
    FMNIST_WEIGHTS,
    ClassifierFeatures,
    FashionMNISTClassifier,
    FeatureExtractor,
    default_extractor_name,
    feature_stats,
    get_extractor,
    load_fmnist_extractor,
    reference_stats,
)
from epsscale.metrics.fid import FeatureStats
from epsscale.metrics.inception import (
    INCEPTION_WEIGHTS_NAME,
    INCEPTION_WEIGHTS_URL,
    InceptionV3Features,
    find_inception_weights,
    load_inception_extractor,
)

torch.set_num_threads(1)

FIXTURES = Path(__file__).parent / "fixtures"
HUB_INCEPTION = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_NAME


def random_images(n=6, size=28, channels=1, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, channels), dtype=np.uint8)


@pytest.fixture(scope="module")
def untrained():
    torch.manual_seed(0)
    return ClassifierFeatures(FashionMNISTClassifier(), weights_id="test-random")


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST classifier.


def test_classifier_shapes_and_size():
    model = FashionMNISTClassifier().eval()
    assert 100_000 < sum(p.numel() for p in model.parameters()) < 1_000_000
    x = torch.rand(3, 1, 28, 28)
    assert model(x).shape == (3, 10)
    assert model.features(x).shape == (3, 128)


def test_classifier_accepts_padded_and_rgb_inputs(untrained):
    x28 = torch.from_numpy(random_images(4))
    x32 = torch.nn.functional.pad(x28.permute(0, 3, 1, 2), (2, 2, 2, 2)).permute(0, 2, 3, 1)
    x_rgb = x28.expand(-1, -1, -1, 3)
    f28 = untrained(x28)
    assert f28.shape == (4, 128) and f28.dtype == torch.float32
    torch.testing.assert_close(untrained(x32.contiguous()), f28)
    torch.testing.assert_close(untrained(x_rgb.contiguous()), f28)
    with pytest.raises(ValueError, match="28×28 or 32×32"):
        untrained(torch.from_numpy(random_images(2, size=20)))
    with pytest.raises(ValueError, match="uint8"):
        untrained(torch.rand(2, 28, 28, 1))


def test_extractors_satisfy_protocol(untrained):
    assert isinstance(untrained, FeatureExtractor)
    assert untrained.name == "fmnist" and untrained.dim == 128
    assert InceptionV3Features.name == "inception" and InceptionV3Features.dim == 2048


def test_missing_classifier_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_classifier.py") as e:
        load_fmnist_extractor(tmp_path / "none.safetensors")
    assert "none.safetensors" in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="cannot load"):
        load_fmnist_extractor(tmp_path / "bad.safetensors")


def test_classifier_weights_round_trip(tmp_path, untrained):
    from safetensors.torch import save_file

    path = tmp_path / "c.safetensors"
    save_file({k: v.contiguous() for k, v in untrained.model.state_dict().items()}, str(path))
    loaded = load_fmnist_extractor(path)
    x = torch.from_numpy(random_images(3))
    torch.testing.assert_close(loaded(x), untrained(x))
    assert len(loaded.weights_id) == 16


@pytest.mark.skipif(not FMNIST_WEIGHTS.is_file(), reason="classifier weights not trained yet")
def test_shipped_classifier_is_accurate():
    from epsscale.data.fashion_mnist import DEFAULT_ROOT, load_fashion_mnist

    meta = json.loads(FMNIST_WEIGHTS.with_suffix(".json").read_text())
    assert {"test_accuracy", "epochs", "command", "feature_dim"} <= meta.keys()
    assert meta["test_accuracy"] >= 0.90 and meta["feature_dim"] == 128
    if not (DEFAULT_ROOT / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST not installed")
    images, labels = load_fashion_mnist("test")
    model = load_fmnist_extractor().model
    x = torch.from_numpy(np.array(images[:2000, None])).float() / 255
    with torch.no_grad():
        acc = (model(x).argmax(1).numpy() == labels[:2000]).mean()
    assert acc >= 0.88


def test_get_extractor_and_defaults(tmp_path):
    with pytest.raises(ValueError, match="unknown feature extractor"):
        get_extractor("vgg")
    assert default_extractor_name((10, 28, 28, 1)) == "fmnist"
    assert default_extractor_name((32, 32, 1)) == "fmnist"
    assert default_extractor_name((10, 32, 32, 3)) == "inception"
    with pytest.raises(FileNotFoundError, match="--inception PATH"):
        get_extractor("inception", tmp_path / "missing.pth")


# ----------------------------------------------------------------------------------------------
# Statistics of image sets.


def test_feature_stats_batch_size_invariant(untrained):
    images = random_images(50)
    a = feature_stats(images, untrained, batch_size=50)
    b = feature_stats(images, untrained, batch_size=7, progress=lambda it: list(it))
    assert a.count == b.count == 50
    np.testing.assert_allclose(a.mean, b.mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.cov, b.cov, rtol=1e-4, atol=1e-6)
    feats = untrained(torch.from_numpy(images)).double().numpy()
    np.testing.assert_allclose(a.cov, np.cov(feats, rowvar=False), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        feature_stats(images.astype(np.float32), untrained)


def test_reference_stats_are_cached(tmp_path, untrained, monkeypatch):
    from epsscale.data.images import save_npz

    data = save_npz(tmp_path / "ref.npz", random_images(20))
    first = reference_stats(untrained, str(data), cache_dir=tmp_path / "cache")
    cached = list((tmp_path / "cache").glob("*.npz"))
    assert len(cached) == 1 and "fmnist-test-random" in cached[0].name

    def boom(*a, **k):
        raise AssertionError("statistics recomputed instead of read from the cache")

    monkeypatch.setattr(F, "feature_stats", boom)
    second = reference_stats(untrained, str(data), cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(first.cov, second.cov)
    with pytest.raises(ValueError, match="unknown dataset"):
        reference_stats(untrained, "cifar-10", cache_dir=tmp_path / "cache")


def test_reference_stats_keys_tell_apart_weights_and_data_copies(tmp_path, monkeypatch):
    from epsscale.data.images import save_npz
    from epsscale.metrics.features import _dataset_key

    data = str(save_npz(tmp_path / "ref.npz", random_images(20)))
    # Two networks built in memory (no weights file): each gets its own statistics.
    torch.manual_seed(0)
    a = ClassifierFeatures(FashionMNISTClassifier())
    torch.manual_seed(1)
    b = ClassifierFeatures(FashionMNISTClassifier())
    sa = reference_stats(a, data, cache_dir=tmp_path / "cache")
    sb = reference_stats(b, data, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2 and not np.array_equal(sa.mean, sb.mean)
    # Fashion-MNIST from another folder is keyed by that folder's files, the Debian copy by its name.
    monkeypatch.delenv("EPSSCALE_FASHION_MNIST", raising=False)
    assert _dataset_key("fashion-mnist-test") == "fashion-mnist-test"
    copy = tmp_path / "fm"
    copy.mkdir()
    (copy / "t10k-images-idx3-ubyte.gz").write_bytes(b"x")
    monkeypatch.setenv("EPSSCALE_FASHION_MNIST", str(copy))
    first = _dataset_key("fashion-mnist-test")
    assert first.startswith("fashion-mnist-test-") and first != "fashion-mnist-test"
    (copy / "t10k-images-idx3-ubyte.gz").write_bytes(b"xy")
    assert _dataset_key("fashion-mnist-test") != first


@pytest.mark.skipif(
    not (FMNIST_WEIGHTS.is_file() and FMNIST_TRAIN_STATS.is_file()), reason="no shipped statistics"
)
def test_shipped_train_stats_match_shipped_weights(monkeypatch):
    monkeypatch.setattr(F, "feature_stats", lambda *a, **k: pytest.fail("recomputed"))
    stats = reference_stats(load_fmnist_extractor())
    assert isinstance(stats, FeatureStats) and stats.count == 60000 and stats.dim == 128


# ----------------------------------------------------------------------------------------------
# FID Inception.


@pytest.fixture(scope="module")
def inception():
    torch.manual_seed(0)
    return InceptionV3Features()


def fixture_keys() -> dict[str, tuple[int, ...]]:
    keys = {}
    for line in (FIXTURES / "inception_keys.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, shape = line.split()
            keys[name] = tuple(int(s) for s in shape.split(","))
    return keys


def test_inception_state_dict_matches_pytorch_fid_keys(inception):
    ours = {k: tuple(v.shape) for k, v in inception.state_dict().items() if not k.endswith("num_batches_tracked")}
    expected = fixture_keys()
    assert len(expected) == 472
    assert sorted(ours) == sorted(expected)
    assert ours == expected
    assert sum(int(np.prod(s)) for s in expected.values()) == 23_885_392


def test_inception_forward_random_init(inception):
    out = inception(torch.from_numpy(random_images(2, size=32, channels=3)))
    assert out.shape == (2, 2048) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and (out >= 0).all()  # pool3 follows a ReLU
    grey = torch.from_numpy(random_images(1, size=28, channels=1))
    torch.testing.assert_close(inception(grey), inception(grey.expand(-1, -1, -1, 3).contiguous()))


def test_inception_missing_weights_message(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    with pytest.raises(FileNotFoundError) as e:
        find_inception_weights()
    msg = str(e.value)
    assert "\n" not in msg
    assert str(tmp_path / "th" / "hub" / "checkpoints" / INCEPTION_WEIGHTS_NAME) in msg
    assert INCEPTION_WEIGHTS_URL in msg and "--inception PATH" in msg
    with pytest.raises(FileNotFoundError, match="elsewhere.pth"):
        load_inception_extractor(tmp_path / "elsewhere.pth")


def test_inception_weights_load_and_validate(tmp_path, inception):
    state = {k: v for k, v in inception.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "w.pth")
    net = InceptionV3Features().load_weights(tmp_path / "w.pth")
    for k, v in inception.state_dict().items():
        torch.testing.assert_close(net.state_dict()[k], v)
    torch.save({"fc.weight": state["fc.weight"]}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="not the FID Inception weights"):
        InceptionV3Features().load_weights(tmp_path / "partial.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(ValueError, match="cannot read Inception weights"):
        InceptionV3Features().load_weights(tmp_path / "junk.pth")


@pytest.mark.skipif(not HUB_INCEPTION.is_file(), reason=f"{HUB_INCEPTION} not on disk")
def test_real_inception_weights():
    raw = torch.load(HUB_INCEPTION, map_location="cpu", weights_only=True)
    file_keys = {k: tuple(v.shape) for k, v in raw.items() if not k.endswith("num_batches_tracked")}
    assert file_keys == fixture_keys()
    net = load_inception_extractor()
    feats = net(torch.from_numpy(random_images(2, size=64, channels=3)))
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all()
