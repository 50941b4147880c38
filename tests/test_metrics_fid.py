"""FID/KID: our implementation against torchmetrics and scipy on the same features; caching; Inception loading."""

import numpy as np
import pytest
import scipy.linalg
import torch
from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3
from torchmetrics.image.kid import KernelInceptionDistance

from dreampainter.errors import CheckpointMismatchError, MissingFileError
from dreampainter.evaluation.backbones import ImageFeatureExtractor, load_inception
from dreampainter.evaluation.batch import EvalBatch
from dreampainter.evaluation.fid import (
    FeatureCache,
    ImageQualityMetric,
    fid_from_features,
    frechet_distance,
    gaussian_statistics,
    kernel_inception_distance,
    polynomial_mmd,
)
from dreampainter.toy.backbones import TinyFeatureNet, save_random_inception


class FeaturesAsImages(torch.nn.Module):
    """Feeds given feature rows through torchmetrics unchanged (its ``imgs`` are our features)."""

    def __init__(self, dim):
        super().__init__()
        self.num_features = dim

    def forward(self, x):
        return x


def gaussian_sets(seed=0, n_real=40, n_fake=30, dim=6):
    rng = np.random.default_rng(seed)
    real = rng.normal(size=(n_real, dim)) @ rng.normal(size=(dim, dim))
    fake = rng.normal(loc=0.5, size=(n_fake, dim)) @ rng.normal(size=(dim, dim))
    return real, fake


def scipy_fid(real, fake):
    mu1, mu2 = real.mean(0), fake.mean(0)
    s1, s2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_frechet_distance_matches_scipy_sqrtm_and_closed_form():
    real, fake = gaussian_sets()
    assert fid_from_features(real, fake) == pytest.approx(scipy_fid(real, fake), rel=1e-7)
    # Diagonal covariances: tr sqrt(S1 S2) = sum sqrt(s1_i s2_i).
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 1.0, 1.0])
    expected = 1 + 0 + 4 + (1 + 4 + 9) + (4 + 1 + 1) - 2 * (2 + 2 + 3)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_fid_equals_torchmetrics_on_the_same_features():
    real, fake = gaussian_sets(seed=1, n_real=25, n_fake=25, dim=8)
    reference = FrechetInceptionDistance(feature=FeaturesAsImages(8), normalize=True)
    reference.update(torch.from_numpy(real), real=True)
    reference.update(torch.from_numpy(fake), real=False)
    assert fid_from_features(real, fake) == pytest.approx(float(reference.compute()), rel=1e-6)
    mean, cov = gaussian_statistics(real)
    assert np.allclose(cov, np.cov(real, rowvar=False))


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save")
def test_kid_equals_torchmetrics_and_hand_computed_mmd():
    real, fake = gaussian_sets(seed=2, n_real=20, n_fake=20, dim=5)
    reference = KernelInceptionDistance(
        feature=FeaturesAsImages(5), subsets=3, subset_size=20, normalize=True
    )
    reference.update(torch.from_numpy(real), real=True)
    reference.update(torch.from_numpy(fake), real=False)
    expected_mean, expected_std = reference.compute()
    mean, std, size = kernel_inception_distance(real, fake, subsets=3, subset_size=1000)
    assert size == 20
    assert mean == pytest.approx(float(expected_mean), rel=1e-6)
    assert std == pytest.approx(float(expected_std), abs=1e-9)

    # Hand-computed unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3 on a 1-d case.
    x, y = np.array([[0.0], [1.0], [2.0]]), np.array([[1.0], [3.0], [-1.0]])

    def k(a, b):
        return (a * b + 1.0) ** 3

    within = sum(k(a, b) for i, a in enumerate(x[:, 0]) for j, b in enumerate(x[:, 0]) if i != j)
    within += sum(k(a, b) for i, a in enumerate(y[:, 0]) for j, b in enumerate(y[:, 0]) if i != j)
    across = sum(k(a, b) for a in x[:, 0] for b in y[:, 0])
    assert polynomial_mmd(x, y) == pytest.approx(within / 6 - 2 * across / 9)


def test_kid_subsets_are_seeded_and_smaller_than_the_sets():
    real, fake = gaussian_sets(seed=3, n_real=30, n_fake=24, dim=4)
    first = kernel_inception_distance(real, fake, subsets=10, subset_size=10, seed=5)
    assert first == kernel_inception_distance(real, fake, subsets=10, subset_size=10, seed=5)
    assert first[2] == 10 and first[1] > 0


def toy_batch(keys, seed):
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (24, 24, 3), dtype=np.uint8) for _ in keys]
    photos = [np.clip(image.astype(int) + 40, 0, 255).astype(np.uint8) for image in images]
    mask = np.zeros((24, 24), np.uint8)
    return EvalBatch.from_lists(keys, images, images, photos, [mask] * len(keys), photos)


class CountingNet(TinyFeatureNet):
    """A tiny feature net that counts how many images it has encoded."""

    def __init__(self):
        super().__init__()
        self.seen = 0

    def forward(self, images):
        self.seen += images.shape[0]
        return super().forward(images)


def test_image_quality_metric_matches_direct_features_caches_real_and_merges(tmp_path):
    net = CountingNet()
    extractor = ImageFeatureExtractor(net, name="tiny")
    batches = [toy_batch([f"k{i}" for i in range(4)], 0), toy_batch([f"k{i}" for i in range(4, 7)], 1)]
    metric = ImageQualityMetric(extractor, split="bench", cache_dir=tmp_path, progress=False)
    for batch in batches:
        assert metric.update(batch) == [{}] * len(batch)
    values = metric.compute()
    samples = sorted((s for b in batches for s in b), key=lambda s: s.key)
    real = extractor.extract([s.photo for s in samples])
    fake = extractor.extract([s.composited for s in samples])
    assert values["fid"] == pytest.approx(fid_from_features(real, fake), rel=1e-9)
    assert values["kid_mean"] == pytest.approx(kernel_inception_distance(real, fake)[0], rel=1e-9)
    assert values["fid_real_images"] == 7

    # A second run on the same split reads the real features from the cache instead of encoding them.
    cached = FeatureCache(tmp_path, "bench", next(iter(tmp_path.glob("*.npz"))).stem.split("--")[1])
    assert sorted(cached.load()) == [f"k{i}" for i in range(7)]
    net.seen = 0
    again = ImageQualityMetric(extractor, split="bench", cache_dir=tmp_path, progress=False)
    for batch in reversed(batches):  # order does not matter either
        again.update(batch)
    assert net.seen == 7  # only the generated images
    assert again.compute()["fid"] == pytest.approx(values["fid"], rel=1e-12)

    # The cache never enlarges the real set (a --limit run is the same with or without it), and a
    # photo that changed under the same key is re-encoded.
    net.seen = 0
    limited = ImageQualityMetric(extractor, split="bench", cache_dir=tmp_path, progress=False)
    limited.update(batches[0])
    assert limited.compute()["fid_real_images"] == 4 and net.seen == 4
    changed = toy_batch([f"k{i}" for i in range(4)], 9)
    limited.update(changed)
    assert net.seen == 8 + 4  # 4 generated + 4 changed photos

    # Two processes' halves merged give the one-process result.
    halves = []
    for batch in batches:
        part = ImageQualityMetric(extractor, progress=False)
        part.update(batch)
        halves.append(part.state_dict())
    merged = ImageQualityMetric(extractor, progress=False)
    merged.merge_state(halves)
    assert merged.compute()["fid"] == pytest.approx(values["fid"], rel=1e-12)


def test_inception_from_local_file_is_torchmetrics_fid_inception(tmp_path):
    path = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    save_random_inception(path)
    extractor = load_inception(path)
    saved = torch.load(path, weights_only=True)
    loaded = extractor.module.state_dict()
    assert set(loaded) == set(saved)
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)  # the file's weights, not a fresh init
    assert type(extractor.module) is NoTrainInceptionV3  # what FrechetInceptionDistance(feature=2048) uses
    assert extractor.module.INPUT_IMAGE_SIZE == 299  # torchmetrics resizes every image to 299 inside
    extractor.module.INPUT_IMAGE_SIZE = 96  # only to keep this CPU test fast: same layers, smaller maps
    images = [np.full((16, 16, 3), value, np.uint8) for value in (0, 200)]
    features = extractor.extract(images, progress=False)
    assert features.shape == (2, 2048) and np.isfinite(features).all()
    assert not np.allclose(features[0], features[1])


def test_missing_or_unsafe_inception_file_is_a_clear_error(tmp_path):
    missing = tmp_path / "pt_inception.pth"
    with pytest.raises(MissingFileError, match="pt_inception.pth") as info:
        load_inception(missing)
    assert "torch-fidelity" in str(info.value)
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"weights": FeaturesAsImages(3)}, unsafe)  # a pickled module, refused by weights_only
    with pytest.raises(CheckpointMismatchError, match="unsafe.pth"):
        load_inception(unsafe)


def test_feature_extractor_gives_each_image_the_same_features_whatever_its_batch():
    extractor = ImageFeatureExtractor(TinyFeatureNet(), name="tiny")
    rng = np.random.default_rng(7)
    small = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
    large = rng.integers(0, 256, (28, 36, 3), dtype=np.uint8)
    alone = extractor.extract([small], progress=False)
    mixed = extractor.extract([large, small, large], progress=False)
    assert np.allclose(mixed[1], alone[0], atol=1e-6)
    assert np.allclose(mixed[0], mixed[2]) and not np.allclose(mixed[0], mixed[1])
