"""Property-based tests (hypothesis): flips, normals and ignore pixels through the transforms; metrics that do not
depend on how the samples are batched."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modeling_taskexpert.data.transforms import flip_horizontal, rescale
from modeling_taskexpert.evaluation import DenseMultiTaskEvaluator
from modeling_taskexpert.task_definitions import IGNORE_INDEX

FAST = settings(max_examples=30, deadline=None)
shapes = st.tuples(st.integers(2, 12), st.integers(2, 12))


@st.composite
def samples(draw):
    height, width = draw(shapes)
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, 3)).astype(np.float32)
    semseg = rng.choice(np.array([0, 1, 2, IGNORE_INDEX], np.uint8), (height, width))
    normals = rng.normal(size=(height, width, 3)).astype(np.float32)
    normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
    return image, {
        "semseg": semseg,
        "normals": normals,
        "depth": rng.uniform(0.5, 5, (height, width)).astype(np.float32),
    }


@FAST
@given(samples())
def test_flipping_twice_is_the_identity(sample):
    image, labels = sample
    twice_image, twice = flip_horizontal(*flip_horizontal(image, labels))
    np.testing.assert_array_equal(twice_image, image)
    for task in labels:
        np.testing.assert_array_equal(twice[task], labels[task])


@FAST
@given(samples(), st.floats(0.5, 2.0))
def test_normals_stay_unit_and_ignore_pixels_stay_ignored(sample, scale):
    image, labels = sample
    flipped_image, flipped = flip_horizontal(image, labels)
    scaled_image, scaled = rescale(flipped_image, flipped, scale)
    norms = np.linalg.norm(scaled["normals"], axis=-1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
    # Nearest resizing only copies labels: no ignore pixel becomes a class and no class id is invented.
    assert set(np.unique(scaled["semseg"])) <= set(np.unique(labels["semseg"]))
    if IGNORE_INDEX not in labels["semseg"]:
        assert IGNORE_INDEX not in scaled["semseg"]


@FAST
@given(st.integers(2, 8), st.integers(0, 2**16), st.data())
def test_metrics_do_not_depend_on_batching_or_order(num_samples, seed, data):
    generator = torch.Generator().manual_seed(seed)
    labels = {
        "semseg": torch.randint(0, 3, (num_samples, 6, 5), generator=generator),
        "depth": torch.rand(num_samples, 6, 5, generator=generator) * 4,  # some pixels near 0 count as invalid
        "normals": torch.nn.functional.normalize(torch.randn(num_samples, 3, 6, 5, generator=generator), dim=1),
    }
    labels["semseg"][labels["semseg"] == 2] = IGNORE_INDEX
    predictions = {
        "semseg": torch.randint(0, 3, (num_samples, 6, 5), generator=generator),
        "depth": torch.rand(num_samples, 6, 5, generator=generator) * 4,
        "normals": torch.nn.functional.normalize(torch.randn(num_samples, 3, 6, 5, generator=generator), dim=1),
    }
    order = data.draw(st.permutations(range(num_samples)))
    cut = data.draw(st.integers(1, num_samples))

    def evaluate(batches):
        evaluator = DenseMultiTaskEvaluator(tasks=["semseg", "depth", "normals"], num_classes={"semseg": 3})
        for indices in batches:
            evaluator.update(
                {t: v[indices] for t, v in predictions.items()}, {t: v[indices] for t, v in labels.items()}
            )
        return evaluator.compute(sync=False)

    whole = evaluate([list(range(num_samples))])
    split = evaluate([order[:cut], order[cut:]] if cut < num_samples else [order])
    assert whole.keys() == split.keys()
    for key in whole:
        assert np.isclose(whole[key], split[key], rtol=1e-5, atol=1e-6, equal_nan=True), key
