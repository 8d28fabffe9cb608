"""PyTorch TaskExpert: a ViT-style backbone with Memorial Mixture-of-Experts (MMoE) layers and dense task heads.

Data flow for one image and T tasks (see the config docstring for every option):

    backbone layer l  ->  tokens X (B, N, C)
    MMoE layer k      ->  experts      Z_e = expert_e(LN(X))                       (B, N, E, D)
                          gates        g_t = softmax(W_t [LN(X); mean LN(X)])       (B, T, N, E+1)
                          assembly     F_t = sum_e g_t,e Z_e + g_t,mem M_t          (B, T, N, D)
                          memory write M_t <- LN_t(F_t)
    heads             ->  one light dense head per task on the final memory
"""

from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoBackbone, ViTModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import can_return_tuple, logging

from .configuration_taskexpert import TaskExpertConfig
from .dense_model_utils import (
    DenseMultiTaskModelOutput,
    DenseMultiTaskOutput,
    DenseMultiTaskPreTrainedModel,
    check_pixel_values,
)

logger = logging.get_logger(__name__)


# One output class per level for every model type of this package; the TaskExpert names are kept for code that
# imports them.
TaskExpertModelOutput = DenseMultiTaskModelOutput
TaskExpertOutput = DenseMultiTaskOutput


class TaskExpertBackbone(nn.Module):
    """Runs the backbone and returns the token maps (B, C_k, h_k, w_k) after each MMoE layer index.

    A `ViTConfig` backbone is a `ViTModel` tapped through its hidden states (the class token is dropped, position
    embeddings are interpolated for any input size); any other config is built with `AutoBackbone` and
    `out_indices = mmoe_layers`.
    """

    def __init__(self, config: TaskExpertConfig):
        super().__init__()
        # The backbone runs on `config.backbone_config` itself (not a copy), so that its attention implementation and
        # output settings are the ones the config shows and `set_attn_implementation` changes.
        backbone_config = config.backbone_config
        self.layers = list(config.mmoe_layers)
        self.is_vit = backbone_config.model_type == "vit"
        if self.is_vit:
            # Layers after the last tap would be computed for nothing: build only those that are used (the config keeps
            # the backbone's full depth, which the ViT reads only while it is built). The final LayerNorm is applied
            # to the last tap when it is the backbone's last layer (as the reference ViT multi-level taps do) and
            # dropped otherwise.
            depth = backbone_config.num_hidden_layers
            self.uses_final_norm = self.layers[-1] == depth
            backbone_config.num_hidden_layers = self.layers[-1]
            try:
                self.model = ViTModel(backbone_config, add_pooling_layer=False)
            finally:
                backbone_config.num_hidden_layers = depth
            if not self.uses_final_norm:
                self.model.layernorm = nn.Identity()
            self.channels = [backbone_config.hidden_size] * len(self.layers)
        else:
            if list(backbone_config.out_indices or []) != self.layers:
                backbone_config.out_indices = self.layers  # also sets out_features
            self.model = AutoBackbone.from_config(backbone_config)
            self.channels = list(self.model.channels)

    def get_input_embeddings(self) -> nn.Module:
        """The backbone's patch embeddings."""
        return self.model.get_input_embeddings()

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        if self.is_vit:
            outputs = self.model(pixel_values, interpolate_pos_encoding=True, output_hidden_states=True)
            patch = self.model.config.patch_size
            height, width = pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch
            maps = []
            for layer in self.layers:
                if layer == self.layers[-1] and self.uses_final_norm:
                    tokens = outputs.last_hidden_state[:, 1:]  # drop the class token
                else:
                    tokens = outputs.hidden_states[layer][:, 1:]
                maps.append(tokens.transpose(1, 2).reshape(tokens.shape[0], -1, height, width))
            return maps
        return list(self.model(pixel_values).feature_maps)


class TaskwiseLayerNorm(nn.Module):
    """LayerNorm over the last dimension with separate affine parameters per task: input (B, T, N, D)."""

    def __init__(self, num_tasks: int, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_tasks, dim))
        self.bias = nn.Parameter(torch.zeros(num_tasks, dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, task_index: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x, x.shape[-1:], eps=self.eps)
        return x * self.weight[task_index][:, None] + self.bias[task_index][:, None]


class TaskExpertExperts(nn.Module):
    """E expert networks computed at once: Linear(C, D), [depthwise 3x3 conv], LayerNorm, GELU, Linear(D, D).

    Weights are stacked per expert so that the first layer is a single (C, E*D) matmul and the second a batched
    matmul over experts; there is no Python loop over experts.
    """

    def __init__(self, config: TaskExpertConfig, in_channels: int):
        super().__init__()
        experts, dim = config.num_experts, config.expert_hidden_size
        self.num_experts, self.dim = experts, dim
        self.fc1_weight = nn.Parameter(torch.empty(in_channels, experts * dim))
        self.fc1_bias = nn.Parameter(torch.zeros(experts * dim))
        self.depthwise = (
            nn.Conv2d(experts * dim, experts * dim, 3, padding=1, groups=experts * dim)
            if config.expert_type == "conv"
            else None
        )
        self.norm_weight = nn.Parameter(torch.ones(experts, dim))
        self.norm_bias = nn.Parameter(torch.zeros(experts, dim))
        self.fc2_weight = nn.Parameter(torch.empty(experts, dim, dim))
        self.fc2_bias = nn.Parameter(torch.zeros(experts, dim))
        self.eps = config.layer_norm_eps

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """tokens (B, N, C) -> expert features (B, N, E, D)."""
        batch, num_tokens, _ = tokens.shape
        hidden = torch.addmm(self.fc1_bias, tokens.reshape(batch * num_tokens, -1), self.fc1_weight)
        if self.depthwise is not None:
            hidden = hidden.view(batch, *grid, -1).permute(0, 3, 1, 2)
            hidden = self.depthwise(hidden).permute(0, 2, 3, 1).reshape(batch * num_tokens, -1)
        hidden = hidden.view(batch * num_tokens, self.num_experts, self.dim)
        # Per-expert LayerNorm affine in one fused multiply-add (F.layer_norm's affine is shared by all experts).
        hidden = F.gelu(
            torch.addcmul(self.norm_bias, F.layer_norm(hidden, (self.dim,), eps=self.eps), self.norm_weight)
        )
        # (E, B*N, D) @ (E, D, D) + bias: one batched matmul for all experts, the bias added inside it.
        out = torch.baddbmm(self.fc2_bias.unsqueeze(1), hidden.transpose(0, 1), self.fc2_weight)
        return out.transpose(0, 1).reshape(batch, num_tokens, self.num_experts, self.dim)


class TaskExpertGates(nn.Module):
    """Task-specific, sample-dependent gates: per task a linear map of [token; mean token] to softmax weights over
    the candidates (E experts, plus the memory). Weights of all tasks are stacked so one matmul serves them all.
    Zero-initialised, so training starts from uniform gates."""

    def __init__(self, config: TaskExpertConfig, in_channels: int, num_tasks: int, num_candidates: int):
        super().__init__()
        self.num_tasks, self.num_candidates = num_tasks, num_candidates
        self.granularity = config.gate_granularity
        self.use_context = config.gate_use_context or config.gate_granularity == "image"
        self.top_k = config.gate_top_k
        self.uniform = config.gating == "uniform"
        if not self.uniform:
            self.token_weight = (
                nn.Parameter(torch.zeros(in_channels, num_tasks * num_candidates))
                if self.granularity == "token"
                else None
            )
            self.context_weight = (
                nn.Parameter(torch.zeros(in_channels, num_tasks * num_candidates)) if self.use_context else None
            )
            self.bias = nn.Parameter(torch.zeros(num_tasks * num_candidates))

    def forward(self, tokens: torch.Tensor, task_index: torch.Tensor) -> torch.Tensor:
        """tokens (B, N, C) -> gates (B, T', N or 1, K) for the tasks in `task_index` (T' of them)."""
        batch = tokens.shape[0]
        num_selected = task_index.numel()
        if self.uniform:
            return tokens.new_full((batch, num_selected, 1, self.num_candidates), 1.0 / self.num_candidates)
        # Select the requested tasks' columns: (C, T*K) -> (C, T', K).
        columns = (
            task_index[:, None] * self.num_candidates + torch.arange(self.num_candidates, device=tokens.device)
        ).flatten()
        logits = self.bias[columns].view(1, 1, num_selected, self.num_candidates)
        if self.context_weight is not None:
            context = tokens.mean(dim=1) @ self.context_weight[:, columns]
            logits = logits + context.view(batch, 1, num_selected, self.num_candidates)
        if self.token_weight is not None:
            logits = logits + (tokens @ self.token_weight[:, columns]).view(
                batch, -1, num_selected, self.num_candidates
            )
        gates = logits.float().softmax(dim=-1)
        if self.top_k is not None and self.top_k < self.num_candidates:
            top_values, top_indices = gates.topk(self.top_k, dim=-1)
            gates = torch.zeros_like(gates).scatter(-1, top_indices, top_values / top_values.sum(-1, keepdim=True))
        return gates.to(tokens.dtype).transpose(1, 2)  # (B, T', N or 1, K)


class TaskExpertMMoELayer(GradientCheckpointingLayer):
    """One Memorial Mixture-of-Experts layer: decompose, gate, assemble, read and write the memory."""

    def __init__(self, config: TaskExpertConfig, in_channels: int, is_first: bool):
        super().__init__()
        num_tasks, dim = len(config.tasks), config.expert_hidden_size
        self.use_memory = config.use_memory
        self.memory_update = config.memory_update
        self.momentum = config.memory_ema_momentum
        self.num_experts = config.num_experts
        self.input_norm = nn.LayerNorm(in_channels, eps=config.layer_norm_eps)
        self.experts = TaskExpertExperts(config, in_channels)
        self.gates = TaskExpertGates(config, in_channels, num_tasks, config.num_experts + int(config.use_memory))
        if self.use_memory:
            self.memory_norm = TaskwiseLayerNorm(num_tasks, dim, config.layer_norm_eps)
            # The first MMoE layer creates the memory from its tokens (or from zeros).
            self.memory_projection = (
                nn.Parameter(torch.empty(num_tasks, in_channels, dim))
                if is_first and config.memory_init == "projection"
                else None
            )
            self.memory_dim = dim

    def initial_memory(self, tokens: torch.Tensor, task_index: torch.Tensor) -> torch.Tensor:
        if self.memory_projection is None:
            return tokens.new_zeros(tokens.shape[0], task_index.numel(), tokens.shape[1], self.memory_dim)
        # One (B*N, C) @ (C, T'*D) matmul for all selected tasks.
        batch, num_tokens, channels = tokens.shape
        weight = self.memory_projection[task_index].transpose(0, 1).reshape(channels, -1)
        memory = (tokens.reshape(batch * num_tokens, channels) @ weight).view(batch, num_tokens, -1, self.memory_dim)
        return memory.transpose(1, 2)

    def forward(
        self,
        feature_map: torch.Tensor,
        memory: Optional[torch.Tensor],
        memory_grid: Optional[tuple[int, int]],
        task_index: torch.Tensor,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
        """feature_map (B, C, h, w), memory (B, T', N', D) on `memory_grid` or None ->
        task features (B, T', N, D), new memory (B, T', N, D) or None, gates (B, T', N or 1, K)."""
        grid = tuple(feature_map.shape[-2:])
        tokens = self.input_norm(feature_map.flatten(2).transpose(1, 2))
        experts = self.experts(tokens, grid)  # (B, N, E, D)
        gates = self.gates(tokens, task_index)  # (B, T', N or 1, K)
        expert_gates = gates[..., : self.num_experts].expand(-1, -1, tokens.shape[1], -1)
        # Per token: (T', E) @ (E, D) -> (T', D), for all tokens at once.
        features = torch.matmul(expert_gates.transpose(1, 2), experts).transpose(1, 2)  # (B, T', N, D)
        if not self.use_memory:
            return features, None, gates
        if memory is None:
            memory = self.initial_memory(tokens, task_index)
        elif memory_grid != grid:
            # Hierarchical backbones (Swin, ...) change the token grid between layers.
            memory = _to_maps(memory, memory_grid, grid).flatten(3).transpose(2, 3)
        features = torch.addcmul(features, gates[..., self.num_experts :], memory)
        written = self.memory_norm(features, task_index)
        if self.memory_update == "residual":
            written = memory + written
        elif self.memory_update == "ema":
            written = self.momentum * memory + (1.0 - self.momentum) * written
        return features, written, gates


class TaskExpertPreTrainedModel(DenseMultiTaskPreTrainedModel):
    config_class = TaskExpertConfig
    config: TaskExpertConfig
    base_model_prefix = "taskexpert"
    # The units FSDP wraps and a device map never splits: the ViT backbone's block and the MMoE layer.
    _no_split_modules = ["ViTLayer", "TaskExpertMMoELayer"]
    # Attention lives in the backbone, which checks the requested implementation against what it supports itself.
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, TaskExpertExperts):
            init.trunc_normal_(module.fc1_weight, std=std)
            init.zeros_(module.fc1_bias)
            init.ones_(module.norm_weight)
            init.zeros_(module.norm_bias)
            init.trunc_normal_(module.fc2_weight, std=std)
            init.zeros_(module.fc2_bias)
        elif isinstance(module, TaskExpertGates):
            if not module.uniform:
                for weight in (module.token_weight, module.context_weight):
                    if weight is not None:
                        init.zeros_(weight)
                init.zeros_(module.bias)
        elif isinstance(module, TaskwiseLayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, TaskExpertMMoELayer):
            if module.use_memory and module.memory_projection is not None:
                init.trunc_normal_(module.memory_projection, std=std)
        else:
            super()._init_weights(module)

    def load_pretrained_backbone(self, checkpoint: Optional[str] = None, **hub_kwargs) -> None:
        """Load pretrained backbone weights (safetensors only) from a Hub id or a local folder.

        Uses `checkpoint`, or the config's `backbone_checkpoint`. The checkpoint must be a model of the backbone's type
        (e.g. a `ViTModel` checkpoint such as an ImageNet ViT-L/16); heads of that checkpoint are ignored.
        """
        checkpoint = checkpoint or self.config.backbone_checkpoint
        if not checkpoint:
            raise ValueError("No backbone checkpoint given and `config.backbone_checkpoint` is empty.")
        backbone = self.get_backbone_module()
        source_class = ViTModel if backbone.is_vit else AutoBackbone
        kwargs = {"add_pooling_layer": False} if backbone.is_vit else {}
        pretrained = source_class.from_pretrained(checkpoint, use_safetensors=True, **kwargs, **hub_kwargs)
        missing, unexpected = backbone.model.load_state_dict(pretrained.state_dict(), strict=False)
        if missing:
            raise ValueError(f"Backbone checkpoint {checkpoint!r} lacks {len(missing)} weights, e.g. {missing[:3]}.")

    def get_backbone_module(self) -> TaskExpertBackbone:
        model = getattr(self, self.base_model_prefix, self)
        return model.backbone


class TaskExpertModel(TaskExpertPreTrainedModel):
    """Backbone + MMoE layers + multi-task memory; returns the per-task features the heads decode."""

    def __init__(self, config: TaskExpertConfig):
        super().__init__(config)
        self.backbone = TaskExpertBackbone(config)
        self.mmoe_layers = nn.ModuleList(
            TaskExpertMMoELayer(config, channels, is_first=k == 0) for k, channels in enumerate(self.backbone.channels)
        )
        if not config.use_memory and len(self.mmoe_layers) > 1 and not config.head_uses_all_layers:
            logger.warning(
                "use_memory=False with %d MMoE layers and head_uses_all_layers=False: only the last MMoE layer reaches "
                "the heads; the others compute features nothing reads (and their gates get no gradient). Set "
                "head_uses_all_layers=True or keep one MMoE layer.",
                len(self.mmoe_layers),
            )
        self.post_init()

    @property
    def feature_channels(self) -> int:
        """Channels of each task's feature map given to the heads."""
        dim = self.config.expert_hidden_size
        return dim * len(self.mmoe_layers) if self.config.head_uses_all_layers else dim

    def get_input_embeddings(self) -> nn.Module:
        """The backbone's patch embeddings (what `enable_input_require_grads` hooks)."""
        return self.backbone.get_input_embeddings()

    def check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        channels = getattr(self.config.backbone_config, "num_channels", 3)
        check_pixel_values(pixel_values, channels, self.config.patch_size)

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
                Normalised images; height and width multiples of the patch size.
            tasks (`list[str]`, *optional*):
                Compute only these tasks' gates and memory (default: all tasks of the config).
            output_gates (`bool`, *optional*):
                Return the routing report (`gates`); defaults to `config.output_gates`.
            output_hidden_states (`bool`, *optional*):
                Return the backbone token maps of the MMoE layers; defaults to `config.output_hidden_states`.
            return_dict (`bool`, *optional*):
                Return a [`DenseMultiTaskModelOutput`] instead of a tuple; defaults to `config.return_dict`.

        `hidden_states` are the backbone token maps `(batch, channels, h, w)` the MMoE layers read, one per MMoE
        layer.
        """
        output_gates = self.config.output_gates if output_gates is None else output_gates
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        self.check_pixel_values(pixel_values)
        tasks = self.resolve_tasks(tasks)
        task_index = torch.tensor([self.config.tasks.index(task) for task in tasks], device=pixel_values.device)

        feature_maps = self.backbone(pixel_values)
        memory, memory_grid, layer_features, all_gates = None, None, [], []
        for layer, feature_map in zip(self.mmoe_layers, feature_maps):
            grid = tuple(feature_map.shape[-2:])
            # Positional arguments: GradientCheckpointingLayer needs them to recompute under checkpointing.
            features, memory, gates = layer(feature_map, memory, memory_grid, task_index)
            memory_grid = grid
            layer_features.append((features, grid))
            if output_gates:
                batch, _, num_tokens, candidates = gates.shape
                gate_grid = grid if num_tokens > 1 else (1, 1)
                all_gates.append({t: gates[:, i].reshape(batch, *gate_grid, candidates) for i, t in enumerate(tasks)})

        final_grid = layer_features[-1][1]
        if self.config.head_uses_all_layers:
            finest = max((grid for _, grid in layer_features), key=lambda g: g[0] * g[1])
            stacked = [_to_maps(f, grid, finest) for f, grid in layer_features]
            stacked[-1] = _to_maps(memory if memory is not None else layer_features[-1][0], final_grid, finest)
            maps = torch.cat(stacked, dim=2)
        else:
            maps = _to_maps(memory if memory is not None else layer_features[-1][0], final_grid, final_grid)
        return DenseMultiTaskModelOutput(
            task_features=maps,
            tasks=tuple(tasks),
            gates=tuple(all_gates) if output_gates else None,
            hidden_states=tuple(feature_maps) if output_hidden_states else None,
        )


def _to_maps(features: torch.Tensor, grid: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
    """(B, T, N, D) tokens on `grid` -> (B, T, D, h, w) maps on `target`.

    The maps are a channels-last view of the tokens (no copy), which the heads' channels-last convolutions take as
    they are, without a reorder to channels-first."""
    batch, tasks, _, dim = features.shape
    maps = features.reshape(batch * tasks, *grid, dim).permute(0, 3, 1, 2)
    if grid != target:
        maps = F.interpolate(maps, size=target, mode="bilinear", align_corners=False)
    return maps.unflatten(0, (batch, tasks))


class TaskExpertForDensePrediction(TaskExpertPreTrainedModel):
    """TaskExpert with one dense head per task and the benchmark losses."""

    def __init__(self, config: TaskExpertConfig):
        super().__init__(config)
        self.taskexpert = TaskExpertModel(config)
        self.heads = self.build_task_heads(self.taskexpert.feature_channels)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.taskexpert.get_input_embeddings()

    @property
    def aux_loss_weights(self) -> dict[str, float]:
        return {"gate_balance": self.config.gate_balance_loss_weight}

    def trunk_outputs(
        self,
        pixel_values: torch.Tensor,
        tasks: list[str],
        output_gates: bool,
        output_hidden_states: Optional[bool],
        with_labels: bool,
    ) -> DenseMultiTaskModelOutput:
        # The gate regulariser is reported with labels (added to the loss only with a positive weight).
        needs_gates = with_labels and self.config.gating == "dynamic"
        outputs = self.taskexpert(
            pixel_values,
            tasks=tasks,
            output_gates=output_gates or needs_gates,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        if needs_gates:
            outputs.aux_losses = {"gate_balance": gate_balance_loss(outputs.gates)}
        return outputs


def gate_balance_loss(gates: tuple[dict[str, torch.Tensor], ...]) -> torch.Tensor:
    """Load-balance regulariser: K * sum_k (mean gate_k)^2 per layer and task, minus 1, averaged.

    It is 0 when a task uses all K candidates equally on average and grows as it concentrates on few of them.
    """
    terms = []
    for layer in gates:
        for task_gates in layer.values():
            usage = task_gates.float().flatten(0, -2).mean(dim=0)
            terms.append(usage.numel() * (usage**2).sum() - 1.0)
    return torch.stack(terms).mean()


__all__ = [
    "TaskExpertPreTrainedModel",
    "TaskExpertModel",
    "TaskExpertForDensePrediction",
    "TaskExpertOutput",
    "TaskExpertModelOutput",
    "gate_balance_loss",
]
