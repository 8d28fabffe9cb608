"""PyTorch Mod-Squad: a ViT with task-routed mixture-of-experts layers and dense task heads.

Data flow for B images and T' requested tasks (see the config docstring for every option):

    patch embedding + class token + position embeddings  ->  tokens (B, L, C)
    dense blocks before the first MoE layer run once on the B images; then the batch is stacked once per task
    (task-major, T'*B samples, sample s belongs to task s // B) so that all tasks share one backbone pass:
    MoE layer    router_t(token) -> softmax p (E) -> top-k experts with gates = p renormalised over the k
                 MLP experts:       y = sum_k gate_k MLP_{e_k}(x)
                 attention experts: head k = attention(q_{e_k}(x), shared key, shared value); y = sum_k gate_k O_{e_k}(head k)
    final norm, class token dropped  ->  per-task token maps (B, T', C, h, w)  ->  one light dense head per task

Experts are computed in one batched matmul per projection: token slots are sorted by expert into a padded
(E, capacity, .) layout (`ExpertDispatch`), so there is no Python loop over experts.
"""

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn
from torch.nn import functional as F
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from .configuration_modsquad import ModSquadConfig
from .dense_model_utils import DenseMultiTaskPreTrainedModel, check_pixel_values


@dataclass
class ModSquadModelOutput(ModelOutput):
    """
    Output of [`ModSquadModel`].

    Args:
        task_features (`torch.FloatTensor` of shape `(batch, num_tasks, hidden_size, h, w)`):
            Per requested task (in the order of `tasks`), the final token map the heads decode.
        tasks (`tuple[str]`):
            The tasks of `task_features`, in order.
        aux_losses (`dict[str, torch.FloatTensor]`):
            Auxiliary routing losses of this batch, unweighted and summed over MoE layers: `"mutual_information"`
            (minus the task-expert mutual information, see [`mutual_information_loss`]) and `"load_balance"`.
        expert_usage (`dict[str, torch.FloatTensor]`):
            Per task, a `(num_moe_layers, max_experts)` tensor: the fraction of the task's token slots (tokens x top-k)
            routed to each expert of each MoE layer in this batch (rows sum to 1; layers with fewer experts than
            `max_experts` are padded with zeros, see `config.num_experts_per_layer`).
        hidden_states (`tuple[torch.FloatTensor]`, *optional*):
            Token maps (num_tasks * batch or batch, C, h, w) after the embeddings and after every block (the class
            token dropped); blocks after the task stacking hold the task-major stacked batch. Returned with
            `output_hidden_states=True`.
    """

    task_features: Optional[torch.FloatTensor] = None
    tasks: Optional[tuple[str, ...]] = None
    aux_losses: Optional[dict[str, torch.FloatTensor]] = None
    expert_usage: Optional[dict[str, torch.FloatTensor]] = None
    hidden_states: Optional[tuple[torch.FloatTensor, ...]] = None


@dataclass
class ModSquadOutput(ModelOutput):
    """
    Output of [`ModSquadForDensePrediction`].

    Args:
        loss (`torch.FloatTensor`, *optional*):
            sum_t loss_weights[t] * task_losses[t] + aux_loss, when `labels` are given.
        task_losses (`dict[str, torch.FloatTensor]`, *optional*):
            Unweighted loss of every task that had labels.
        aux_loss (`torch.FloatTensor`, *optional*):
            The weighted routing terms included in `loss`: mutual_information_loss_weight *
            aux_losses["mutual_information"] + load_balance_loss_weight * aux_losses["load_balance"], over the terms
            with a positive weight (the same field as TaskExpert's, so training code adds it to any re-weighted task
            losses).
        aux_losses (`dict[str, torch.FloatTensor]`):
            As in [`ModSquadModelOutput`].
        logits (`dict[str, torch.FloatTensor]`):
            Per task, raw predictions (B, C, H, W) at the input resolution (as for TaskExpert).
        expert_usage (`dict[str, torch.FloatTensor]`):
            As in [`ModSquadModelOutput`].
        hidden_states (`tuple[torch.FloatTensor]`, *optional*):
            As in [`ModSquadModelOutput`].
    """

    loss: Optional[torch.FloatTensor] = None
    task_losses: Optional[dict[str, torch.FloatTensor]] = None
    aux_loss: Optional[torch.FloatTensor] = None
    aux_losses: Optional[dict[str, torch.FloatTensor]] = None
    logits: Optional[dict[str, torch.FloatTensor]] = None
    expert_usage: Optional[dict[str, torch.FloatTensor]] = None
    hidden_states: Optional[tuple[torch.FloatTensor, ...]] = None


# ---------------------------------------------------------------------------------------------------------------------
# Routing losses
# ---------------------------------------------------------------------------------------------------------------------
def mutual_information_loss(task_expert_mass: torch.Tensor) -> torch.Tensor:
    """Minus the mutual information between tasks and experts of one MoE layer.

    `task_expert_mass` (T, E) holds, per task, the sum over its tokens of the routing probabilities. Normalised to a
    joint distribution P(t, e) with marginals P(t) and P(e), the loss is -sum_{t,e} P(t,e) log(P(t,e) / (P(t) P(e))).
    It is 0 when every task routes like the others and reaches -log(min(T, E)) when tasks use disjoint experts
    evenly; minimising it makes each task depend on few experts while all experts stay in use.
    """
    mass = task_expert_mass.float()
    joint = mass / mass.sum()
    task_marginal = joint.sum(dim=1, keepdim=True)
    expert_marginal = joint.sum(dim=0, keepdim=True)
    tiny = torch.finfo(joint.dtype).tiny  # 0 log 0 = 0, without NaN gradients
    log_ratio = joint.clamp_min(tiny).log() - task_marginal.clamp_min(tiny).log() - expert_marginal.clamp_min(tiny).log()
    return -(joint * log_ratio).sum()


def load_balance_loss(probabilities: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Switch-style load balance of one MoE layer, averaged over tasks: E * sum_e f_e * P_e, with f_e the fraction
    of the task's token slots routed to expert e and P_e its mean routing probability. It is 1 for even routing.

    probabilities (T, M, E) of M tokens per task; counts (T, E) of selections."""
    num_experts = probabilities.shape[-1]
    fraction = counts.float() / counts.sum(dim=-1, keepdim=True).clamp_min(1)
    return (num_experts * (fraction * probabilities.float().mean(dim=1)).sum(dim=-1)).mean()


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


def expert_linear(inputs: torch.Tensor, expert_index: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Per-token inputs (N, I), selected experts (N, k), expert weights (E, I, O) and biases (E, O) ->
    (N, k, O): slot (n, j) is inputs[n] @ weight[e] + bias[e] with e = expert_index[n, j]; one batched matmul."""
    dispatch = ExpertDispatch(expert_index, weight.shape[0])
    grouped = torch.bmm(dispatch.dispatch(inputs), weight)
    if bias is not None:
        grouped = grouped + bias[:, None]
    return dispatch.per_slot(grouped)


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
        self.patch_embeddings = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size, stride=config.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.position_embeddings = nn.Parameter(torch.zeros(1, 1 + self.grid**2, config.hidden_size))

    def position_embeddings_for(self, height: int, width: int) -> torch.Tensor:
        if (height, width) == (self.grid, self.grid):
            return self.position_embeddings
        cls_position, patch_positions = self.position_embeddings[:, :1], self.position_embeddings[:, 1:]
        patch_positions = patch_positions.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        patch_positions = F.interpolate(patch_positions.float(), size=(height, width), mode="bicubic", align_corners=False)
        patch_positions = patch_positions.to(cls_position.dtype).flatten(2).transpose(1, 2)
        return torch.cat([cls_position, patch_positions], dim=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embeddings(pixel_values.to(self.patch_embeddings.weight.dtype))
        height, width = patches.shape[-2:]
        tokens = patches.flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        return tokens + self.position_embeddings_for(height, width)


class ModSquadAttention(nn.Module):
    """Dense multi-head self-attention."""

    def __init__(self, config: ModSquadConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor, task_index: torch.Tensor) -> tuple[torch.Tensor, None]:
        batch, length, channels = hidden.shape
        qkv = self.qkv(hidden).view(batch, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(attended.transpose(1, 2).reshape(batch, length, channels)), None


class ModSquadMLP(nn.Module):
    """Dense two-layer MLP with GELU."""

    def __init__(self, config: ModSquadConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor, task_index: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.fc2(F.gelu(self.fc1(hidden))), None


@dataclass
class RoutingInfo:
    """What one MoE layer reports about its routing of a task-stacked batch (T' tasks, M tokens per task)."""

    probabilities: torch.Tensor  # (T', M, E) float32 softmax of the router logits
    counts: torch.Tensor  # (T', E) selections of every expert (M * k per task in total)


class ModSquadMoELayer(nn.Module):
    """Common part of the MoE layers: the per-task routers (bias-free, zero-initialised, weight (T, C, E)), top-k
    routing, and the per-task usage statistics (persistent buffers, saved with the model):

    - `expert_counts` (T, E) int64: selections of every expert by every task since the last reset,
    - `expert_usage_ema` (T, E): exponential moving average of the per-batch fraction of slots per expert.

    Subclasses list their per-expert parameters (expert dimension first) in `expert_parameters`.
    """

    expert_parameters: tuple[str, ...] = ()

    def __init__(self, config: ModSquadConfig, num_experts: int, top_k: int):
        super().__init__()
        num_tasks = len(config.tasks)
        self.num_experts, self.top_k = num_experts, top_k
        self.momentum = config.expert_usage_momentum
        self.router_weight = nn.Parameter(torch.zeros(num_tasks, config.hidden_size, num_experts))
        self.register_buffer("expert_counts", torch.zeros(num_tasks, num_experts, dtype=torch.long))
        self.register_buffer("expert_usage_ema", torch.zeros(num_tasks, num_experts))

    def route(self, hidden: torch.Tensor, task_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, RoutingInfo]:
        """hidden (T'*B, L, C), task-major -> gates (N, k), expert indices (N, k) for the N = T'*B*L tokens."""
        num_tasks = task_index.numel()
        # Routing in float32 even under autocast: ties and tiny logit gaps decide the experts.
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            tokens = hidden.float().reshape(num_tasks, -1, hidden.shape[-1])
            logits = torch.bmm(tokens, self.router_weight[task_index].float())  # (T', M, E)
            probabilities = logits.softmax(dim=-1)
            top_logits, top_index = logits.topk(self.top_k, dim=-1)
            gates = top_logits.softmax(dim=-1)  # = the probabilities renormalised over the selected experts
        counts = torch.zeros(num_tasks, self.num_experts, dtype=torch.long, device=hidden.device)
        counts.scatter_add_(1, top_index.reshape(num_tasks, -1), torch.ones_like(top_index).reshape(num_tasks, -1))
        return gates.reshape(-1, self.top_k), top_index.reshape(-1, self.top_k), RoutingInfo(probabilities, counts)

    @torch.no_grad()
    def update_usage(self, task_index: torch.Tensor, counts: torch.Tensor) -> None:
        """Add one batch's selection counts (T', E) of the tasks `task_index` to the statistics."""
        fraction = counts.float() / counts.sum(dim=-1, keepdim=True).clamp_min(1)
        previous = self.expert_usage_ema[task_index]
        first = (self.expert_counts[task_index].sum(dim=-1, keepdim=True) == 0).float()  # no bias towards 0 at start
        momentum = self.momentum * (1.0 - first)
        self.expert_usage_ema[task_index] = momentum * previous + (1.0 - momentum) * fraction
        self.expert_counts[task_index] += counts

    def extract_state(self, task_index: int, keep: torch.Tensor) -> dict[str, torch.Tensor]:
        """This layer's state for a one-task model that keeps the experts `keep` (sorted ids) of task `task_index`."""
        state = {}
        for name, value in self.state_dict().items():
            if name in self.expert_parameters:
                value = value[keep]
            elif name == "router_weight":
                value = value[task_index, :, keep][None]
            elif name in ("expert_counts", "expert_usage_ema"):
                value = value[task_index, keep][None]
            state[name] = value.clone()
        return state


class ModSquadMoEAttention(ModSquadMoELayer):
    """Mixture of attention heads: each of the E experts is one head's query projection (C -> D) and output
    projection (D -> C); a token selects k experts (= k heads), keys and values come from one shared projection
    (multi-query attention), and the selected heads' projected outputs are summed with the gates."""

    expert_parameters = ("query_weight", "query_bias", "output_weight", "output_bias")

    def __init__(self, config: ModSquadConfig, num_experts: int):
        super().__init__(config, num_experts, config.attention_top_k)
        channels, dim = config.hidden_size, config.attention_head_dim
        self.head_dim = dim
        self.query_weight = nn.Parameter(torch.empty(num_experts, channels, dim))
        self.query_bias = nn.Parameter(torch.zeros(num_experts, dim))
        self.key_value = nn.Linear(channels, 2 * dim, bias=config.qkv_bias)
        self.output_weight = nn.Parameter(torch.empty(num_experts, dim, channels))
        self.output_bias = nn.Parameter(torch.zeros(num_experts, channels))

    def forward(self, hidden: torch.Tensor, task_index: torch.Tensor) -> tuple[torch.Tensor, RoutingInfo]:
        batch, length, channels = hidden.shape
        gates, expert_index, routing = self.route(hidden, task_index)
        dispatch = ExpertDispatch(expert_index, self.num_experts)
        flat = hidden.reshape(-1, channels)
        queries = dispatch.per_slot(torch.bmm(dispatch.dispatch(flat), self.query_weight) + self.query_bias[:, None])
        queries = queries.view(batch, length, self.top_k, self.head_dim).transpose(1, 2)  # (B, k, L, D)
        key, value = self.key_value(hidden).unsqueeze(1).chunk(2, dim=-1)  # (B, 1, L, D) each, shared by the heads
        heads = F.scaled_dot_product_attention(queries, key, value, enable_gqa=True)  # (B, k, L, D)
        heads = heads.transpose(1, 2).reshape(-1, self.head_dim)  # one row per token slot
        projected = torch.bmm(dispatch.dispatch(heads), self.output_weight) + self.output_bias[:, None]
        return dispatch.combine(projected, gates).view(batch, length, channels), routing


class ModSquadMoEMLP(ModSquadMoELayer):
    """Mixture of MLP experts: E two-layer GELU MLPs; a token runs through its top-k and sums them with the gates."""

    expert_parameters = ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")

    def __init__(self, config: ModSquadConfig, num_experts: int):
        super().__init__(config, num_experts, config.mlp_top_k)
        channels, dim = config.hidden_size, config.mlp_expert_hidden_size
        self.fc1_weight = nn.Parameter(torch.empty(num_experts, channels, dim))
        self.fc1_bias = nn.Parameter(torch.zeros(num_experts, dim))
        self.fc2_weight = nn.Parameter(torch.empty(num_experts, dim, channels))
        self.fc2_bias = nn.Parameter(torch.zeros(num_experts, channels))

    def forward(self, hidden: torch.Tensor, task_index: torch.Tensor) -> tuple[torch.Tensor, RoutingInfo]:
        gates, expert_index, routing = self.route(hidden, task_index)
        dispatch = ExpertDispatch(expert_index, self.num_experts)
        grouped = dispatch.dispatch(hidden.reshape(-1, hidden.shape[-1]))
        grouped = F.gelu(torch.bmm(grouped, self.fc1_weight) + self.fc1_bias[:, None])
        grouped = torch.bmm(grouped, self.fc2_weight) + self.fc2_bias[:, None]
        return dispatch.combine(grouped, gates).view(hidden.shape), routing


class ModSquadBlock(GradientCheckpointingLayer):
    """Pre-norm transformer block whose attention and/or MLP may be MoE layers."""

    def __init__(self, config: ModSquadConfig, attention_experts: Optional[int], mlp_experts: Optional[int]):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = (
            ModSquadMoEAttention(config, attention_experts) if attention_experts is not None else ModSquadAttention(config)
        )
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = ModSquadMoEMLP(config, mlp_experts) if mlp_experts is not None else ModSquadMLP(config)
        self.has_moe = attention_experts is not None or mlp_experts is not None

    def forward(self, hidden: torch.Tensor, task_index: torch.Tensor) -> tuple[torch.Tensor, list[RoutingInfo]]:
        routing = []
        update, info = self.attention(self.norm1(hidden), task_index)
        hidden = hidden + update
        routing += [info] if info is not None else []
        update, info = self.mlp(self.norm2(hidden), task_index)
        routing += [info] if info is not None else []
        return hidden + update, routing


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
        else:
            super()._init_weights(module)


class ModSquadModel(ModSquadPreTrainedModel):
    """The Mod-Squad ViT; returns per-task token maps, the routing losses and the expert usage of the batch."""

    def __init__(self, config: ModSquadConfig):
        super().__init__(config)
        self.embeddings = ModSquadEmbeddings(config)
        experts = dict(zip(config.moe_layer_kinds, config.num_experts_per_layer))
        self.blocks = nn.ModuleList(
            ModSquadBlock(config, experts.get((block, "attention")), experts.get((block, "mlp")))
            for block in range(config.num_hidden_layers)
        )
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self._force_usage_tracking: Optional[bool] = None
        self.post_init()

    @property
    def moe_layers(self) -> list[tuple[str, ModSquadMoELayer]]:
        """(name, module) of every MoE layer, in network order (the order of `expert_usage` rows)."""
        return [(name, module) for name, module in self.named_modules() if isinstance(module, ModSquadMoELayer)]

    def get_input_embeddings(self) -> nn.Module:
        """The patch embedding (what `enable_input_require_grads` hooks)."""
        return self.embeddings.patch_embeddings

    def forward(
        self,
        pixel_values: torch.Tensor,
        tasks: Optional[list[str]] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
    ) -> Union[ModSquadModelOutput, tuple]:
        output_hidden_states = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = self.config.return_dict if return_dict is None else return_dict
        check_pixel_values(pixel_values, self.config.num_channels, self.config.patch_size)
        tasks = self.resolve_tasks(tasks)
        task_index = torch.tensor([self.config.tasks.index(task) for task in tasks], device=pixel_values.device)
        batch, num_tasks = pixel_values.shape[0], len(tasks)
        grid = (pixel_values.shape[-2] // self.config.patch_size, pixel_values.shape[-1] // self.config.patch_size)
        hidden = self.embeddings(pixel_values)
        all_hidden, routing, stacked = [hidden], [], False
        for block in self.blocks:
            if block.has_moe and not stacked:
                # From here on each task takes its own route: one copy of the batch per task, task-major.
                hidden, stacked = hidden.repeat(num_tasks, 1, 1), True
            # Positional arguments: GradientCheckpointingLayer needs them to recompute under checkpointing.
            hidden, block_routing = block(hidden, task_index)
            routing.extend(block_routing)
            all_hidden.append(hidden)
        # Statistics are updated here rather than in the layers, which gradient checkpointing runs twice.
        if self.training if self._force_usage_tracking is None else self._force_usage_tracking:
            for (_, layer), info in zip(self.moe_layers, routing):
                layer.update_usage(task_index, info.counts)
        hidden = self.norm(hidden)[:, 1:]  # drop the class token
        maps = hidden.transpose(1, 2).reshape(num_tasks, batch, -1, *grid).transpose(0, 1)

        aux_losses = {
            "mutual_information": torch.stack([mutual_information_loss(r.probabilities.sum(dim=1)) for r in routing]).sum(),
            "load_balance": torch.stack([load_balance_loss(r.probabilities, r.counts) for r in routing]).sum(),
        }
        max_experts = max(r.counts.shape[-1] for r in routing)
        usage = torch.stack(
            [F.pad(r.counts.float() / r.counts.sum(-1, keepdim=True), (0, max_experts - r.counts.shape[-1])) for r in routing],
            dim=1,
        )  # (T', layers, max_experts)
        output = ModSquadModelOutput(
            task_features=maps,
            tasks=tuple(tasks),
            aux_losses=aux_losses,
            expert_usage={task: usage[i] for i, task in enumerate(tasks)},
            hidden_states=tuple(_token_maps(h, grid) for h in all_hidden) if output_hidden_states else None,
        )
        return output if return_dict else output.to_tuple()


def _token_maps(hidden: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(S, 1 + h*w, C) tokens -> (S, C, h, w) map of the patch tokens."""
    return hidden[:, 1:].transpose(1, 2).reshape(hidden.shape[0], -1, *grid)


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

    @property
    def aux_loss_weights(self) -> dict[str, float]:
        return {
            "mutual_information": self.config.mutual_information_loss_weight,
            "load_balance": self.config.load_balance_loss_weight,
        }

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: Optional[dict[str, torch.Tensor]] = None,
        tasks: Optional[list[str]] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
    ) -> Union[ModSquadOutput, tuple]:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch, 3, height, width)`):
                Normalised images; height and width multiples of the patch size (see [`TaskExpertImageProcessor`]).
            labels (`dict[str, torch.Tensor]`, *optional*):
                Per task, labels following `task_definitions` (ignore value 255). Tasks without labels get no loss.
            tasks (`list[str]`, *optional*):
                Run only these tasks' routes and heads (default: all tasks of the config).
            output_hidden_states (`bool`, *optional*):
                Return the token maps after the embeddings and every block; defaults to `config.output_hidden_states`.
            return_dict (`bool`, *optional*):
                Return a [`ModSquadOutput`] instead of a tuple; defaults to `config.return_dict`.
        """
        return_dict = self.config.return_dict if return_dict is None else return_dict
        tasks = self.resolve_tasks(tasks)
        self.check_label_tasks(labels)
        outputs = self.modsquad(pixel_values, tasks=tasks, output_hidden_states=output_hidden_states, return_dict=True)
        decoded = self.decode_and_loss(
            outputs.task_features, tasks, tuple(pixel_values.shape[-2:]), labels=labels, aux_losses=outputs.aux_losses
        )
        output = ModSquadOutput(
            loss=decoded.loss,
            task_losses=decoded.task_losses,
            aux_loss=decoded.aux_loss,
            aux_losses=outputs.aux_losses,
            logits=decoded.logits,
            expert_usage=outputs.expert_usage,
            hidden_states=outputs.hidden_states,
        )
        return output if return_dict else output.to_tuple()

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
        """Per task: `"counts"` (num_moe_layers, max_experts) int64 selections since the last reset, `"share"` the
        counts normalised per layer, `"ema"` the moving average of per-batch shares; zero-padded like `expert_usage`.
        Layer names are `[name for name, _ in model.modsquad.moe_layers]`."""
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
    ) -> "ModSquadForDensePrediction":
        """Build a standalone one-task model that keeps only the experts `task` uses.

        Args:
            task (`str`): the task to keep.
            by (`str`, *optional*, defaults to `"usage"`):
                How the experts are chosen, per MoE layer.
                `"usage"`: from the accumulated statistics (see [`track_expert_usage`]): experts whose share of the
                task's selections is above `threshold` (`None`: every expert selected at least once).
                `"router"`: every expert the task's router puts in the top-k of at least one token of
                `calibration_pixel_values` (one batch or an iterable of batches).
            threshold (`float`, *optional*): minimum usage share for `by="usage"`.
            calibration_pixel_values: images for `by="router"`.

        Every layer keeps at least its top-k experts (topped up with the most used, then the lowest ids). The new
        model has the task's router columns of the kept experts and only the task's head; `config.experts_per_layer`
        records the layer sizes. Its outputs equal the full model's for the task on any input whose tokens select
        only kept experts (top-k over the kept experts picks the same experts with the same renormalised gates).
        """
        if task not in self.config.tasks:
            raise ValueError(f"Unknown task {task!r}; this model predicts {self.config.tasks}.")
        task_index = self.config.tasks.index(task)
        layers = self.modsquad.moe_layers
        if by == "usage":
            if threshold is not None and not 0.0 <= threshold < 1.0:
                raise ValueError(f"`threshold` must be in [0, 1), got {threshold!r}.")
            counts = [layer.expert_counts[task_index].float() for _, layer in layers]
            if all(c.sum() == 0 for c in counts):
                raise ValueError(
                    f"No expert usage has been recorded for task {task!r}: train the model, or run data through it "
                    "under `model.track_expert_usage()`, or use by='router' with calibration images."
                )
            scores = [c / c.sum().clamp_min(1) for c in counts]
            selected = [s > (threshold if threshold is not None else 0.0) for s in scores]
        elif by == "router":
            if threshold is not None:
                raise ValueError("`threshold` applies to by='usage' only.")
            if calibration_pixel_values is None:
                raise ValueError("by='router' needs `calibration_pixel_values` (a batch or an iterable of batches).")
            batches = [calibration_pixel_values] if isinstance(calibration_pixel_values, torch.Tensor) else calibration_pixel_values
            scores = [torch.zeros(layer.num_experts, device=layer.router_weight.device) for _, layer in layers]
            was_training = self.training
            self.eval()
            try:
                with self.track_expert_usage(False):
                    for pixel_values in batches:
                        usage = self.modsquad(pixel_values, tasks=[task]).expert_usage[task]
                        for i, (_, layer) in enumerate(layers):
                            scores[i] += usage[i, : layer.num_experts]
            finally:
                self.train(was_training)
            if all(s.sum() == 0 for s in scores):
                raise ValueError("`calibration_pixel_values` held no images.")
            selected = [s > 0 for s in scores]
        else:
            raise ValueError(f"`by` must be 'usage' or 'router', got {by!r}.")

        keep = []
        for (_, layer), chosen, score in zip(layers, selected, scores):
            if int(chosen.sum()) < layer.top_k:  # top-k routing needs k experts: add the most used ones
                ranking = sorted(range(layer.num_experts), key=lambda e: (not bool(chosen[e]), -float(score[e]), e))
                chosen = torch.zeros_like(chosen)
                chosen[ranking[: layer.top_k]] = True
            keep.append(chosen.nonzero().flatten())

        config = copy.deepcopy(self.config)
        config.tasks = [task]
        config.task_id2label = {t: labels for t, labels in config.task_id2label.items() if t == task}
        config.loss_weights = {task: config.loss_weights[task]}
        config.experts_per_layer = [int(k.numel()) for k in keep]
        config.validate_modsquad()
        extracted = type(self)(config).to(device=self.device, dtype=self.dtype)

        state = {}
        moe_names = set()
        for (name, layer), kept in zip(layers, keep):
            prefix = f"{self.base_model_prefix}.{name}"
            moe_names.add(prefix)
            state.update({f"{prefix}.{key}": value for key, value in layer.extract_state(task_index, kept).items()})
        for key, value in self.state_dict().items():
            if any(key.startswith(name + ".") for name in moe_names):
                continue
            if key.startswith("heads.") and not key.startswith(f"heads.{task}."):
                continue
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
    "mutual_information_loss",
]
