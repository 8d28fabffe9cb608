"""The earlier module name of `visualization_dense_multitask`, kept for code that imports it."""

from .visualization_dense_multitask import *  # noqa: F403
