"""Mod-Squad model configuration."""

from typing import Optional

from transformers import PretrainedConfig

from .configuration_common import (
    HEAD_CHOICES,
    DenseTaskConfigMixin,
    as_list,
    check_bool,
    check_choice,
    check_int,
    check_int_list,
    check_number,
    is_integer,
    resolve_task_settings,
    validate_task_settings,
)

MOE_LAYOUTS = ("twice", "every")


class ModSquadConfig(DenseTaskConfigMixin, PretrainedConfig):
    r"""
    Configuration of a [`ModSquadModel`] / [`ModSquadForDensePrediction`]: a ViT whose blocks hold mixture-of-experts
    layers (attention-head experts and MLP experts) with one sparse top-k router per task and per MoE layer, trained
    with a task-expert mutual-information loss, and one light dense head per task (Mod-Squad, Chen et al.,
    CVPR 2023, arXiv 2212.08066).

    The defaults describe the paper's main model, ViT-B/16 (12 blocks, width 768, 12 heads) with the "twice" layout:
    24 attention experts (head width 128, top-12) and 16 MLP experts (top-4). Fields marked *(interpretation)* are
    choices this implementation makes where the paper leaves room.

    Args:
        image_size (`int`, *optional*, defaults to 224):
            Side of the square input the learned position embeddings are made for; other sizes (multiples of
            `patch_size`) interpolate them bicubically.
        patch_size (`int`, *optional*, defaults to 16):
            Side of the square patches (stride of the token grid).
        num_channels (`int`, *optional*, defaults to 3):
            Input channels; must be 3 (RGB).
        hidden_size (`int`, *optional*, defaults to 768):
            Token width C.
        num_hidden_layers (`int`, *optional*, defaults to 12):
            Number of transformer blocks.
        num_attention_heads (`int`, *optional*, defaults to 12):
            Heads of the dense attention layers (head width `hidden_size / num_attention_heads`).
        intermediate_size (`int`, *optional*, defaults to 3072):
            Hidden width of the dense MLP layers.
        qkv_bias (`bool`, *optional*, defaults to `True`):
            Whether the dense query/key/value projection has a bias.
        layer_norm_eps (`float`, *optional*, defaults to 1e-6):
            Epsilon of the layer norms.
        moe_layout (`str`, *optional*, defaults to `"twice"`):
            Where MoE layers sit when `moe_attention_layers` / `moe_mlp_layers` are not given: `"twice"` (the paper):
            even blocks have MoE attention and a dense MLP, odd blocks dense attention and an MoE MLP; `"every"`: both
            are MoE in every block. Only used to fill those two lists, which the saved config stores.
        moe_attention_layers (`list[int]`, *optional*):
            0-based indices of the blocks whose attention is a mixture of attention-head experts.
        moe_mlp_layers (`list[int]`, *optional*):
            0-based indices of the blocks whose MLP is a mixture of MLP experts.
        num_attention_experts (`int`, *optional*, defaults to 24):
            Query experts per MoE attention layer.
        attention_top_k (`int`, *optional*, defaults to 12):
            Experts (= attention heads) each token selects in an MoE attention layer.
        attention_head_dim (`int`, *optional*, defaults to 128):
            Width of one attention-head expert (query, shared key/value, input of its output projection).
        num_mlp_experts (`int`, *optional*, defaults to 16):
            Experts per MoE MLP layer.
        mlp_top_k (`int`, *optional*, defaults to 4):
            Experts each token selects in an MoE MLP layer.
        mlp_expert_hidden_size (`int`, *optional*):
            Hidden width of one MLP expert; defaults to `intermediate_size // mlp_top_k`, so a token's MoE MLP costs
            as much as the dense MLP (as in the authors' code).
        experts_per_layer (`list[int]`, *optional*):
            Number of experts of every MoE layer, in network order (block by block, attention before MLP). Left
            `None` for a full model (every MoE attention layer has `num_attention_experts`, every MoE MLP
            `num_mlp_experts`); set by [`ModSquadForDensePrediction.extract_task_model`] for a per-task model.
        mutual_information_loss_weight (`float`, *optional*, defaults to 0.005):
            Weight of the task-expert mutual-information loss of each MoE layer (the terms are summed over layers).
        load_balance_loss_weight (`float`, *optional*, defaults to 0.0):
            Weight of an optional switch-style load-balancing loss per MoE layer and task (off in the paper's main
            model).
        expert_usage_momentum (`float`, *optional*, defaults to 0.99):
            Momentum of the exponential moving average of per-task expert usage kept beside the exact counts.
        tasks (`list[str]`, *optional*, defaults to the five PASCAL-Context tasks):
            Tasks predicted by the model, from `semseg`, `human_parts`, `saliency`, `normals`, `edge`, `depth`.
        task_id2label (`dict[str, dict[int, str]]`, *optional*):
            Class names of every segmentation task; defaults to the PASCAL-Context names for the tasks present.
        head_hidden_size (`int`, *optional*, defaults to 256):
            Channels of the light per-task heads.
        head_norm (`str`, *optional*, defaults to `"group"`):
            Normalisation in the heads: `"group"`, `"batch"` or `"none"`.
        depth_activation (`str`, *optional*, defaults to `"none"`):
            Output activation of the depth head: `"none"`, `"softplus"` or `"exp"`.
        loss_weights (`dict[str, float]`, *optional*):
            Weight of each task loss in the total; defaults to the benchmark protocol's weights.
        edge_positive_weight (`float`, *optional*, defaults to 0.95):
            Weight of boundary pixels in the weighted binary cross-entropy of the `edge` task.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the truncated normal weight initialisation (routers start at zero).

    Example:

    ```python
    >>> from modeling_taskexpert import ModSquadConfig, ModSquadForDensePrediction
    >>> config = ModSquadConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256,
    ...     num_attention_experts=8, attention_top_k=4, attention_head_dim=32, num_mlp_experts=8, mlp_top_k=2,
    ...     tasks=["semseg", "depth"], task_id2label={"semseg": {0: "floor", 1: "wall"}})
    >>> model = ModSquadForDensePrediction(config)
    ```
    """

    model_type = "modsquad"

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 16,
        num_channels: int = 3,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        intermediate_size: int = 3072,
        qkv_bias: bool = True,
        layer_norm_eps: float = 1e-6,
        moe_layout: str = "twice",
        moe_attention_layers: Optional[list[int]] = None,
        moe_mlp_layers: Optional[list[int]] = None,
        num_attention_experts: int = 24,
        attention_top_k: int = 12,
        attention_head_dim: int = 128,
        num_mlp_experts: int = 16,
        mlp_top_k: int = 4,
        mlp_expert_hidden_size: Optional[int] = None,
        experts_per_layer: Optional[list[int]] = None,
        mutual_information_loss_weight: float = 0.005,
        load_balance_loss_weight: float = 0.0,
        expert_usage_momentum: float = 0.99,
        tasks: Optional[list[str]] = None,
        task_id2label: Optional[dict[str, dict[int, str]]] = None,
        head_hidden_size: int = 256,
        head_norm: str = "group",
        depth_activation: str = "none",
        loss_weights: Optional[dict[str, float]] = None,
        edge_positive_weight: float = 0.95,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.qkv_bias = qkv_bias
        self.layer_norm_eps = layer_norm_eps
        check_choice("moe_layout", moe_layout, MOE_LAYOUTS)
        blocks = range(num_hidden_layers) if is_integer(num_hidden_layers) else range(0)
        if moe_attention_layers is None:
            moe_attention_layers = [b for b in blocks if moe_layout == "every" or b % 2 == 0]
        if moe_mlp_layers is None:
            moe_mlp_layers = [b for b in blocks if moe_layout == "every" or b % 2 == 1]
        self.moe_attention_layers = as_list(moe_attention_layers)
        self.moe_mlp_layers = as_list(moe_mlp_layers)
        self.num_attention_experts = num_attention_experts
        self.attention_top_k = attention_top_k
        self.attention_head_dim = attention_head_dim
        self.num_mlp_experts = num_mlp_experts
        self.mlp_top_k = mlp_top_k
        if mlp_expert_hidden_size is None and is_integer(intermediate_size) and is_integer(mlp_top_k):
            mlp_expert_hidden_size = max(intermediate_size // max(mlp_top_k, 1), 1)
        self.mlp_expert_hidden_size = mlp_expert_hidden_size
        self.experts_per_layer = as_list(experts_per_layer)
        self.mutual_information_loss_weight = mutual_information_loss_weight
        self.load_balance_loss_weight = load_balance_loss_weight
        self.expert_usage_momentum = expert_usage_momentum

        self.tasks, self.task_id2label, self.loss_weights = resolve_task_settings(tasks, task_id2label, loss_weights)
        self.head_hidden_size = head_hidden_size
        self.head_norm = head_norm
        self.depth_activation = depth_activation
        self.edge_positive_weight = edge_positive_weight
        self.initializer_range = initializer_range
        super().__init__(**kwargs)
        self.validate_modsquad()

    # ------------------------------------------------------------------------------------------------------------
    @property
    def moe_layer_kinds(self) -> list[tuple[int, str]]:
        """(block index, "attention" or "mlp") of every MoE layer, in network order."""
        layers = []
        for block in range(self.num_hidden_layers):
            if block in self.moe_attention_layers:
                layers.append((block, "attention"))
            if block in self.moe_mlp_layers:
                layers.append((block, "mlp"))
        return layers

    @property
    def num_experts_per_layer(self) -> list[int]:
        """Number of experts of every MoE layer, in network order (`experts_per_layer`, or the defaults)."""
        if self.experts_per_layer is not None:
            return list(self.experts_per_layer)
        full = {"attention": self.num_attention_experts, "mlp": self.num_mlp_experts}
        return [full[kind] for _, kind in self.moe_layer_kinds]

    def top_k_of(self, kind: str) -> int:
        """Experts a token selects in an MoE layer of `kind` ("attention" or "mlp")."""
        return self.attention_top_k if kind == "attention" else self.mlp_top_k

    def validate_modsquad(self) -> None:
        """Check every field; raise a ValueError naming the field and what was expected."""
        positive = (
            "image_size", "patch_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "num_attention_experts", "attention_top_k", "attention_head_dim", "num_mlp_experts", "mlp_top_k",
            "mlp_expert_hidden_size", "head_hidden_size",
        )  # fmt: skip
        for field in positive:
            check_int(field, getattr(self, field), minimum=1)
        check_bool("qkv_bias", self.qkv_bias)
        check_number("layer_norm_eps", self.layer_norm_eps, minimum=0.0, min_exclusive=True)
        check_number("initializer_range", self.initializer_range, minimum=0.0)
        if self.num_channels != 3:
            raise ValueError(f"`num_channels` must be 3 (RGB input), got {self.num_channels!r}.")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be divisible by `num_attention_heads` ({self.num_attention_heads})."
            )
        if self.image_size % self.patch_size:
            raise ValueError(f"`image_size` ({self.image_size}) must be a multiple of `patch_size` ({self.patch_size}).")
        for field in ("moe_attention_layers", "moe_mlp_layers"):
            layers = getattr(self, field)
            check_int_list(field, layers)
            for block in layers:
                if not 0 <= block < self.num_hidden_layers:
                    raise ValueError(
                        f"`{field}` entry {block!r} is out of range: blocks are numbered 0..{self.num_hidden_layers - 1}."
                    )
            if list(layers) != sorted(set(layers)):
                raise ValueError(f"`{field}` must be strictly increasing, got {layers}.")
        if not self.moe_attention_layers and not self.moe_mlp_layers:
            raise ValueError("`moe_attention_layers` and `moe_mlp_layers` are both empty: Mod-Squad needs an MoE layer.")
        if self.attention_top_k > self.num_attention_experts:
            raise ValueError(
                f"`attention_top_k` ({self.attention_top_k}) exceeds `num_attention_experts` ({self.num_attention_experts})."
            )
        if self.mlp_top_k > self.num_mlp_experts:
            raise ValueError(f"`mlp_top_k` ({self.mlp_top_k}) exceeds `num_mlp_experts` ({self.num_mlp_experts}).")
        kinds = self.moe_layer_kinds
        check_int_list("experts_per_layer", self.experts_per_layer, allow_none=True)
        if self.experts_per_layer is not None:
            if len(self.experts_per_layer) != len(kinds):
                raise ValueError(
                    f"`experts_per_layer` has {len(self.experts_per_layer)} entries; the model has {len(kinds)} MoE layers."
                )
            for (block, kind), count in zip(kinds, self.experts_per_layer):
                top_k = self.top_k_of(kind)
                if not isinstance(count, int) or isinstance(count, bool) or count < top_k:
                    raise ValueError(
                        f"`experts_per_layer` gives {count!r} experts to the MoE {kind} of block {block}; it needs an "
                        f"integer >= its top-k ({top_k})."
                    )
        for field in ("mutual_information_loss_weight", "load_balance_loss_weight"):
            check_number(field, getattr(self, field), minimum=0.0)
        check_number("expert_usage_momentum", self.expert_usage_momentum, 0.0, 1.0, max_exclusive=True)
        validate_task_settings(self.tasks, self.task_id2label, self.loss_weights, self.edge_positive_weight)
        for field, choices in HEAD_CHOICES.items():
            check_choice(field, getattr(self, field), choices)


__all__ = ["ModSquadConfig"]
