"""FID and KID: what they measure, checked against independent formulas, with small local feature
networks; and the Inception-v3 network read from a local file only (real architecture, random
weights, as no FID weights can be downloaded here).

- Identical sets give ~0, a shifted set a clearly larger value; a slightly different set less
  than a strongly shifted one.
- FID equals the Fréchet distance computed with scipy's matrix square root; KID equals the
  unbiased polynomial-kernel MMD written out in numpy, and works with fewer images than its
  usual subset size of 1000 (also with sets of different sizes), repeatably.
- Bad input: an empty set, one image, a missing or foreign weights file, a pickle that would run
  code: clear errors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import linalg

from pva.errors import PVAError, PVAWeightsError
from pva.measure.image_metrics import fid, image_features, kid, load_inception


def small_extractor(seed: int = 0):
    """A tiny fixed conv net: uint8 [N, 3, H, W] -> [N, 64]."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 4, stride=4),
        torch.nn.Tanh(),
        torch.nn.AdaptiveAvgPool2d(2),
        torch.nn.Flatten(),
    ).eval()
    return lambda x: net(x.float() / 255)


def images(count: int, seed: int, size: int = 48) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    base = torch.nn.functional.interpolate(torch.rand(count, 3, 6, 6, generator=generator), size=(size, size))
    return list(
        (base + 0.1 * torch.rand(count, 3, size, size, generator=generator)).clamp(0, 1).permute(0, 2, 3, 1)
    )


def reference_fid(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * root))


def reference_kid(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3 over the whole sets (one subset)."""
    d, m = a.shape[1], a.shape[0]
    k = lambda x, y: (x @ y.T / d + 1) ** 3  # noqa: E731
    kxx, kyy, kxy = k(a, a), k(b, b), k(a, b)
    off = lambda kk: (kk.sum() - np.trace(kk)) / (m * (m - 1))  # noqa: E731
    return float(off(kxx) + off(kyy) - 2 * kxy.mean())


@pytest.fixture(scope="module")
def sets():
    extract = small_extractor()
    real = images(96, seed=1)  # more images than feature dimensions: full-rank covariances
    near = images(96, seed=2)  # the same kind of picture, other samples
    shifted = [(x * 0.5 + 0.45).clamp(0, 1) for x in near]  # washed out
    return {
        name: image_features(s, extract) for name, s in (("real", real), ("near", near), ("shifted", shifted))
    }


def test_fid_zero_for_identical_sets_and_grows_with_the_shift(sets):
    real, near, shifted = sets["real"], sets["near"], sets["shifted"]
    same, slight, strong = fid(real, real), fid(real, near), fid(real, shifted)
    print(f"\nFID: identical {same:.2e}, other samples {slight:.4f}, washed out {strong:.4f}")
    assert same < 1e-6
    assert strong > 10 * slight > 0


def test_fid_is_the_frechet_distance(sets):
    real, shifted = sets["real"], sets["shifted"]
    assert fid(real, shifted) == pytest.approx(reference_fid(real.numpy(), shifted.numpy()), rel=1e-6)


def test_kid_zero_for_identical_sets_and_grows_with_the_shift(sets):
    real, near, shifted = sets["real"], sets["near"], sets["shifted"]
    (same, _), (slight, _), (strong, _) = kid(real, real), kid(real, near), kid(real, shifted)
    print(
        f"\nKID x 1000: identical {same * 1000:.4f}, other samples {slight * 1000:.4f}, washed out {strong * 1000:.4f}"
    )
    assert abs(same) < 0.05 * strong  # the unbiased estimate is not exactly 0 for a set with itself
    assert strong > 10 * abs(slight)


def test_kid_is_the_unbiased_mmd_with_fewer_images_than_a_subset(sets):
    real, shifted = sets["real"], sets["shifted"]
    assert real.shape[0] < 1000  # below the usual subset size: all images in one subset
    mean, std = kid(real, shifted)
    assert mean == pytest.approx(reference_kid(real.numpy(), shifted.numpy()), rel=1e-9) and std == 0.0
    # sets of different sizes: random subsets of the smaller size, repeatable with the seed
    first, second, other = (
        kid(real, shifted[:10], seed=3),
        kid(real, shifted[:10], seed=3),
        kid(real, shifted[:10], seed=4),
    )
    assert first == second and first != other and first[1] > 0
    assert first[0] == pytest.approx(reference_kid(real.numpy(), shifted.numpy()), rel=0.5)


def test_features_of_mixed_sizes_keep_the_order():
    extract = small_extractor()
    small, large = images(3, seed=5, size=32), images(2, seed=6, size=64)
    mixed = [small[0], large[0], small[1], large[1], small[2]]
    together = image_features(mixed, extract, batch_size=4)
    one_by_one = torch.cat([image_features([x], extract) for x in mixed])
    assert torch.allclose(together, one_by_one)


def test_bad_sets_are_explained():
    extract = small_extractor()
    with pytest.raises(PVAError, match="empty"):
        image_features([], extract, what="results")
    one = image_features(images(1, seed=0), extract)
    two = image_features(images(2, seed=0), extract)
    with pytest.raises(PVAError, match="FID: needs at least 2 result images, got 1"):
        fid(two, one)
    with pytest.raises(PVAError, match="KID: needs at least 2 ground-truth images"):
        kid(one, two)


# -- the Inception network from a local file ---------------------------------------------------
def random_inception_weights(path, seed: int = 0) -> None:
    """A state dict of torch-fidelity's Inception-v3 (the FID network) with random weights: the
    module is built without its download (weights are filled here instead)."""
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    with (
        mock.patch.object(tf_inception, "load_state_dict_from_url", return_value={}),
        mock.patch.object(tf_inception.FeatureExtractorInceptionV3, "load_state_dict"),
    ):
        module = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in module.state_dict().items():
        if name.endswith("running_var") or (name.endswith(".weight") and tensor.dim() == 1):
            state[name] = torch.ones_like(tensor)  # batch-norm variances and scales
        elif tensor.is_floating_point() and tensor.dim() > 1:
            state[name] = torch.randn(tensor.shape, generator=generator) / tensor[0].numel() ** 0.5
        else:
            state[name] = torch.zeros_like(tensor) if tensor.is_floating_point() else tensor.clone()
    torch.save(state, path)


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    random_inception_weights(path)
    return path


def test_inception_from_a_local_file_gives_2048_features(inception_file, tmp_path):
    """The network holds exactly the file's weights (every tensor), its 2048 features are each
    image's own (the same image gives the same features whatever its batch), and they depend on
    the weights and on the image (another file, other images: other features)."""
    network = load_inception(inception_file)
    stored = torch.load(inception_file, weights_only=True)
    loaded = network.state_dict()
    matched = [k for k in stored if any(name.endswith(k) for name in loaded)]
    assert len(matched) == len(stored) > 100
    for key in stored:
        (name,) = [n for n in loaded if n == key or n.endswith("." + key)]
        assert torch.equal(loaded[name].cpu(), stored[key]), key
    pictures = images(3, seed=1, size=96)
    first = image_features(pictures, network)
    assert first.shape == (3, 2048) and first.dtype == torch.float64
    alone = image_features(pictures[2:], network)
    assert torch.allclose(first[2:], alone, rtol=1e-5, atol=1e-7)  # not mixed with its batch
    assert not torch.allclose(first[0], first[1])  # different images, different features
    random_inception_weights(tmp_path / "other.pth", seed=1)
    other = image_features(pictures, load_inception(tmp_path / "other.pth"))
    assert (other - first).abs().max() > 1e-3 * first.abs().max()  # the file's weights are used
    assert fid(first, first) < 1e-6


def test_inception_bad_files(tmp_path, inception_file):
    with pytest.raises(PVAWeightsError, match="not found"):
        load_inception(tmp_path / "missing.pth")
    foreign = tmp_path / "foreign.pth"
    torch.save({"conv.weight": torch.zeros(3, 3)}, foreign)
    with pytest.raises(PVAWeightsError, match="do not fit torch-fidelity's Inception-v3"):
        load_inception(foreign)
    # a pickle that would run code when unpickled (weights_only refuses it)
    evil = tmp_path / "evil.pth"
    marker = tmp_path / "payload-ran"
    torch.save({"weights": torch.zeros(1), "payload": _Payload(marker)}, evil)
    with pytest.raises(PVAWeightsError, match="cannot be read"):
        load_inception(evil)
    assert not marker.exists()


class _Payload:
    """Unpickling this touches a file: what a malicious weights file could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (type(self.marker).touch, (self.marker,))
