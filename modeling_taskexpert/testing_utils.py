"""Reference computations for the tests and benchmarks only: slow one-expert-at-a-time versions of the batched expert
layers, with the same weights and outputs. No model file imports this module, so it is not part of the remote code a
checkpoint ships."""

from typing import Optional

import torch
from torch.nn import functional as F


def taskexpert_experts_loop(experts, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """`TaskExpertExperts.forward` computed with one expert at a time: tokens (B, N, C) -> (B, N, E, D)."""
    batch, num_tokens, _ = tokens.shape
    outputs = []
    weight1 = experts.fc1_weight.view(-1, experts.num_experts, experts.dim)
    bias1 = experts.fc1_bias.view(experts.num_experts, experts.dim)
    for e in range(experts.num_experts):
        hidden = tokens @ weight1[:, e] + bias1[e]
        if experts.depthwise is not None:
            channels = slice(e * experts.dim, (e + 1) * experts.dim)
            conv_in = hidden.transpose(1, 2).reshape(batch, experts.dim, *grid)
            hidden = F.conv2d(
                conv_in,
                experts.depthwise.weight[channels],
                experts.depthwise.bias[channels],
                padding=1,
                groups=experts.dim,
            )
            hidden = hidden.flatten(2).transpose(1, 2)
        hidden = F.layer_norm(hidden, (experts.dim,), experts.norm_weight[e], experts.norm_bias[e], eps=experts.eps)
        outputs.append(F.gelu(hidden) @ experts.fc2_weight[e] + experts.fc2_bias[e])
    return torch.stack(outputs, dim=2)


def expert_linear_loop(
    inputs: torch.Tensor, expert_index: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    """Mod-Squad's `expert_linear` with one expert at a time: per-token inputs (N, I), selected experts (N, k),
    weights (E, I, O), biases (E, O) -> (N, k, O)."""
    output = inputs.new_zeros(*expert_index.shape, weight.shape[-1])
    for expert in range(weight.shape[0]):
        token, slot = (expert_index == expert).nonzero(as_tuple=True)
        value = inputs[token] @ weight[expert]
        output[token, slot] = value + bias[expert] if bias is not None else value
    return output
