"""What the exact boundary scorer costs per image, and what drives it.

Its matcher pairs the predicted boundary pixels of a threshold with the ground-truth pixels within the matching
radius, so its work grows with the number of candidates times the ground truth in reach: a trained model's thin,
structured maps are cheap, a noisy or near-constant map makes nearly every pixel a candidate. Measured at one
threshold (0.5) for random and structured maps at growing sizes (ground truth: a line every 16 rows; NYUD's tolerance
0.011), and over all 101 thresholds for a structured map, the cost of a whole image.
"""

import time

import numpy as np
from scipy import ndimage

from .plan import SuiteContext
from .formatting import table

KEY = "boundary_cost"
TITLE = "The exact boundary scorer's cost per image"
TOLERANCE = 0.011


def _maps(size: int, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    truth = np.zeros((size, size), bool)
    truth[::16, :] = True
    structured = np.clip(
        ndimage.gaussian_filter(truth.astype(float), 1.5) * 2.5 + rng.random((size, size)) * 0.05, 0, 1
    )
    return truth, {"structured": structured, "random": rng.random((size, size))}


def measure(context: SuiteContext) -> dict:
    from modeling_taskexpert.evaluation import boundary

    quick = getattr(context.args, "quick", False)
    sizes = (48, 64) if quick else (128, 256, 384, 512)
    rng = np.random.default_rng(0)
    match = boundary._correspond_pixels()
    rows = []
    for size in sizes:
        truth, maps = _maps(size, rng)
        thinned_truth = boundary._thin(truth)
        radius = TOLERANCE * float(np.hypot(size, size))
        for name, probabilities in maps.items():
            candidates = boundary._thin(boundary.edge_nms(boundary.quantize_like_png(probabilities)) > 0.5)
            started = time.perf_counter()
            match(candidates.astype(float), thinned_truth.astype(float), max_dist=TOLERANCE)
            seconds = time.perf_counter() - started
            in_reach = thinned_truth.sum() * np.pi * radius**2 / (size * size)
            rows.append({"size": size, "map": name, "candidates": int(candidates.sum()),
                         "ground_truth": int(thinned_truth.sum()), "pairs_in_reach": float(candidates.sum() * in_reach),
                         "seconds_one_threshold": seconds})  # fmt: skip
    whole = []
    for size in sizes[:2]:
        truth, maps = _maps(size, rng)
        started = time.perf_counter()
        boundary.boundary_counts(maps["structured"], truth, TOLERANCE, "exact")
        whole.append({"size": size, "seconds_all_thresholds": time.perf_counter() - started})
    return {"tolerance": TOLERANCE, "one_threshold": rows, "whole_image": whole,
            "time_limit_s": boundary.DEFAULT_EXACT_SECONDS_PER_IMAGE}  # fmt: skip


def sections(section: dict, plots: dict[str, str], results: dict) -> list[tuple[str, str]]:
    rows = [[f"{r['size']}²", r["map"], r["candidates"], r["ground_truth"], f"{r['pairs_in_reach'] / 1e3:.0f} k",
             f"{r['seconds_one_threshold']:.3f}"] for r in section["one_threshold"]]  # fmt: skip
    whole = ", ".join(f"{w['size']}² {w['seconds_all_thresholds']:.1f} s" for w in section["whole_image"])
    machine = section.get("measured_on") or results.get("machine", {})
    where = f"Measured {machine.get('date', '')} on {machine.get('cpu_model', 'this machine')}, {machine.get('cpu_count', '?')} cores."
    text = "\n\n".join([
        __doc__.split("\n\n")[1].replace("\n", " "),
        table(["image", "map", "candidate pixels", "ground-truth pixels", "pairs in reach", "seconds (one threshold)"],
              rows),
        f"A whole structured image, all thresholds: {whole}. The time grows faster than the pairs in reach; a random "
        "full-size map costs its one-threshold time at every threshold it has candidates for (about a hundred), so "
        f"the scorer stops an image after {section['time_limit_s']:g} s by default, naming it (`--edge-time-limit`, "
        "`boundary_time_limit`); the approximate scorer costs milliseconds per image whatever the map.",
        where,
    ])  # fmt: skip
    return [(TITLE, text)]
