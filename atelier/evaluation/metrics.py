"""Sample-quality metrics for generative models: Inception Score, FID and KID (numpy + scipy).

- Inception Score (Salimans et al. 2016, "Improved Techniques for Training GANs"):
  exp(E_x KL(p(y|x) || p(y))) from a classifier's class probabilities, p(y) being the mean
  prediction of a split; high when each image is confidently one class and the classes are
  spread. Reported as mean and std over splits. It needs no real images, only the classifier.
- Frechet Inception Distance (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update
  Rule Converge to a Local Nash Equilibrium"): the Frechet distance between Gaussians fitted to
  real and generated Inception features, ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).
  Computed as pytorch-fid's `calculate_frechet_distance` does, so the numbers agree with it.
- Kernel Inception Distance (Binkowski et al. 2018, "Demystifying MMD GANs"): the unbiased
  MMD^2 between the feature sets under the cubic kernel k(x, y) = (x.y / d + 1)^3, averaged
  over random subsets. Unbiased, so it can go below 0 and has no small-sample bias (FID does).
- Precision and recall in feature space (Kynkaanniemi et al. 2019, "Improved Precision and
  Recall Metric for Assessing Generative Models"): each set's manifold is the union of balls
  around its points, each ball reaching the point's k-th nearest neighbour in its own set;
  precision is the share of generated points inside the real manifold (fidelity), recall the
  share of real points inside the generated one (diversity). Density and coverage (Naeem et
  al. 2020) come from the same distances: density counts how many real balls hold each
  generated point (divided by k, so 1 for a model that matches the real distribution), coverage
  is the share of real balls that hold at least one generated point. FID mixes fidelity and
  diversity into one number; these tell them apart.

The Inception features themselves come from `atelier.evaluation.fid_inception`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.special import xlogy

#  How far a row of class probabilities may sum away from 1 (float32 softmax outputs do drift).
PROBABILITY_SUM_TOLERANCE = 1e-3


def inception_score(probabilities: np.ndarray, splits: int = 5) -> tuple[float, float]:
    """Inception Score (mean, std over `splits` consecutive splits) of class probabilities (N, C).

    Per split, p(y) is the split's mean row and the score is exp(mean_x KL(p(y|x) || p(y))),
    with 0 log 0 = 0, so exact zeros (one-hot rows) are fine. The std uses ddof=0, as the
    original implementation does.
    """
    p = np.asarray(probabilities)
    if p.ndim != 2:
        raise ValueError(f"probabilities must be a 2-D array (images, classes), got shape {p.shape}")
    if not np.issubdtype(p.dtype, np.number) or np.issubdtype(p.dtype, np.complexfloating):
        raise ValueError(f"probabilities must be real numbers, got dtype {p.dtype}")
    if isinstance(splits, bool) or not isinstance(splits, (int, np.integer)) or splits < 1:
        raise ValueError(f"splits must be a positive integer, got {splits!r}")
    n, classes = p.shape
    if classes < 1:
        raise ValueError("probabilities has no classes (0 columns)")
    if n < splits:
        raise ValueError(f"{n} rows of probabilities cannot be cut into {splits} splits (need at least one row each)")
    p = p.astype(np.float64)
    if not np.isfinite(p).all():
        raise ValueError("probabilities contain NaN or infinity")
    if (p < 0).any():
        raise ValueError(f"probabilities must be non-negative, found a minimum of {p.min():g}")
    sums = p.sum(axis=1)
    worst = int(np.argmax(np.abs(sums - 1.0)))
    if abs(sums[worst] - 1.0) > PROBABILITY_SUM_TOLERANCE:
        raise ValueError(f"each row of probabilities must sum to 1 (within {PROBABILITY_SUM_TOLERANCE:g}); "
                         f"row {worst} sums to {sums[worst]:.6g} (pass softmax outputs, not logits)")

    scores = []
    for k in range(splits):
        part = p[k * n // splits:(k + 1) * n // splits]
        marginal = part.mean(axis=0, keepdims=True)
        # KL(p || marginal) per row; marginal > 0 wherever p > 0, and xlogy(0, .) = 0.
        kl = (xlogy(part, part) - xlogy(part, marginal)).sum(axis=1)
        scores.append(float(np.exp(kl.mean())))
    return float(np.mean(scores)), float(np.std(scores))


def _as_features(name: str, features: np.ndarray, minimum_rows: int = 2) -> np.ndarray:
    x = np.asarray(features)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (samples, dims), got shape {x.shape}")
    if x.shape[0] < minimum_rows:
        raise ValueError(f"{name} needs at least {minimum_rows} samples, got {x.shape[0]}")
    if x.shape[1] < 1:
        raise ValueError(f"{name} has no feature dimensions")
    x = x.astype(np.float64)
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinity")
    return x


@dataclass
class FeatureStatistics:
    """The Gaussian FID fits to a feature set: mean (d,), covariance (d, d), number of samples."""

    mean: np.ndarray
    covariance: np.ndarray
    count: int

    def __post_init__(self) -> None:
        self.mean = np.asarray(self.mean, dtype=np.float64)
        self.covariance = np.asarray(self.covariance, dtype=np.float64)
        self.count = int(self.count)
        if self.mean.ndim != 1:
            raise ValueError(f"mean must be 1-D, got shape {self.mean.shape}")
        d = self.mean.shape[0]
        if self.covariance.shape != (d, d):
            raise ValueError(f"covariance must be ({d}, {d}) to match the mean, got {self.covariance.shape}")
        if self.count < 2:
            raise ValueError(f"count must be at least 2 (a covariance needs two samples), got {self.count}")

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @classmethod
    def of(cls, features: np.ndarray) -> FeatureStatistics:
        """Mean and unbiased covariance (rowvar=False, ddof=1, as np.cov) of (N, d) features, in float64."""
        x = _as_features("features", features)
        return cls(mean=x.mean(axis=0), covariance=np.cov(x, rowvar=False, ddof=1).reshape(x.shape[1], x.shape[1]),
                   count=x.shape[0])

    def save(self, path: str | os.PathLike) -> Path:
        """Write an .npz (mean, covariance, count) at exactly `path`, atomically (temp file + rename)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                np.savez(f, mean=self.mean, covariance=self.covariance, count=np.int64(self.count))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStatistics:
        with np.load(Path(path), allow_pickle=False) as data:
            missing = {"mean", "covariance", "count"} - set(data.files)
            if missing:
                raise ValueError(f"{path} is not a FeatureStatistics file: it lacks {sorted(missing)}")
            return cls(mean=data["mean"], covariance=data["covariance"], count=int(data["count"]))


def _symmetric_sqrt(matrix: np.ndarray) -> np.ndarray:
    """The PSD square root of a symmetric PSD matrix (negative rounding noise clipped to 0)."""
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(a: FeatureStatistics, b: FeatureStatistics) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a) + Tr(S_b) - 2 Tr(sqrtm(S_a S_b)), the quantity pytorch-fid computes.

    Tr(sqrtm(S_a S_b)) is taken as the sum of the square roots of the eigenvalues of the
    symmetric PSD matrix sqrt(S_a) S_b sqrt(S_a), which has the same eigenvalues as S_a S_b:
    two symmetric eigendecompositions instead of a general matrix square root, about 4x faster
    at 2048-d, real by construction, and defined for singular covariances (fewer samples than
    dimensions) without pytorch-fid's eps retry. Agreement with pytorch-fid is tested.
    """
    if a.dim != b.dim:
        raise ValueError(f"feature statistics of different dimensions: {a.dim} and {b.dim}")
    diff = a.mean - b.mean
    root = _symmetric_sqrt(a.covariance)
    product = root @ b.covariance @ root
    eigenvalues = np.linalg.eigvalsh((product + product.T) / 2.0)
    trace_covmean = float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())
    return float(diff @ diff + np.trace(a.covariance) + np.trace(b.covariance) - 2.0 * trace_covmean)


def frechet_distance_of(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID straight from two (N, d) feature arrays."""
    return frechet_distance(FeatureStatistics.of(features_a), FeatureStatistics.of(features_b))


def _cubic_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased MMD^2 between two samples (m, d) and (n, d) under k(x, y) = (x.y / d + 1)^3.

    The within-sample means leave out the diagonal k(x_i, x_i) terms (a U-statistic), so the
    expectation is exactly MMD^2 and it is 0 on average, sometimes negative, for equal distributions.
    """
    x = _as_features("a", a)
    y = _as_features("b", b)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"a and b have different feature dimensions: {x.shape[1]} and {y.shape[1]}")
    m, n = x.shape[0], y.shape[0]
    kxx = _cubic_kernel(x, x)
    kyy = _cubic_kernel(y, y)
    kxy = _cubic_kernel(x, y)
    within_x = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    within_y = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(within_x + within_y - 2.0 * kxy.mean())


def kernel_inception_distance(a: np.ndarray, b: np.ndarray, subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """KID: mean and std (ddof=0) of `mmd2_unbiased` over `subsets` random subsets.

    Each subset draws min(subset_size, len(a), len(b)) rows without replacement from each set,
    with numpy's default_rng(seed), so a seed gives the same result every time.
    """
    x = _as_features("a", a)
    y = _as_features("b", b)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"a and b have different feature dimensions: {x.shape[1]} and {y.shape[1]}")
    if isinstance(subsets, bool) or not isinstance(subsets, (int, np.integer)) or subsets < 1:
        raise ValueError(f"subsets must be a positive integer, got {subsets!r}")
    if isinstance(subset_size, bool) or not isinstance(subset_size, (int, np.integer)) or subset_size < 2:
        raise ValueError(f"subset_size must be an integer >= 2, got {subset_size!r}")
    size = min(int(subset_size), x.shape[0], y.shape[0])
    rng = np.random.default_rng(seed)
    values = np.empty(subsets)
    for k in range(subsets):
        ia = rng.choice(x.shape[0], size, replace=False)
        ib = rng.choice(y.shape[0], size, replace=False)
        values[k] = mmd2_unbiased(x[ia], y[ib])
    return float(values.mean()), float(values.std())


def _pairwise_distances(a: np.ndarray, b: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """Euclidean distances (len(a), len(b)), a chunk of rows at a time (bounded memory per step)."""
    b_sq = (b * b).sum(axis=1)
    out = np.empty((len(a), len(b)))
    for start in range(0, len(a), chunk):
        x = a[start : start + chunk]
        squared = (x * x).sum(axis=1)[:, None] - 2 * x @ b.T + b_sq[None]
        out[start : start + chunk] = np.sqrt(np.maximum(squared, 0.0))
    return out


def _radii(x: np.ndarray, k: int) -> np.ndarray:
    """Distance from each row to its k-th nearest other row of the same set."""
    distances = _pairwise_distances(x, x)
    np.fill_diagonal(distances, np.inf)
    return np.partition(distances, k - 1, axis=1)[:, k - 1]


def precision_recall(real: np.ndarray, generated: np.ndarray, k: int = 3) -> dict[str, float]:
    """Precision, recall, density and coverage of `generated` against `real` features (see above)."""
    real = _as_features("real features", real, minimum_rows=k + 1)
    generated = _as_features("generated features", generated, minimum_rows=k + 1)
    if real.shape[1] != generated.shape[1]:
        raise ValueError(f"feature dimensions differ: real {real.shape[1]}, generated {generated.shape[1]}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    real_radii, generated_radii = _radii(real, k), _radii(generated, k)
    cross = _pairwise_distances(generated, real)  # (generated, real)
    inside_real = cross <= real_radii[None, :]  # generated point i lies in real ball j
    inside_generated = cross <= generated_radii[:, None]  # real point j lies in generated ball i
    return {
        "precision": float(inside_real.any(axis=1).mean()),
        "recall": float(inside_generated.any(axis=0).mean()),
        "density": float(inside_real.sum(axis=1).mean() / k),
        "coverage": float(inside_real.any(axis=0).mean()),
    }

