"""GrabCut preprocessing: cut a garment out of a cluttered DeepFashion photo, then square it.

DeepFashion's photos are shop and street shots: models, rooms, other garments. The seed
standardised them before training, so that its generator learns garments, not backgrounds:
GrabCut first initialised from the annotated bounding box, then refined with the convex polygon
of the landmarks as foreground. We do the same, then put the cut-out on white (as product
photos are) and centre it in a square, the input every model and embedder here takes.
OpenCV's GrabCut seeds its colour models with k-means; we fix that RNG, so an import gives the
same pixels every run.
"""

from __future__ import annotations

import cv2
import numpy as np

from atelier.catalog.images import to_square

RECT_ITERATIONS = 3  # GrabCut iterations from the bounding box
MASK_ITERATIONS = 2  # further iterations once the landmark polygon is added
SEED = 0
VISIBLE = 0  # DeepFashion landmark visibility: 0 visible, 1 occluded, 2 truncated (cut off)


def segment_garment(
    image_rgb: np.ndarray,
    bbox: tuple[int, int, int, int],
    landmarks: np.ndarray | None = None,
    rect_iterations: int = RECT_ITERATIONS,
    mask_iterations: int = MASK_ITERATIONS,
    seed: int = SEED,
) -> np.ndarray:
    """Foreground mask (bool, H x W) of the garment inside `bbox` = (x_1, y_1, x_2, y_2).

    `landmarks`: rows (visibility, x, y) as DeepFashion publishes them (only visible ones are
    used), or rows (x, y) all taken as visible. The box pass keeps whatever inside the box
    differs from its surroundings, clutter too; with three or more visible landmarks GrabCut
    runs again from a mask: their convex hull probable foreground, the rest of what the box
    pass kept probable background, what it rejected definite background.
    Where GrabCut finds nothing (or cannot run: a box with no background around it), the mask
    is the box itself, so a caller always gets a non-empty region.
    """
    image = np.ascontiguousarray(image_rgb, dtype=np.uint8)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"segment_garment takes an RGB image (H, W, 3), got shape {image.shape}")
    h, w = image.shape[:2]
    x1, y1, x2, y2 = _clip_box(bbox, w, h)
    box_mask = np.zeros((h, w), dtype=bool)
    box_mask[y1:y2, x1:x2] = True
    # GrabCut learns the background from outside the rectangle: leave it a 1 px border at least.
    rx1, ry1, rx2, ry2 = max(x1, 1), max(y1, 1), min(x2, w - 1), min(y2, h - 1)
    if rx2 - rx1 < 2 or ry2 - ry1 < 2:
        return box_mask

    cv2.setRNGSeed(seed)
    mask = np.zeros((h, w), dtype=np.uint8)
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    try:
        cv2.grabCut(image, mask, (rx1, ry1, rx2 - rx1, ry2 - ry1), bgd, fgd, rect_iterations, cv2.GC_INIT_WITH_RECT)
    except cv2.error:
        return box_mask  # e.g. too few background pixels for its colour models
    kept = (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)
    polygon = _landmark_polygon(landmarks, w, h) & box_mask
    if polygon.any() and mask_iterations > 0:
        # The box pass keeps anything unlike the box's border, clutter included. Refine:
        # inside the polygon is probable garment; what the box pass kept outside it must win
        # its place again (probable background); where both say background, it is.
        mask[box_mask & ~kept] = cv2.GC_BGD
        mask[box_mask & kept] = cv2.GC_PR_BGD
        mask[polygon] = cv2.GC_PR_FGD
        cv2.setRNGSeed(seed)
        try:
            cv2.grabCut(image, mask, None, bgd, fgd, mask_iterations, cv2.GC_INIT_WITH_MASK)
            kept = (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)
        except cv2.error:
            pass  # keep the box pass's answer
    return kept if kept.any() else box_mask


def crop_centre_resize(image: np.ndarray, mask: np.ndarray, size: int, background: int = 255) -> np.ndarray:
    """Background to `background`, crop to the mask's bounding box, centre in a size x size square.

    Returns uint8 (size, size, 3); the aspect ratio is kept (`to_square` pads the short side).
    """
    image = np.asarray(image, dtype=np.uint8)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} does not match image shape {image.shape[:2]}")
    if not mask.any():
        raise ValueError("mask is empty: nothing to crop")
    ys, xs = np.nonzero(mask)
    top, bottom, left, right = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    cut = np.where(mask[:, :, None], image, np.uint8(background))[top:bottom, left:right]
    return to_square(np.ascontiguousarray(cut), size, pad_value=background)


def _clip_box(bbox: tuple[int, int, int, int], w: int, h: int) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = (int(v) for v in bbox)
    x1, x2 = sorted((min(max(x1, 0), w), min(max(x2, 0), w)))
    y1, y2 = sorted((min(max(y1, 0), h), min(max(y2, 0), h)))
    if x2 - x1 < 1 or y2 - y1 < 1:
        raise ValueError(f"bounding box {tuple(bbox)} holds no pixel of a {w}x{h} image")
    return x1, y1, x2, y2


def _landmark_polygon(landmarks: np.ndarray | None, w: int, h: int) -> np.ndarray:
    """Filled convex hull (bool H x W) of the visible landmarks; all False under 3 points."""
    polygon = np.zeros((h, w), dtype=np.uint8)
    if landmarks is None:
        return polygon.astype(bool)
    points = np.asarray(landmarks)
    if points.ndim != 2 or points.shape[1] not in (2, 3):
        raise ValueError(f"landmarks must be rows (visibility, x, y) or (x, y), got shape {points.shape}")
    if points.shape[1] == 3:
        points = points[points[:, 0] == VISIBLE, 1:]
    points = points.astype(np.int32)
    points = points[(points[:, 0] >= 0) & (points[:, 0] < w) & (points[:, 1] >= 0) & (points[:, 1] < h)]
    if len(points) >= 3:
        cv2.fillConvexPoly(polygon, cv2.convexHull(points.reshape(-1, 1, 2)), 1)
    return polygon.astype(bool)
