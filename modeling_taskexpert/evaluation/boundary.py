"""Boundary detection scoring (odsF / oisF) in Python, per image, as counts that add up over a split.

Two modes:

* ``"exact"`` follows the benchmark's offline scorer (SEISM / Piotr Dollar's edges toolbox, see
  protocol section 4.1) step by step: the probability map is quantised to 8 bits as the saved PNGs
  are, edge orientations come from second derivatives of a triangle-smoothed copy, edges are
  non-maximum suppressed (radius 1, border suppression 5, multiplier 1.01), binarised with a strict
  ``> t`` for each of the 101 thresholds, thinned to one pixel, and matched one-to-one to the
  thinned ground-truth boundaries within ``tolerance x image diagonal`` by the BSDS
  ``correspondPixels`` assignment (compiled, from the optional ``pyEdgeEval`` package). That
  assignment builds a random sparse outlier graph; its generator is reset to a fixed seed for
  every threshold, so counts are reproducible (the MATLAB tool seeds it with the time of day, so
  its counts vary by a few pixels between runs). Remaining differences to the MATLAB numbers: the ground
  truth is the dataset's boundary label (thinned) rather than ``seg2bmap`` of the source label
  image (the two lie within one pixel of each other), and the scores are not rounded to three
  decimals.
* ``"approximate"`` is a fast stand-in for periodic evaluation during training: same quantisation,
  orientation and NMS, but no thinning and no one-to-one matching. A predicted pixel is correct
  when a ground-truth boundary pixel lies within the tolerance (a distance transform) and a
  ground-truth pixel is recalled when a predicted pixel above the threshold lies within the
  tolerance (a disk maximum filter). Its results are labelled ``odsF_approx`` / ``oisF_approx``.

Each image gives, per threshold, ``cntR`` (matched ground-truth pixels), ``sumR`` (ground-truth
pixels), ``cntP`` (matched predicted pixels) and ``sumP`` (predicted pixels). ODS sums them over
the split before taking the F-measure; OIS sums the counts of each image's best threshold.
"""

import ctypes
import functools
import importlib
import time
import warnings
from typing import Optional

import numpy as np
from scipy import ndimage

BOUNDARY_MODES = ("exact", "approximate")

# SEISM's parameters/HED.txt: 0.001, 0.01, 0.02, ..., 0.99, 0.999 (101 values).
BOUNDARY_THRESHOLDS = np.concatenate([[0.001], np.arange(1, 100) / 100.0, [0.999]])

# Parameters of the reference edge NMS (edgesNmsMex(E, O, 1, 5, 1.01)) and its orientation smoothing.
NMS_RADIUS = 1
NMS_BORDER = 5
NMS_MULTIPLIER = 1.01
ORIENTATION_SMOOTHING_RADIUS = 4


class BoundaryEvaluationError(ImportError):
    """The exact boundary mode needs the compiled matcher of `pyEdgeEval`."""


class BoundaryTimeLimitError(RuntimeError):
    """The exact scorer passed its time limit on one image."""


# The exact scorer's time limit per image, in seconds. Its matcher's work grows with the number of predicted boundary
# pixels at a threshold times the ground-truth pixels within the matching radius (measured on 2 cores: a random 512x512
# map, 82k candidates against 16k ground-truth pixels at tolerance 0.011, takes 17 s at one threshold; structured maps
# of trained models take about 1-3 s per 128x128 image and tens of seconds per full-size one, over all thresholds).
DEFAULT_EXACT_SECONDS_PER_IMAGE = 300.0


# Seed of the matcher's random outlier graph, reset before every matching so that results are reproducible.
MATCHER_SEED = 1


@functools.lru_cache(maxsize=1)
def _matcher_reseed():
    """A function resetting the random generator of the compiled BSDS matcher, or None if it cannot be found.

    The matcher draws its sparse outlier connections from a static generator seeded with the time of day,
    so the same image can give a few matched pixels more or less from run to run (the MATLAB tool behaves
    the same). Resetting the seed before each matching makes the counts a function of the image alone, hence
    identical however the split is batched or sharded across processes.
    """
    # The package re-exports the function under the extension's name, so look the extension module up directly.
    compiled = importlib.import_module("pyEdgeEval._lib.correspond_pixels")
    try:
        library = ctypes.CDLL(compiled.__file__)
        generator = ctypes.addressof(ctypes.c_char.in_dll(library, "_ZN6Random4randE"))
        reseed = library._ZN6Random6reseedEm  # Random::reseed(uint64) on the static generator Random::rand
    except (OSError, AttributeError, ValueError):
        warnings.warn(
            "Cannot seed the pixel matcher of this pyEdgeEval build: exact boundary counts may vary by a few pixels "
            "between runs, as with the MATLAB tool.",
            stacklevel=3,
        )
        return None
    reseed.argtypes = [ctypes.c_void_p, ctypes.c_uint64]
    reseed.restype = None
    return lambda: reseed(generator, MATCHER_SEED)


def _correspond_pixels():
    try:
        from pyEdgeEval._lib import correspond_pixels
    except ImportError as error:
        raise BoundaryEvaluationError(
            "The exact boundary evaluation (boundary_mode='exact') needs the BSDS pixel matcher of the `pyEdgeEval` "
            "package: install it with `pip install modeling-taskexpert[eval]` (it compiles with g++), or use "
            "boundary_mode='approximate' (clearly labelled `edge/odsF_approx` in the results)."
        ) from error
    reseed = _matcher_reseed()
    if reseed is None:
        return correspond_pixels

    def seeded_correspond_pixels(*args, **kwargs):
        reseed()
        return correspond_pixels(*args, **kwargs)

    return seeded_correspond_pixels


def require_exact_scorer() -> None:
    """Raise `BoundaryEvaluationError` now, rather than at the first image, when the exact mode cannot run."""
    _correspond_pixels()


def quantize_like_png(probabilities: np.ndarray) -> np.ndarray:
    """The reference saves ``uint8(255 * p)`` (truncation) and reads it back divided by 255."""
    return np.floor(probabilities.astype(np.float32) * np.float32(255.0)).astype(np.float64) / 255.0


def triangle_filter(image: np.ndarray, radius: int) -> np.ndarray:
    """Separable triangle filter of integer `radius` >= 1 with symmetric borders (the toolbox's convTri)."""
    kernel = np.concatenate([np.arange(1, radius + 2), np.arange(radius, 0, -1)]).astype(np.float64)
    kernel /= (radius + 1) ** 2
    smoothed = ndimage.convolve1d(image, kernel, axis=0, mode="reflect")
    return ndimage.convolve1d(smoothed, kernel, axis=1, mode="reflect")


def edge_orientation(edges: np.ndarray) -> np.ndarray:
    """Edge normal orientation in [0, pi) from second derivatives of a triangle-smoothed copy."""
    grad_y, grad_x = np.gradient(triangle_filter(edges, ORIENTATION_SMOOTHING_RADIUS))
    _, grad_xx = np.gradient(grad_x)
    grad_yy, grad_xy = np.gradient(grad_y)
    with np.errstate(divide="ignore", invalid="ignore"):  # 0/0 gives NaN: such pixels are never suppressed
        return np.mod(np.arctan(grad_yy * np.sign(-grad_xy) / (grad_xx + 1e-5)), np.pi)


def _bilinear(image: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Bilinear lookup at (x = column, y = row), clamped inside the image as the reference does."""
    height, width = image.shape
    x = np.clip(x, 0, width - 1.001)
    y = np.clip(y, 0, height - 1.001)
    x0 = x.astype(np.int64)
    y0 = y.astype(np.int64)
    dx, dy = x - x0, y - y0
    return (
        image[y0, x0] * (1 - dx) * (1 - dy)
        + image[y0, x0 + 1] * dx * (1 - dy)
        + image[y0 + 1, x0] * (1 - dx) * dy
        + image[y0 + 1, x0 + 1] * dx * dy
    )


def edge_nms(edges: np.ndarray, orientation: Optional[np.ndarray] = None) -> np.ndarray:
    """Non-maximum suppression of a (H, W) edge map along the edge normal, then border suppression.

    A pixel is zeroed when a neighbour at distance 1 along its orientation (bilinearly interpolated)
    is stronger than 1.01 x itself; values within 5 pixels of the image border are scaled down
    linearly towards the border, as in the reference ``edgesNmsMex``.
    """
    edges = np.asarray(edges, dtype=np.float64)
    if orientation is None:
        orientation = edge_orientation(edges)
    height, width = edges.shape
    rows, cols = np.nonzero(edges)
    strength = edges[rows, cols] * NMS_MULTIPLIER
    cos_o, sin_o = np.cos(orientation[rows, cols]), np.sin(orientation[rows, cols])
    keep = np.ones(rows.shape, dtype=bool)
    for step in range(-NMS_RADIUS, NMS_RADIUS + 1):
        if step != 0:
            # Written as "not (e < e0)" like the reference, so that a NaN neighbour does not suppress.
            keep &= ~(strength < _bilinear(edges, cols + step * cos_o, rows + step * sin_o))
    suppressed = np.zeros_like(edges)
    suppressed[rows[keep], cols[keep]] = edges[rows[keep], cols[keep]]

    border = min(NMS_BORDER, width // 2, height // 2)
    if border > 0:
        ramp = np.arange(border, dtype=np.float64) / border
        suppressed[:, :border] *= ramp[None, :]
        suppressed[:, width - border :] *= ramp[None, ::-1]
        suppressed[:border, :] *= ramp[:, None]
        suppressed[height - border :, :] *= ramp[::-1, None]
    return suppressed


def _thin(binary: np.ndarray) -> np.ndarray:
    from skimage.morphology import thin

    return thin(binary)


def _count_exact(
    edges: np.ndarray,
    boundaries: np.ndarray,
    max_distance: float,
    thresholds: np.ndarray,
    time_limit_s: Optional[float] = None,
    image: str = "an image",
):
    correspond_pixels = _correspond_pixels()
    counts = np.zeros((4, len(thresholds)), dtype=np.int64)  # cntR, sumR, cntP, sumP
    counts[1] = boundaries.sum()
    previous = None
    started = time.monotonic()
    for index, threshold in enumerate(thresholds):
        predicted = edges > max(threshold, np.finfo(np.float64).eps)
        if not predicted.any():
            break  # nothing predicted at this threshold, nor at any higher one: all counts stay 0
        if previous is not None and np.array_equal(predicted, previous[0]):
            counts[[0, 2, 3], index] = previous[1]
            continue
        thinned = _thin(predicted)
        elapsed = time.monotonic() - started
        if time_limit_s is not None and elapsed > time_limit_s:
            raise BoundaryTimeLimitError(
                f"The exact boundary scorer passed its limit of {time_limit_s:g} s on {image} ({elapsed:.0f} s, at "
                f"threshold {threshold:.3f} of {len(thresholds)}: {int(thinned.sum())} predicted boundary pixels "
                f"against {int(boundaries.sum())} ground-truth ones; the matcher's work grows with their product). A "
                "noisy or near-constant boundary map makes most pixels candidates. Score it with the approximate "
                "scorer (boundary_mode 'approximate'), or raise the limit (--edge-time-limit, boundary_time_limit)."
            )
        if boundaries.any():
            matched_pred, matched_gt, _, _ = correspond_pixels(
                thinned.astype(np.float64), boundaries.astype(np.float64), max_dist=max_distance
            )
            matched = ((matched_gt > 0).sum(), (matched_pred > 0).sum(), thinned.sum())
        else:
            matched = (0, 0, thinned.sum())
        counts[[0, 2, 3], index] = matched
        previous = (predicted, matched)
    return counts


def _count_approximate(edges: np.ndarray, boundaries: np.ndarray, max_distance: float, thresholds: np.ndarray):
    radius = max_distance * float(np.hypot(*edges.shape))
    counts = np.zeros((4, len(thresholds)), dtype=np.int64)
    counts[1] = boundaries.sum()
    # Per pixel, the index of the highest threshold it exceeds (strict), so one histogram covers all thresholds.
    levels = np.searchsorted(thresholds, edges, side="left")  # number of thresholds < value
    counts[3] = _exceeding_counts(levels, len(thresholds))
    if boundaries.any():
        distance_to_gt = ndimage.distance_transform_edt(~boundaries)
        counts[2] = _exceeding_counts(levels[distance_to_gt <= radius], len(thresholds))
        reach = int(np.floor(radius))
        offsets = np.arange(-reach, reach + 1)
        disk = offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius**2
        nearby_levels = ndimage.maximum_filter(levels, footprint=disk, mode="constant", cval=0)
        counts[0] = _exceeding_counts(nearby_levels[boundaries], len(thresholds))
    return counts


def _exceeding_counts(levels: np.ndarray, num_thresholds: int) -> np.ndarray:
    """counts[k] = number of entries whose level is > k, i.e. whose value exceeds threshold k."""
    histogram = np.bincount(levels.ravel(), minlength=num_thresholds + 1)
    return histogram[::-1].cumsum()[::-1][1:]


def boundary_counts(
    probabilities: np.ndarray,
    boundaries: np.ndarray,
    tolerance: float,
    mode: str = "exact",
    valid: Optional[np.ndarray] = None,
    thresholds: np.ndarray = BOUNDARY_THRESHOLDS,
    time_limit_s: Optional[float] = None,
    image: str = "an image",
) -> np.ndarray:
    """Per-threshold counts of one image: an int64 array (4, T) of cntR, sumR, cntP, sumP.

    Args:
        probabilities: (H, W) boundary probabilities in [0, 1], already cropped to the image.
        boundaries: (H, W) boolean ground-truth boundary map (thinned here).
        tolerance: maximum matching distance as a fraction of the image diagonal.
        mode: "exact" or "approximate" (see the module docstring).
        valid: optional (H, W) boolean map; predictions outside it are discarded after NMS.
        thresholds: increasing thresholds in [0, 1]; a pixel is predicted when its value is > t.
        time_limit_s: the exact scorer's time limit for this image (None: none); past it, `BoundaryTimeLimitError`
            naming `image`.
    """
    if mode not in BOUNDARY_MODES:
        raise ValueError(f"Unknown boundary mode {mode!r}; expected one of {BOUNDARY_MODES}.")
    if min(probabilities.shape) < 2:
        raise ValueError(f"Boundary scoring needs an image region of at least 2 x 2 pixels, got {probabilities.shape}.")
    edges = edge_nms(quantize_like_png(probabilities))
    if valid is not None:
        edges = np.where(valid, edges, 0.0)
    boundaries = _thin(np.asarray(boundaries, dtype=bool))
    if mode == "exact":
        return _count_exact(edges, boundaries, tolerance, thresholds, time_limit_s, image)
    return _count_approximate(edges, boundaries, tolerance, thresholds)


def f_measure(precision: np.ndarray, recall: np.ndarray) -> np.ndarray:
    """2PR / (P + R), 0 where both are 0 (the toolbox's fmeasure)."""
    return 2 * precision * recall / np.maximum(precision + recall, np.finfo(np.float64).eps)


def counts_to_f(counts: np.ndarray) -> np.ndarray:
    """F-measure per column of a (4, ...) array of cntR, sumR, cntP, sumP."""
    eps = np.finfo(np.float64).eps
    recall = counts[0] / np.maximum(counts[1], eps)
    precision = counts[2] / np.maximum(counts[3], eps)
    return f_measure(precision, recall)
