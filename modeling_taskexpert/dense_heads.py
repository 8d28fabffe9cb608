"""Light dense prediction heads, shared by every model type of this package."""

import math

import torch
from torch import nn
from torch.nn import functional as F


def make_norm2d(kind: str, channels: int) -> nn.Module:
    """A 2-D normalisation layer: "group" (32 groups or fewer), "batch", or "none" (identity)."""
    if kind == "group":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.Identity()


class DenseTaskHead(nn.Module):
    """Token map -> task map: 3x3 conv, norm, GELU at token resolution, 1x1 conv to the task's channels, bilinear up
    to 1/4 of the input, bilinear up to the input size.

    The 1x1 conv runs before the upsampling: both are linear (bilinear weights sum to 1), so the order does not change
    the result, and upsampling the few task channels instead of the hidden ones saves most of the head's time and
    memory."""

    def __init__(self, in_channels: int, hidden_size: int, out_channels: int, norm: str = "group"):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, hidden_size, kernel_size=3, padding=1, bias=norm == "none")
        self.norm = make_norm2d(norm, hidden_size)
        self.classifier = nn.Conv2d(hidden_size, out_channels, kernel_size=1)

    def forward(self, features: torch.Tensor, output_size: tuple[int, int]) -> torch.Tensor:
        if isinstance(self.norm, nn.GroupNorm) and self.norm.num_channels == self.norm.num_groups:
            if features.shape[-2] * features.shape[-1] == 1:
                # Group norm over one value per group has nothing to normalise (torch refuses it).
                raise ValueError(
                    "The input gives a 1x1 token map, too small for the heads' group norm with one channel per group "
                    f"(head_hidden_size={self.norm.num_channels}): give an image of at least two patches, or use a "
                    "head_hidden_size that is a multiple of 64."
                )
        # Channels-last convolutions at token resolution (a no-op when the features are a channels-last view of
        # tokens, as TaskExpert's are); the few-channel logits go back to channels-first for the upsampling.
        features = features.contiguous(memory_format=torch.channels_last)
        logits = self.classifier(F.gelu(self.norm(self.conv(features))))
        quarter = (max(output_size[0] // 4, 1), max(output_size[1] // 4, 1))
        if logits.shape[-2:] != quarter:
            logits = F.interpolate(logits, size=quarter, mode="bilinear", align_corners=False)
        return F.interpolate(logits.contiguous(), size=output_size, mode="bilinear", align_corners=False)


class ImageLevelHead(nn.Module):
    """Token map -> one vector per image (image-level tasks): mean over the token map, LayerNorm, linear layer to the
    task's channels. `output_size` is ignored (the output has no spatial extent): logits (B, C)."""

    def __init__(self, in_channels: int, out_channels: int, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(in_channels, eps=eps)
        self.classifier = nn.Linear(in_channels, out_channels)

    def forward(self, features: torch.Tensor, output_size: tuple[int, int]) -> torch.Tensor:
        return self.classifier(self.norm(features.float().mean(dim=(-2, -1)).to(features.dtype)))
