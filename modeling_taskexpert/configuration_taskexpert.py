"""TaskExpert model configuration."""

from typing import Optional, Union

from transformers import AutoConfig, PretrainedConfig, ViTConfig

from .configuration_common import (
    DenseMultiTaskConfig,
    as_list,
    check_bool,
    check_choice,
    check_int,
    check_int_list,
    check_number,
    check_optional_str,
)

_CHOICES = {
    "expert_type": ("mlp", "conv"),
    "gating": ("dynamic", "uniform"),
    "gate_granularity": ("token", "image"),
    "memory_init": ("projection", "zeros"),
    "memory_update": ("replace", "residual", "ema"),
}
_BOOLEANS = ("gate_use_context", "use_memory", "head_uses_all_layers")


class TaskExpertConfig(DenseMultiTaskConfig):
    r"""
    Configuration of a [`TaskExpertModel`] / [`TaskExpertForDensePrediction`]: a ViT-style backbone with Memorial
    Mixture-of-Experts (MMoE) layers after chosen backbone layers and one light dense head per task (TaskExpert,
    Ye & Xu, ICCV 2023, arXiv 2307.15324).

    The authors did not release code. Fields marked *(interpretation)* are choices this implementation makes where
    the paper leaves room; their defaults are the reading closest to the paper, and the alternatives exist for
    ablations. The defaults describe the paper's PASCAL-Context setting with a ViT-L/16 backbone at 512x512.

    Args:
        backbone_config (`PretrainedConfig` or `dict`, *optional*):
            Configuration of the backbone. A `ViTConfig` (the default, ViT-L/16 at 512x512) is run as a `ViTModel`
            and tapped at every layer; any other type is built with `AutoBackbone` (DINOv2, Swin, ...) with
            `out_indices = mmoe_layers`. A dict must carry `model_type`.
        backbone_checkpoint (`str`, *optional*):
            Hub id or local folder of pretrained backbone weights (safetensors), loaded by
            [`TaskExpertPreTrainedModel.load_pretrained_backbone`] when training starts from scratch. Ignored by
            `from_pretrained`, whose checkpoint already holds the backbone.
        mmoe_layers (`list[int]`, *optional*, defaults to `[6, 12, 18, 24]`):
            1-based indices of the backbone layers after which an MMoE layer sits (every quarter of the depth).
        num_experts (`int`, *optional*, defaults to 8):
            Number of expert networks E per MMoE layer. *(interpretation: the count is a hyper-parameter)*
        expert_hidden_size (`int`, *optional*, defaults to 256):
            Width D of the task-generic expert features and of the multi-task memory. *(interpretation)*
        expert_type (`str`, *optional*, defaults to `"mlp"`):
            `"mlp"`: Linear(C, D), LayerNorm, GELU, Linear(D, D) per expert. `"conv"` adds a depthwise 3x3 conv after
            the first linear layer (the convolutional experts named as future work in the paper).
            *(interpretation)*
        gating (`str`, *optional*, defaults to `"dynamic"`):
            `"dynamic"`: task-specific, sample-dependent gates (the paper). `"uniform"`: every candidate weighted
            equally (static-gate ablation).
        gate_granularity (`str`, *optional*, defaults to `"token"`):
            `"token"`: one weight vector per token; `"image"`: one per sample, from the global context only.
            *(interpretation)*
        gate_use_context (`bool`, *optional*, defaults to `True`):
            Whether a token gate also reads the mean token of the image ("context-aware" gating). *(interpretation)*
        gate_top_k (`int`, *optional*):
            Keep only the k largest gate weights (renormalised). `None` keeps the gates dense, as in the paper.
        use_memory (`bool`, *optional*, defaults to `True`):
            Whether the multi-task feature memory is read (as an extra expert) and written at every MMoE layer.
            `False` is the no-memory ablation: heads decode the last layer's task features.
        memory_init (`str`, *optional*, defaults to `"projection"`):
            Memory before the first MMoE layer: a per-task linear map of that layer's tokens, or `"zeros"`.
            *(interpretation)*
        memory_update (`str`, *optional*, defaults to `"replace"`):
            Memory write. `"replace"`: M_k = LN(F_k) (the gate, which reads the old memory as a candidate, decides
            how much of the past is kept); `"residual"`: M_k = M_{k-1} + LN(F_k); `"ema"`:
            M_k = m M_{k-1} + (1 - m) LN(F_k). *(interpretation)*
        memory_ema_momentum (`float`, *optional*, defaults to 0.5):
            m of the `"ema"` memory update.
        head_uses_all_layers (`bool`, *optional*, defaults to `False`):
            Whether heads read the concatenated task features of all MMoE layers (multi-scale) instead of the final
            memory only. Without the memory (`use_memory=False`) set it when there are several MMoE layers: nothing
            else carries the earlier layers' task features to the heads (the model warns otherwise).
        gate_balance_loss_weight (`float`, *optional*, defaults to 0.0):
            Weight of an optional regulariser that keeps the average gate of each task close to uniform over the
            candidates (load balance). Off in the paper's setting.
        layer_norm_eps (`float`, *optional*, defaults to 1e-6):
            Epsilon of the MMoE layer norms.

    The task and head fields (`tasks`, `task_id2label`, `task_kinds`, `head_hidden_size`, `head_norm`,
    `depth_activation`, `loss_weights`, `boundary_positive_weight`, `initializer_range`, `output_gates`) are those of
    [`DenseMultiTaskConfig`].

    The routing report reads with two derived (not saved) attributes: `layer_names`, one name per MMoE layer, and
    `candidate_names`, per layer the names of the gate's candidates in gate order (`"expert 0"`, ..., `"memory"`;
    experts are numbered from 0, their index in the gates, as in Mod-Squad).

    Example:

    ```python
    >>> from modeling_taskexpert import TaskExpertConfig, TaskExpertForDensePrediction
    >>> config = TaskExpertConfig(tasks=["semseg", "depth"], task_id2label={"semseg": {0: "floor", 1: "wall"}})
    >>> model = TaskExpertForDensePrediction(config)
    ```
    """

    model_type = "taskexpert"
    sub_configs = {"backbone_config": AutoConfig}

    backbone_config: PretrainedConfig
    backbone_checkpoint: Optional[str]
    mmoe_layers: list[int]
    num_experts: int
    expert_hidden_size: int
    expert_type: str
    gating: str
    gate_granularity: str
    gate_use_context: bool
    gate_top_k: Optional[int]
    use_memory: bool
    memory_init: str
    memory_update: str
    memory_ema_momentum: float
    head_uses_all_layers: bool
    gate_balance_loss_weight: float
    layer_norm_eps: float

    def __init__(
        self,
        backbone_config: Optional[Union[PretrainedConfig, dict]] = None,
        backbone_checkpoint: Optional[str] = None,
        mmoe_layers: Optional[list[int]] = None,
        num_experts: int = 8,
        expert_hidden_size: int = 256,
        expert_type: str = "mlp",
        gating: str = "dynamic",
        gate_granularity: str = "token",
        gate_use_context: bool = True,
        gate_top_k: Optional[int] = None,
        use_memory: bool = True,
        memory_init: str = "projection",
        memory_update: str = "replace",
        memory_ema_momentum: float = 0.5,
        head_uses_all_layers: bool = False,
        gate_balance_loss_weight: float = 0.0,
        layer_norm_eps: float = 1e-6,
        **kwargs,
    ):
        if backbone_config is None:
            backbone_config = ViTConfig(
                hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                image_size=512, patch_size=16, layer_norm_eps=1e-6, qkv_bias=True,
            )  # fmt: skip
        elif isinstance(backbone_config, dict):
            if "model_type" not in backbone_config:
                raise ValueError("`backbone_config` given as a dict needs a 'model_type' key (e.g. 'vit', 'dinov2').")
            backbone_config = AutoConfig.for_model(**backbone_config)
        elif not isinstance(backbone_config, PretrainedConfig):
            raise TypeError(
                f"`backbone_config` must be a PretrainedConfig or a dict, got {type(backbone_config).__name__}."
            )
        self.backbone_config = backbone_config
        self.backbone_checkpoint = backbone_checkpoint
        self.mmoe_layers = as_list(mmoe_layers) if mmoe_layers is not None else [6, 12, 18, 24]
        self.num_experts = num_experts
        self.expert_hidden_size = expert_hidden_size
        self.expert_type = expert_type
        self.gating = gating
        self.gate_granularity = gate_granularity
        self.gate_use_context = gate_use_context
        self.gate_top_k = gate_top_k
        self.use_memory = use_memory
        self.memory_init = memory_init
        self.memory_update = memory_update
        self.memory_ema_momentum = memory_ema_momentum
        self.head_uses_all_layers = head_uses_all_layers
        self.gate_balance_loss_weight = gate_balance_loss_weight
        self.layer_norm_eps = layer_norm_eps
        super().__init__(**kwargs)  # the task and head fields, then `validate_architecture`

    # ------------------------------------------------------------------------------------------------------------
    @property
    def backbone_num_layers(self) -> int:
        """Number of layers (or stages) of the backbone that `mmoe_layers` may index."""
        backbone = self.backbone_config
        if getattr(backbone, "stage_names", None) and backbone.model_type != "vit":
            return len(backbone.stage_names) - 1  # stage_names[0] is the stem
        return backbone.num_hidden_layers

    @property
    def layer_names(self) -> list[str]:
        """Name of every routing (MMoE) layer, in network order: the `gates` entries of the routing report."""
        return [f"MMoE {k + 1} (after backbone layer {layer})" for k, layer in enumerate(self.mmoe_layers)]

    @property
    def candidate_names(self) -> list[list[str]]:
        """Per routing layer, the names of the gate's candidates in gate order: the experts, then the memory."""
        names = [f"expert {e}" for e in range(self.num_experts)] + (["memory"] if self.use_memory else [])
        return [list(names) for _ in self.mmoe_layers]

    def validate_architecture(self) -> None:
        """Check every field; raise a ValueError naming the field and what was expected."""
        super().validate_architecture()
        check_optional_str("backbone_checkpoint", self.backbone_checkpoint)
        for field, choices in _CHOICES.items():
            check_choice(field, getattr(self, field), choices)
        for field in _BOOLEANS:
            check_bool(field, getattr(self, field))
        for field in ("num_experts", "expert_hidden_size"):
            check_int(field, getattr(self, field), minimum=1)
        check_int_list("mmoe_layers", self.mmoe_layers)
        num_layers = self.backbone_num_layers
        if not self.mmoe_layers:
            raise ValueError("`mmoe_layers` must name at least one backbone layer.")
        for layer in self.mmoe_layers:
            if not 1 <= layer <= num_layers:
                raise ValueError(
                    f"`mmoe_layers` entry {layer!r} is out of range: the backbone has layers 1..{num_layers}."
                )
        if list(self.mmoe_layers) != sorted(set(self.mmoe_layers)):
            raise ValueError(f"`mmoe_layers` must be strictly increasing, got {self.mmoe_layers}.")
        check_int(
            "gate_top_k", self.gate_top_k, minimum=1, maximum=self.num_experts + int(self.use_memory), allow_none=True
        )
        check_number("memory_ema_momentum", self.memory_ema_momentum, 0.0, 1.0)
        check_number("gate_balance_loss_weight", self.gate_balance_loss_weight, minimum=0.0)
        check_number("layer_norm_eps", self.layer_norm_eps, minimum=0.0, min_exclusive=True)
        if self.backbone_config.model_type == "vit" and self.backbone_config.num_channels != 3:
            raise ValueError("The ViT backbone must take 3-channel RGB input (`backbone_config.num_channels=3`).")

    @property
    def patch_size(self) -> int:
        """Stride of the backbone's finest token grid (the ViT patch size)."""
        patch = getattr(self.backbone_config, "patch_size", 16)
        return patch[0] if isinstance(patch, (list, tuple)) else int(patch)


__all__ = ["TaskExpertConfig"]
