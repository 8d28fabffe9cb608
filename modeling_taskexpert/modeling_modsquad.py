"""PyTorch Mod-Squad: a ViT with task-routed mixture-of-experts layers and dense task heads.

Data flow for B images and T' requested tasks, as the authors' code computes it (see the config docstring for every
option and the remaining differences):

    patch embedding + class token + position embeddings  ->  tokens (B, L, C), L = 1 + h*w
    stack the batch once per task (task-major, T'*B samples, sample s belongs to task s // B): every task takes its own
    pass through all blocks, batched
    every block:  x = x + task_embedding[t]          (added again before each block)
                  x = x + attention(LN(x));  x = x + mlp(LN(x))     (either may be an MoE layer)
    MoE layer:    router_t(token) -> p = softmax(logits) + 1e-4 (E) -> the k largest p are the gates (not renormalised)
                  MLP experts:       y = sum_j gate_j MLP_{e_j}(x)
                  attention experts: head j = attention(q_{e_j}(x), shared key, shared value); y = sum_j gate_j O_{e_j}(head j)
    final norm, class token dropped  ->  per-task token maps (B, T', C, h, w)  ->  one light dense head per task

Experts are computed in one batched matmul per projection: token slots are sorted by expert into a padded
(E, capacity, .) layout (`ExpertDispatch`), so there is no Python loop over experts.
"""

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn
from torch.nn import functional as F
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import can_return_tuple

from .configuration_modsquad import ModSquadConfig
from .dense_model_utils import (
    DenseMultiTaskModelOutput,
    DenseMultiTaskOutput,
    DenseMultiTaskPreTrainedModel,
    check_pixel_values,
)

# Floor of the learned noise scale of noisy gating (the reference's value).
NOISE_SCALE_FLOOR = 1e-2
# The reference's epsilons: of the mutual-information estimate and inside the z-loss logarithm.
MUTUAL_INFORMATION_EPSILON = 1e-4
Z_LOSS_EPSILON = 1e-4
# Names of the auxiliary routing terms, in the order the MoE layers return them.
AUX_LOSS_NAMES = ("mutual_information", "cv", "switch", "z")


# One output class per level for every model type of this package; the Mod-Squad names are kept for code that
# imports them.
ModSquadModelOutput = DenseMultiTaskModelOutput
ModSquadOutput = DenseMultiTaskOutput


# ---------------------------------------------------------------------------------------------------------------------
# Routing losses (one MoE layer; the model sums them over layers)
# ---------------------------------------------------------------------------------------------------------------------
def mutual_information_loss(
    task_expert_mass: torch.Tensor, num_tokens: int, estimator: str = "reference"
) -> torch.Tensor:
    """Minus the mutual information between tasks and experts of one MoE layer.

    `task_expert_mass` (T, E) holds, per task, the sum over its tokens of the routing probabilities; `num_tokens` is
    the number of routed tokens of all tasks together.

    `"reference"` (the authors' estimate): P(t,e) = mass / (num_tokens + 1e-4), P(t) = sum_e P(t,e) + 1e-4,
    P(e) = sum_t P(t,e) + 1e-4, loss = -sum_{t,e} P(t,e) log(P(t,e) / P(t) / P(e) + 1e-4).
    `"exact"`: the joint normalised to sum 1, loss = -sum P(t,e) log(P(t,e) / (P(t) P(e))) with 0 log 0 = 0.

    Both are about 0 when every task routes like the others and approach -log(min(T, E)) when tasks use disjoint
    experts evenly: minimising makes each task depend on few experts while all experts stay in use.
    """
    mass = task_expert_mass.float()
    if estimator == "reference":
        joint = mass / (num_tokens + MUTUAL_INFORMATION_EPSILON)
        task_marginal = joint.sum(dim=1, keepdim=True) + MUTUAL_INFORMATION_EPSILON
        expert_marginal = joint.sum(dim=0, keepdim=True) + MUTUAL_INFORMATION_EPSILON
        return -(joint * torch.log(joint / task_marginal / expert_marginal + MUTUAL_INFORMATION_EPSILON)).sum()
    if estimator != "exact":
        raise ValueError(f"Unknown mutual-information estimator {estimator!r}; use 'reference' or 'exact'.")
    joint = mass / mass.sum()
    task_marginal = joint.sum(dim=1, keepdim=True)
    expert_marginal = joint.sum(dim=0, keepdim=True)
    tiny = torch.finfo(joint.dtype).tiny  # 0 log 0 = 0, without NaN gradients
    log_ratio = (
        joint.clamp_min(tiny).log() - task_marginal.clamp_min(tiny).log() - expert_marginal.clamp_min(tiny).log()
    )
    return -(joint * log_ratio).sum()


def cv_squared_loss(gates: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation (unbiased variance / (mean^2 + 1e-10)) of the per-expert sums of the gates,
    L1-normalised; `gates` (..., E) with 0 for unselected experts. 0 for a single expert."""
    importance = F.normalize(gates.float().reshape(-1, gates.shape[-1]).sum(dim=0), p=1, dim=0)
    if importance.numel() == 1:
        return importance.new_zeros(())
    return importance.var() / (importance.mean() ** 2 + 1e-10)


def switch_loss(probabilities: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """Switch load-balancing loss E * sum_e P_e f_e, with P the L1-normalised per-expert sums of the routing
    probabilities and f the L1-normalised number of tokens that selected each expert (gate > 0); both (..., E). It is
    1 for even routing."""
    num_experts = probabilities.shape[-1]
    mass = F.normalize(probabilities.float().reshape(-1, num_experts).sum(dim=0), p=1, dim=0)
    frequency = F.normalize((gates.reshape(-1, num_experts) > 0).float().sum(dim=0), p=1, dim=0)
    return (mass * frequency).sum() * num_experts


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss: the mean over tokens of log(sum_e exp(logit_e) + 1e-4)^2, computed without overflow;
    `logits` (..., E)."""
    log_sum_exp = logits.float().logsumexp(dim=-1)
    log_partition = torch.logaddexp(log_sum_exp, log_sum_exp.new_full((), math.log(Z_LOSS_EPSILON)))
    return (log_partition**2).mean()


# ---------------------------------------------------------------------------------------------------------------------
# Batched sparse experts
# ---------------------------------------------------------------------------------------------------------------------
class ExpertDispatch:
    """Groups the token slots of a top-k routing by expert so that all experts run as one batched matmul.

    `expert_index` (N, k) holds the experts each of N tokens selected. The N*k slots are sorted by expert (stable)
    and laid out as (E, capacity, .), capacity being the largest number of slots of one expert; `dispatch` fills
    that layout from per-token or per-slot inputs (padding rows are zero), `combine` and `per_slot` read the expert
    outputs back in token order. The padding costs at most the dense computation (every expert on every token).
    """

    def __init__(self, expert_index: torch.Tensor, num_experts: int):
        self.num_tokens, self.top_k = expert_index.shape
        self.num_experts = num_experts
        flat = expert_index.reshape(-1)
        self.order = flat.argsort(stable=True)
        self.sorted_experts = flat[self.order]
        counts = torch.bincount(flat, minlength=num_experts)
        starts = counts.cumsum(0) - counts
        self.position = torch.arange(flat.numel(), device=flat.device) - starts[self.sorted_experts]
        self.capacity = int(counts.max()) if flat.numel() else 0

    def dispatch(self, inputs: torch.Tensor) -> torch.Tensor:
        """Per-token (N, D) or per-slot (N*k, D) inputs -> (E, capacity, D), slots grouped by expert."""
        rows = self.order // self.top_k if inputs.shape[0] == self.num_tokens else self.order
        grouped = inputs.new_zeros(self.num_experts, self.capacity, inputs.shape[-1])
        return grouped.index_put((self.sorted_experts, self.position), inputs[rows])

    def per_slot(self, grouped: torch.Tensor) -> torch.Tensor:
        """(E, capacity, D) expert outputs -> (N, k, D) in token order."""
        values = grouped[self.sorted_experts, self.position]
        slots = values.new_empty(values.shape).index_copy(0, self.order, values)
        return slots.view(self.num_tokens, self.top_k, -1)

    def combine(self, grouped: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """(E, capacity, D) expert outputs and (N, k) gates -> (N, D): per token, the gate-weighted sum over its k
        experts."""
        return torch.einsum("nkd,nk->nd", self.per_slot(grouped), gates.to(grouped.dtype))


class DenseExpertDispatch:
    """`ExpertDispatch`'s interface without data-dependent shapes, for graph export (ONNX): every expert runs on every
    token (or token slot) and the outputs of the selected experts are read back by gathering. The top-k routing is
    unchanged (same experts, same gates, same outputs up to float rounding); the cost is E/k times the sparse
    computation, the price of a static graph. `expert_dispatch` picks it under `torch.export`."""

    def __init__(self, expert_index: torch.Tensor, num_experts: int):
        self.num_tokens, self.top_k = expert_index.shape
        self.num_experts = num_experts
        self.expert_index = expert_index

    def dispatch(self, inputs: torch.Tensor) -> torch.Tensor:
        """Per-token (N, D) or per-slot (N*k, D) inputs -> (E, N or N*k, D): the same rows for every expert."""
        return inputs.unsqueeze(0).expand(self.num_experts, -1, -1)

    def per_slot(self, grouped: torch.Tensor) -> torch.Tensor:
        """(E, N or N*k, D) outputs of every expert -> (N, k, D): per slot, the output of the expert it selected."""
        rows = torch.arange(grouped.shape[1], device=grouped.device)
        if grouped.shape[1] == self.num_tokens * self.top_k and self.top_k > 1:
            values = grouped[self.expert_index.reshape(-1), rows]  # slot s read from its own row
        else:
            values = grouped[self.expert_index, rows[:, None]]  # per-token rows, read by each of the k slots
        return values.reshape(self.num_tokens, self.top_k, -1)

    def combine(self, grouped: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """As `ExpertDispatch.combine`."""
        return torch.einsum("nkd,nk->nd", self.per_slot(grouped), gates.to(grouped.dtype))


def expert_dispatch(expert_index: torch.Tensor, num_experts: int):
    """The dispatch for this run: grouped sparse computation, or the static dense one while a graph is exported."""
    if torch.compiler.is_exporting():
        return DenseExpertDispatch(expert_index, num_experts)
    return ExpertDispatch(expert_index, num_experts)


# ---------------------------------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------------------------------
class ModSquadEmbeddings(nn.Module):
    """Patch embedding (conv), class token and learned position embeddings, interpolated bicubically to the input
    grid when it differs from the `image_size` grid."""

    def __init__(self, config: ModSquadConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.grid = config.image_size // config.patch_size
        self.patch_embeddings = nn.Conv2d(
            config.num_channels, config.hidden_size, config.patch_size, stride=config.patch_size
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.position_embeddings = nn.Parameter(torch.zeros(1, 1 + self.grid**2, config.hidden_size))

    def position_embeddings_for(self, height: int, width: int) -> torch.Tensor:
        if (height, width) == (self.grid, self.grid):
            return self.position_embeddings
        cls_position, patch_positions = self.position_embeddings[:, :1], self.position_embeddings[:, 1:]
        patch_positions = patch_positions.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        patch_positions = F.interpolate(
            patch_positions.float(), size=(height, width), mode="bicubic", align_corners=False
        )
        patch_positions = patch_positions.to(cls_position.dtype).flatten(2).transpose(1, 2)
        return torch.cat([cls_position, patch_positions], dim=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embeddings(pixel_values.to(self.patch_embeddings.weight.dtype))
        height, width = patches.shape[-2:]
        tokens = patches.flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        return tokens + self.position_embeddings_for(height, width)


class ModSquadAttention(nn.Module):
    """Dense multi-head self-attention with heads of width `dense_attention_head_dim`: qkv = Linear(C, 3 * heads *
    width), proj = Linear(heads * width, C), scale width ** -0.5."""

    def __init__(self, config: ModSquadConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        inner = config.num_attention_heads * config.dense_attention_head_dim
        self.qkv = nn.Linear(config.hidden_size, 3 * inner, bias=config.qkv_bias)
        self.proj = nn.Linear(inner, config.hidden_size)

    def forward(self, hidden: torch.Tensor, task_index: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        batch, length, _ = hidden.shape
        qkv = self.qkv(hidden).view(batch, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(attended.transpose(1, 2).reshape(batch, length, -1)), None, None


class ModSquadMLP(nn.Module):
    """Dense two-layer MLP with GELU."""

    def __init__(self, config: ModSquadConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor, task_index: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return self.fc2(F.gelu(self.fc1(hidden))), None, None


@dataclass
class RoutingReport:
    """What one MoE layer reports about its routing of a task-stacked batch (T' tasks, M tokens per task, class tokens
    included), besides its auxiliary terms."""

    gates: torch.Tensor  # (T', M, E) gate of every expert of the layer, 0 where not selected
    counts: torch.Tensor  # (T', E) int64 selections of every expert (M * k per task in total)


class ModSquadMoELayer(nn.Module):
    """Common part of the MoE layers: the per-task routers (bias-free, zero-initialised, weight (T, C, R) with R the
    full layer's expert count, 2R with noisy gating), top-k routing, the auxiliary routing terms, and the per-task
    usage statistics (persistent buffers, saved with the model):

    - `expert_counts` (T, E) int64: selections of every expert by every task since the last reset,
    - `expert_usage_ema` (T, E): exponential moving average of the per-batch fraction of slots per expert.

    A layer of an extracted model has E < R experts, listed by `expert_ids` (ids among the R); its routers keep all R
    logits, and top-k runs over the kept experts. Subclasses list their per-expert parameters (expert dimension
    first) in `expert_parameters`.
    """

    expert_parameters: tuple[str, ...] = ()

    def __init__(self, config: ModSquadConfig, expert_ids: list[int], router_experts: int, top_k: int):
        super().__init__()
        num_tasks = len(config.tasks)
        if config.kept_router == "kept" and list(expert_ids) != list(range(router_experts)):
            router_experts = len(expert_ids)  # the authors' pruning: the router has the kept experts' rows only
            expert_ids = list(range(router_experts))
        self.num_experts, self.router_experts, self.top_k = len(expert_ids), router_experts, top_k
        self.momentum = config.expert_usage_momentum
        self.noisy_gating = config.noisy_gating
        self.renormalize_gates = config.renormalize_gates
        self.epsilon = config.routing_epsilon
        self.mutual_information_estimator = config.mutual_information_estimator
        logits_per_task = 2 * router_experts if config.noisy_gating else router_experts
        self.router_weight = nn.Parameter(torch.zeros(num_tasks, config.hidden_size, logits_per_task))
        self.register_buffer("expert_counts", torch.zeros(num_tasks, self.num_experts, dtype=torch.long))
        self.register_buffer("expert_usage_ema", torch.zeros(num_tasks, self.num_experts))
        # Ids among the router's experts, None for a full layer (not a buffer: the config's `kept_experts` holds them).
        self.expert_ids = None if list(expert_ids) == list(range(router_experts)) else tuple(expert_ids)

    def route(
        self, hidden: torch.Tensor, task_index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, RoutingReport]:
        """hidden (T'*B, L, C), task-major -> gates (N, k), expert indices (N, k) for the N = T'*B*L tokens, the
        auxiliary terms (4,) in the order of `AUX_LOSS_NAMES`, and the routing report."""
        num_tasks = task_index.numel()
        # Routing in float32 even under autocast: ties and tiny logit gaps decide the experts.
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            tokens = hidden.float().reshape(num_tasks, -1, hidden.shape[-1])
            logits = torch.bmm(tokens, self.router_weight[task_index].float())  # (T', M, R), 2R with noise
            if self.noisy_gating:
                logits, raw_noise_scale = logits.chunk(2, dim=-1)
                logits = logits + torch.randn_like(logits) * (F.softplus(raw_noise_scale) + NOISE_SCALE_FLOOR)
            probabilities = logits.softmax(dim=-1) + self.epsilon  # (T', M, R)
            expert_ids = None if self.expert_ids is None else torch.tensor(self.expert_ids, device=hidden.device)
            # Top-k among the experts this layer has; their gates stay the full softmax's probabilities.
            candidates = probabilities if expert_ids is None else probabilities[..., expert_ids]
            top, index = candidates.topk(self.top_k, dim=-1)  # index: among this layer's experts
            if not self.renormalize_gates:
                gates = top
            elif self.epsilon:
                gates = top / top.sum(dim=-1, keepdim=True)
            else:  # the same value, from the logits (softmax over the selected ones)
                selected_logits = logits if expert_ids is None else logits[..., expert_ids]
                gates = selected_logits.gather(-1, index).softmax(dim=-1)
            layer_gates = torch.zeros_like(candidates).scatter(-1, index, gates)  # (T', M, E)
            if expert_ids is None:
                router_gates = layer_gates
            else:
                router_gates = torch.zeros_like(probabilities).index_copy(-1, expert_ids, layer_gates)
            aux_terms = torch.stack([
                mutual_information_loss(probabilities.sum(dim=1), probabilities.shape[0] * probabilities.shape[1],
                                        self.mutual_information_estimator),
                cv_squared_loss(router_gates),
                switch_loss(probabilities, router_gates),
                z_loss(logits),
            ])  # fmt: skip
        counts = torch.zeros(num_tasks, self.num_experts, dtype=torch.long, device=hidden.device)
        counts.scatter_add_(1, index.reshape(num_tasks, -1), torch.ones_like(index).reshape(num_tasks, -1))
        report = RoutingReport(gates=layer_gates.detach(), counts=counts)
        return gates.reshape(-1, self.top_k), index.reshape(-1, self.top_k), aux_terms, report

    @torch.no_grad()
    def update_usage(self, task_index: torch.Tensor, counts: torch.Tensor) -> None:
        """Add one batch's selection counts (T', E) of the tasks `task_index` to the statistics."""
        fraction = counts.float() / counts.sum(dim=-1, keepdim=True).clamp_min(1)
        previous = self.expert_usage_ema[task_index]
        first = (self.expert_counts[task_index].sum(dim=-1, keepdim=True) == 0).float()  # no bias towards 0 at start
        momentum = self.momentum * (1.0 - first)
        self.expert_usage_ema[task_index] = momentum * previous + (1.0 - momentum) * fraction
        self.expert_counts[task_index] += counts

    def extract_state(self, task_index: int, keep: torch.Tensor, kept_router: str = "full") -> dict[str, torch.Tensor]:
        """This layer's state for a one-task model that keeps the experts `keep` (sorted positions among this layer's
        experts) of task `task_index`: their parameters and statistics, and the task's whole router (`"full"`) or
        its rows of the kept experts (`"kept"`, see `ModSquadConfig.kept_router`)."""
        state = {}
        for name, value in self.state_dict().items():
            if name in self.expert_parameters:
                value = value[keep]
            elif name == "router_weight":
                value = value[task_index][None]
                if kept_router == "kept":
                    columns = self._router_columns(keep)
                    value = value[..., columns]
            elif name in ("expert_counts", "expert_usage_ema"):
                value = value[task_index, keep][None]
            state[name] = value.clone()
        return state

    def _router_columns(self, keep: torch.Tensor) -> torch.Tensor:
        """The router logit columns of the experts at positions `keep` (and of their noise scales, with noise)."""
        ids = keep if self.expert_ids is None else torch.tensor(self.expert_ids)[keep]
        return torch.cat([ids, ids + self.router_experts]) if self.noisy_gating else ids


class ModSquadMoEAttention(ModSquadMoELayer):
    """Mixture of attention heads: each of the E experts is one head's query projection (C -> D, weight (E, C, D))
    and output projection (D -> C, weight (E, D, C)), without biases by default; a token selects k experts (= k
    heads), keys and values come from one shared projection Linear(C, 2D) with bias (multi-query attention), head j
    goes through the output projection of the expert that made its query, and the k results are summed weighted by
    the gates."""

    def __init__(self, config: ModSquadConfig, expert_ids: list[int]):
        super().__init__(config, expert_ids, config.num_attention_experts, config.attention_top_k)
        channels, dim, num_experts = config.hidden_size, config.attention_head_dim, len(expert_ids)
        self.head_dim = dim
        bias = config.attention_expert_bias
        self.expert_parameters = (
            ("query_weight", "query_bias", "output_weight", "output_bias")
            if bias
            else ("query_weight", "output_weight")
        )
        self.query_weight = nn.Parameter(torch.empty(num_experts, channels, dim))
        self.query_bias = nn.Parameter(torch.zeros(num_experts, dim)) if bias else None
        self.key_value = nn.Linear(channels, 2 * dim)
        self.output_weight = nn.Parameter(torch.empty(num_experts, dim, channels))
        self.output_bias = nn.Parameter(torch.zeros(num_experts, channels)) if bias else None

    def forward(
        self, hidden: torch.Tensor, task_index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, RoutingReport]:
        batch, length, channels = hidden.shape
        gates, expert_index, aux_terms, report = self.route(hidden, task_index)
        dispatch = expert_dispatch(expert_index, self.num_experts)
        queries = torch.bmm(dispatch.dispatch(hidden.reshape(-1, channels)), self.query_weight)
        if self.query_bias is not None:
            queries = queries + self.query_bias[:, None]
        queries = (
            dispatch.per_slot(queries).view(batch, length, self.top_k, self.head_dim).transpose(1, 2)
        )  # (B, k, L, D)
        key, value = self.key_value(hidden).unsqueeze(1).chunk(2, dim=-1)  # (B, 1, L, D) each, shared by the heads
        heads = F.scaled_dot_product_attention(queries, key, value, enable_gqa=True)  # (B, k, L, D), scale D ** -0.5
        heads = heads.transpose(1, 2).reshape(-1, self.head_dim)  # one row per token slot
        projected = torch.bmm(dispatch.dispatch(heads), self.output_weight)
        if self.output_bias is not None:
            projected = projected + self.output_bias[:, None]
        return dispatch.combine(projected, gates).view(batch, length, channels), aux_terms, report


class ModSquadMoEMLP(ModSquadMoELayer):
    """Mixture of MLP experts: E two-layer GELU MLPs C -> H/k -> C with biases; a token runs through its top-k and
    sums them weighted by the gates."""

    expert_parameters = ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")

    def __init__(self, config: ModSquadConfig, expert_ids: list[int]):
        super().__init__(config, expert_ids, config.num_mlp_experts, config.mlp_top_k)
        channels, dim, num_experts = config.hidden_size, config.mlp_expert_hidden_size, len(expert_ids)
        self.fc1_weight = nn.Parameter(torch.empty(num_experts, channels, dim))
        self.fc1_bias = nn.Parameter(torch.zeros(num_experts, dim))
        self.fc2_weight = nn.Parameter(torch.empty(num_experts, dim, channels))
        self.fc2_bias = nn.Parameter(torch.zeros(num_experts, channels))

    def forward(
        self, hidden: torch.Tensor, task_index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, RoutingReport]:
        gates, expert_index, aux_terms, report = self.route(hidden, task_index)
        dispatch = expert_dispatch(expert_index, self.num_experts)
        grouped = dispatch.dispatch(hidden.reshape(-1, hidden.shape[-1]))
        grouped = F.gelu(torch.bmm(grouped, self.fc1_weight) + self.fc1_bias[:, None])
        grouped = torch.bmm(grouped, self.fc2_weight) + self.fc2_bias[:, None]
        return dispatch.combine(grouped, gates).view(hidden.shape), aux_terms, report


class ModSquadBlock(GradientCheckpointingLayer):
    """Pre-norm transformer block whose attention and/or MLP may be MoE layers; the task embedding (one row per
    sample, or None) is added to the input first."""

    def __init__(
        self, config: ModSquadConfig, attention_experts: Optional[list[int]], mlp_experts: Optional[list[int]]
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = (
            ModSquadMoEAttention(config, attention_experts)
            if attention_experts is not None
            else ModSquadAttention(config)
        )
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = ModSquadMoEMLP(config, mlp_experts) if mlp_experts is not None else ModSquadMLP(config)
        self.has_moe = attention_experts is not None or mlp_experts is not None

    def forward(
        self, hidden: torch.Tensor, task_index: torch.Tensor, task_embedding: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, Optional[torch.Tensor], list[RoutingReport]]:
        """-> (output, auxiliary terms (num MoE layers of the block, 4) or None, routing reports). The terms are a
        top-level tensor so that reentrant gradient checkpointing passes their gradients on."""
        if task_embedding is not None:
            hidden = hidden + task_embedding
        update, attention_terms, attention_report = self.attention(self.norm1(hidden), task_index)
        hidden = hidden + update
        update, mlp_terms, mlp_report = self.mlp(self.norm2(hidden), task_index)
        terms = [t for t in (attention_terms, mlp_terms) if t is not None]
        reports = [r for r in (attention_report, mlp_report) if r is not None]
        return hidden + update, torch.stack(terms) if terms else None, reports


# ---------------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------------
class ModSquadPreTrainedModel(DenseMultiTaskPreTrainedModel):
    config_class = ModSquadConfig
    config: ModSquadConfig
    base_model_prefix = "modsquad"
    _no_split_modules = ["ModSquadBlock"]

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, ModSquadMoELayer):
            init.zeros_(module.router_weight)
            init.zeros_(module.expert_counts)
            init.zeros_(module.expert_usage_ema)
            for name in module.expert_parameters:
                parameter = getattr(module, name)
                init.zeros_(parameter) if name.endswith("bias") else init.trunc_normal_(parameter, std=std)
        elif isinstance(module, ModSquadEmbeddings):
            init.trunc_normal_(module.cls_token, std=std)
            init.trunc_normal_(module.position_embeddings, std=std)
        elif isinstance(module, ModSquadModel) and module.task_embedding is not None:
            init.normal_(module.task_embedding, std=1.0)  # torch.randn, as in the reference
        else:
            super()._init_weights(module)


class ModSquadModel(ModSquadPreTrainedModel):
    """The Mod-Squad ViT; returns per-task token maps, the routing terms and, on request, the gates."""

    def __init__(self, config: ModSquadConfig):
        super().__init__(config)
        self.embeddings = ModSquadEmbeddings(config)
        num_tasks = len(config.tasks)
        self.task_embedding = (
            nn.Parameter(torch.zeros(1, num_tasks, config.hidden_size)) if config.use_task_embedding else None
        )
        experts = dict(zip(config.moe_layer_kinds, config.expert_ids_per_layer))
        self.blocks = nn.ModuleList(
            ModSquadBlock(config, experts.get((block, "attention")), experts.get((block, "mlp")))
            for block in range(config.num_hidden_layers)
        )
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self._force_usage_tracking: Optional[bool] = None
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        """The patch embedding (a Conv2d), so that `enable_input_require_grads()` can make its output require grad."""
        return self.embeddings.patch_embeddings

    @property
    def moe_layers(self) -> list[tuple[str, ModSquadMoELayer]]:
        """(name, module) of every MoE layer, in network order (that of `config.layer_names` and of `gates`)."""
        return [(name, module) for name, module in self.named_modules() if isinstance(module, ModSquadMoELayer)]

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        tasks: Optional[list[str]] = None,
        output_gates: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
    ) -> DenseMultiTaskModelOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch, 3, height, width)`):
                Normalised images; height and width multiples of the patch size (see [`DenseMultiTaskImageProcessor`]).
            tasks (`list[str]`, *optional*):
                Run only these tasks' passes (default: all tasks of the config).
            output_gates (`bool`, *optional*):
                Return the gates of every MoE layer; defaults to `config.output_gates`.
            output_hidden_states (`bool`, *optional*):
                Return the block inputs/outputs; defaults to `config.output_hidden_states`.
            return_dict (`bool`, *optional*):
                Return a [`DenseMultiTaskModelOutput`] instead of a tuple; defaults to `config.return_dict`.

        `aux_losses` are the routing terms of this batch, unweighted, each summed over the MoE layers:
        `"mutual_information"` (minus the task-expert mutual information, [`mutual_information_loss`]), `"cv"`
        ([`cv_squared_loss`]), `"switch"` ([`switch_loss`]) and `"z"` ([`z_loss`]). `gates` give, per MoE layer and
        task, the selected experts' routing probabilities and 0 for the others (the class token left out).

        `hidden_states` are the input of the first block and the output of every block, batch first:
        `(batch, num_tasks, 1 + h * w, hidden_size)`, `[:, t]` the tokens routed for the t-th requested task, the class
        token first, before the task embedding of the next block is added. Blocks that run once for all tasks (before
        the first MoE layer, without the task embedding) give `(batch, 1, 1 + h * w, hidden_size)`. They are the
        tensors the next block reads, so `retain_grad()` works.
        """
        output_gates = self.config.output_gates if output_gates is None else output_gates
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        check_pixel_values(pixel_values, self.config.num_channels, self.config.patch_size)
        tasks = self.resolve_tasks(tasks)
        task_index = torch.tensor([self.config.tasks.index(task) for task in tasks], device=pixel_values.device)
        batch, num_tasks = pixel_values.shape[0], len(tasks)
        grid = (pixel_values.shape[-2] // self.config.patch_size, pixel_values.shape[-1] // self.config.patch_size)
        hidden = self.embeddings(pixel_values)
        task_embedding, stacked = None, False
        if self.task_embedding is not None:
            # Every task takes its own pass through every block: one copy of the batch per task, task-major.
            hidden, stacked = hidden.repeat(num_tasks, 1, 1), True
            # (T'*B, 1, C), task-major; expand + reshape rather than repeat_interleave, which ONNX export mistranslates for
            # a dynamic batch.
            rows = self.task_embedding[0, task_index]
            task_embedding = rows[:, None].expand(-1, batch, -1).reshape(num_tasks * batch, 1, -1)
        all_hidden, aux_terms, reports = [], [], []
        hidden = self._batch_first(hidden, num_tasks if stacked else 1, all_hidden)
        for block in self.blocks:
            if block.has_moe and not stacked:  # without task embedding, tasks part ways at the first MoE layer
                hidden, stacked = hidden.repeat(num_tasks, 1, 1), True
            # Positional arguments: GradientCheckpointingLayer needs them to recompute under checkpointing.
            hidden, block_terms, block_reports = block(hidden, task_index, task_embedding)
            if block_terms is not None:
                aux_terms.extend(block_terms.unbind(0))
            reports.extend(block_reports)
            hidden = self._batch_first(hidden, num_tasks if stacked else 1, all_hidden)
        # Statistics are updated here rather than in the layers, which gradient checkpointing runs twice.
        if self.training if self._force_usage_tracking is None else self._force_usage_tracking:
            for (_, layer), report in zip(self.moe_layers, reports):
                layer.update_usage(task_index, report.counts)
        features = self.norm(hidden)[:, 1:]  # drop the class token
        maps = features.transpose(1, 2).reshape(num_tasks, batch, -1, *grid).transpose(0, 1)

        aux_losses = {
            name: torch.stack([terms[i] for terms in aux_terms]).sum() for i, name in enumerate(AUX_LOSS_NAMES)
        }
        gates = None
        if output_gates:
            gates = tuple(
                {task: g[i] for i, task in enumerate(tasks)}
                for g in (
                    r.gates.view(num_tasks, batch, -1, r.gates.shape[-1])[:, :, 1:].unflatten(2, grid) for r in reports
                )
            )
        return DenseMultiTaskModelOutput(
            task_features=maps,
            tasks=tuple(tasks),
            aux_losses=aux_losses,
            gates=gates,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
        )

    @staticmethod
    def _batch_first(hidden: torch.Tensor, num_tasks: int, all_hidden: list) -> torch.Tensor:
        """Record the task-major rows (T'*B, L, C) the blocks compute with as a batch-first (B, T', L, C) view, and
        give the next block the same rows read back through that view, so that the recorded tensor is on the
        gradient path. Both are views: no copy, the same values."""
        batch_first = hidden.unflatten(0, (num_tasks, -1)).transpose(0, 1)
        all_hidden.append(batch_first)
        return batch_first.transpose(0, 1).flatten(0, 1)


class ModSquadForDensePrediction(ModSquadPreTrainedModel):
    """Mod-Squad with one dense head per task, the benchmark losses and the routing losses; per-task expert usage
    statistics and the extraction of standalone per-task models."""

    def __init__(self, config: ModSquadConfig):
        super().__init__(config)
        self.modsquad = ModSquadModel(config)
        self.heads = self.build_task_heads(config.hidden_size)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.modsquad.get_input_embeddings()

    def trunk_outputs(
        self,
        pixel_values: torch.Tensor,
        tasks: list[str],
        output_gates: bool,
        output_hidden_states: Optional[bool],
        with_labels: bool,
    ) -> DenseMultiTaskModelOutput:
        return self.modsquad(
            pixel_values,
            tasks=tasks,
            output_gates=output_gates,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )

    def aux_losses_in_loss(self, trunk: DenseMultiTaskModelOutput, tasks: list[str]) -> Optional[dict]:
        # The reference adds the routing terms only when more than two tasks ran (`aux_loss_min_tasks`).
        return trunk.aux_losses if len(tasks) >= self.config.aux_loss_min_tasks else None

    @property
    def aux_loss_weights(self) -> dict[str, float]:
        config = self.config
        return {
            "mutual_information": config.mutual_information_loss_weight,
            "cv": config.cv_loss_weight,
            "switch": config.switch_loss_weight,
            "z": config.z_loss_weight,
        }

    # ------------------------------------------------------------------------------------------------------------
    # Expert usage statistics
    # ------------------------------------------------------------------------------------------------------------
    def track_expert_usage(self, enabled: Optional[bool] = True):
        """Choose when forward passes add to the per-task usage statistics: `True` always (e.g. over an evaluation
        set), `False` never, `None` in training mode only (the default).

        Takes effect at once; used as a context manager, the previous setting comes back on exit:

        ```python
        >>> model.reset_expert_usage()
        >>> with model.track_expert_usage():
        ...     for batch in loader:
        ...         model(batch["pixel_values"])
        >>> model.expert_usage_statistics()["depth"]["counts"]
        ```
        """
        previous = self.modsquad._force_usage_tracking
        self.modsquad._force_usage_tracking = enabled
        return _RestoreTracking(self.modsquad, previous)

    def reset_expert_usage(self) -> None:
        """Zero the per-task usage counts and moving averages of every MoE layer."""
        for _, layer in self.modsquad.moe_layers:
            layer.expert_counts.zero_()
            layer.expert_usage_ema.zero_()

    def expert_usage_statistics(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per task: `"counts"` (num_moe_layers, max_experts) int64 selections since the last reset (class tokens
        included), `"share"` the counts normalised per layer, `"ema"` the moving average of per-batch shares. Rows
        follow `config.layer_names`, columns `config.candidate_names`; layers with fewer experts are zero-padded."""
        layers = [layer for _, layer in self.modsquad.moe_layers]
        max_experts = max(layer.num_experts for layer in layers)

        def stack(name: str, task_index: int) -> torch.Tensor:
            rows = [getattr(layer, name)[task_index] for layer in layers]
            return torch.stack([F.pad(row, (0, max_experts - row.numel())) for row in rows])

        statistics = {}
        for task_index, task in enumerate(self.config.tasks):
            counts = stack("expert_counts", task_index)
            statistics[task] = {
                "counts": counts,
                "share": counts.float() / counts.sum(dim=-1, keepdim=True).clamp_min(1),
                "ema": stack("expert_usage_ema", task_index),
            }
        return statistics

    @torch.no_grad()
    def _calibration_counts(self, task: str, batches: Iterable[torch.Tensor]) -> list[torch.Tensor]:
        """Per MoE layer, how often `task` selects each expert on `batches` (eval mode, class tokens included); the
        stored statistics are left as they were."""
        layers = [layer for _, layer in self.modsquad.moe_layers]
        saved = [(layer.expert_counts.clone(), layer.expert_usage_ema.clone()) for layer in layers]
        was_training = self.training
        self.eval()
        try:
            self.reset_expert_usage()
            with self.track_expert_usage(True):
                for pixel_values in batches:
                    self.modsquad(pixel_values, tasks=[task])
            task_index = self.config.tasks.index(task)
            return [layer.expert_counts[task_index].clone() for layer in layers]
        finally:
            for layer, (counts, ema) in zip(layers, saved):
                layer.expert_counts.copy_(counts)
                layer.expert_usage_ema.copy_(ema)
            self.train(was_training)

    # ------------------------------------------------------------------------------------------------------------
    # Per-task extraction
    # ------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def extract_task_model(
        self,
        task: str,
        by: str = "usage",
        threshold: Optional[float] = None,
        calibration_pixel_values: Optional[Union[torch.Tensor, Iterable[torch.Tensor]]] = None,
        router: str = "full",
    ) -> "ModSquadForDensePrediction":
        """Build a standalone one-task model that keeps only the experts `task` uses.

        Args:
            task (`str`): the task to keep.
            by (`str`, *optional*, defaults to `"usage"`):
                Where the per-expert selection counts of the task come from. `"usage"`: the accumulated statistics
                (see [`track_expert_usage`]). `"router"`: a pass of `calibration_pixel_values` (one batch or an
                iterable of batches) through the task's routes.
            threshold (`float`, *optional*):
                In a layer with top-k, keep the experts whose share of the task's selections exceeds `threshold / k`
                (the reference's rule), i.e. experts selected by more than a `threshold` fraction of the task's tokens;
                `None` (or 0) keeps every expert selected at least once.
            calibration_pixel_values: images for `by="router"`.
            router (`str`, *optional*, defaults to `"full"`):
                `"full"` keeps the task's whole router (what follows); `"kept"` keeps only the kept experts' router
                rows, as the authors' pruning does (softmax over the kept experts; see `ModSquadConfig.kept_router`).

        Every layer keeps at least its top-k experts (topped up with the most used, then the lowest ids). The new
        model has the kept experts, the task's whole router (all logits of the full layer), its task-embedding row
        and its head; `config.kept_experts` records the kept ids.

        What stays identical: for a given layer input, the extracted layer computes the same router logits and
        softmax over all experts as the full layer, then takes the top-k among the kept experts. So every token whose
        full-model top-k lies within the kept experts gets bit-identical gates and the same experts (the gates are
        probabilities of the full softmax, renormalised or not); a token that chose a dropped expert gets the
        best-ranked kept expert(s) in its place, each with its full-model probability as gate. If every token of
        every layer selects only kept experts (true on the images whose counts chose the experts, with `threshold`
        None), the extracted model computes the full model's function for the task, up to floating-point rounding
        of batched matmuls whose shapes differ.
        """
        if task not in self.config.tasks:
            raise ValueError(f"Unknown task {task!r}; this model predicts {self.config.tasks}.")
        if threshold is not None and (isinstance(threshold, bool) or not 0.0 <= threshold < 1.0):
            raise ValueError(f"`threshold` must be in [0, 1) (a fraction of the task's tokens), got {threshold!r}.")
        task_index = self.config.tasks.index(task)
        layers = self.modsquad.moe_layers
        if by == "usage":
            if calibration_pixel_values is not None:
                raise ValueError("`calibration_pixel_values` applies to by='router' only.")
            counts = [layer.expert_counts[task_index].float() for _, layer in layers]
            if all(c.sum() == 0 for c in counts):
                raise ValueError(
                    f"No expert usage has been recorded for task {task!r}: train the model, or run data through it "
                    "under `model.track_expert_usage()`, or use by='router' with calibration images."
                )
        elif by == "router":
            if calibration_pixel_values is None:
                raise ValueError("by='router' needs `calibration_pixel_values` (a batch or an iterable of batches).")
            batches = (
                [calibration_pixel_values]
                if isinstance(calibration_pixel_values, torch.Tensor)
                else calibration_pixel_values
            )
            counts = [c.float() for c in self._calibration_counts(task, batches)]
            if all(c.sum() == 0 for c in counts):
                raise ValueError("`calibration_pixel_values` held no images.")
        else:
            raise ValueError(f"`by` must be 'usage' or 'router', got {by!r}.")

        keep = []
        for (_, layer), count in zip(layers, counts):
            share = count / count.sum().clamp_min(1)
            chosen = share > (threshold or 0.0) / layer.top_k
            if int(chosen.sum()) < layer.top_k:  # top-k routing needs k experts: add the most used ones
                ranking = sorted(range(layer.num_experts), key=lambda e: (not bool(chosen[e]), -float(share[e]), e))
                chosen = torch.zeros_like(chosen)
                chosen[ranking[: layer.top_k]] = True
            keep.append(chosen.nonzero().flatten())

        config = copy.deepcopy(self.config)
        config.tasks = [task]
        config.task_id2label = {t: labels for t, labels in config.task_id2label.items() if t == task}
        config.task_kinds = {task: config.task_kinds[task]}
        config.loss_weights = {task: config.loss_weights[task]}
        config.kept_experts = [
            [self.config.expert_ids_per_layer[i][int(position)] for position in kept] for i, kept in enumerate(keep)
        ]
        if router not in ("full", "kept"):
            raise ValueError(f"`router` must be 'full' or 'kept', got {router!r}.")
        config.kept_router = router
        config.validate_architecture()
        extracted = type(self)(config).to(device=self.device, dtype=self.dtype)

        state = {}
        moe_names = set()
        for (name, layer), kept in zip(layers, keep):
            prefix = f"{self.base_model_prefix}.{name}"
            moe_names.add(prefix)
            state.update(
                {f"{prefix}.{key}": value for key, value in layer.extract_state(task_index, kept, router).items()}
            )
        for key, value in self.state_dict().items():
            if any(key.startswith(name + ".") for name in moe_names):
                continue
            if key.startswith("heads.") and not key.startswith(f"heads.{task}."):
                continue
            if key == f"{self.base_model_prefix}.task_embedding":
                value = value[:, task_index : task_index + 1]
            state[key] = value
        extracted.load_state_dict(state, strict=True)
        extracted.train(self.training)
        return extracted


class _RestoreTracking:
    """Return value of `track_expert_usage`: usable as a context manager that restores the previous setting."""

    def __init__(self, model: ModSquadModel, previous: Optional[bool]):
        self.model, self.previous = model, previous

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.model._force_usage_tracking = self.previous


__all__ = [
    "ModSquadForDensePrediction",
    "ModSquadModel",
    "ModSquadModelOutput",
    "ModSquadOutput",
    "ModSquadPreTrainedModel",
    "cv_squared_loss",
    "mutual_information_loss",
    "switch_loss",
    "z_loss",
]
