"""visualization_dense_multitask.py: the label palette, colour maps of every task and the colour bar."""

import numpy as np
import pytest

from modeling_taskexpert.visualization_dense_multitask import (
    colorbar,
    colorize_labels,
    label_palette,
    visualize_prediction,
)


def test_palette_and_visualisations():
    palette = label_palette(4)
    assert palette.tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]]  # the PASCAL VOC colours
    assert colorize_labels(np.array([[1, 9]]), 4).tolist() == [[[128, 0, 0], [0, 0, 0]]]
    heat = visualize_prediction("saliency", np.array([[0.0, 1.0]]))
    assert heat[0, 0].tolist() == [68, 1, 84] and heat[0, 1].tolist() == [253, 231, 37]
    normals = visualize_prediction("normals", np.array([[[0.0]], [[0.0]], [[1.0]]]))
    assert normals[0, 0].tolist() == [128, 128, 255]
    bar = colorbar(9, 2)
    assert bar.shape == (2, 9, 3) and bar[0, 0].tolist() == [68, 1, 84] and bar[1, -1].tolist() == [253, 231, 37]
    assert colorbar(1, 1).shape == (1, 1, 3)
    for length, thickness in ((0, 4), (-3, 4), (5, 0)):  # a legend for an image under a few pixels wide
        with pytest.raises(ValueError, match="colorbar needs a positive integer length and thickness"):
            colorbar(length, thickness)
