"""Mod-Squad model configuration."""

from typing import Optional

from transformers.utils import logging

from .configuration_common import (
    DenseMultiTaskConfig,
    as_list,
    check_bool,
    check_choice,
    check_int,
    check_int_list,
    check_number,
    is_integer,
)

logger = logging.get_logger(__name__)

MOE_LAYOUTS = ("twice", "every")
KEPT_ROUTERS = ("full", "kept")
MUTUAL_INFORMATION_ESTIMATORS = ("reference", "exact")

# What a config written before the model followed the reference code computed (see `ModSquadConfig`, "Earlier
# versions"); applied to a config that carries the field only those versions wrote.
EARLIER_VERSION_FIELDS = {
    "use_task_embedding": False,
    "renormalize_gates": True,
    "routing_epsilon": 0.0,
    "attention_expert_bias": True,
    "mutual_information_estimator": "exact",
    "aux_loss_min_tasks": 1,
}


class ModSquadConfig(DenseMultiTaskConfig):
    r"""
    Configuration of a [`ModSquadModel`] / [`ModSquadForDensePrediction`]: a ViT whose blocks hold mixture-of-experts
    layers (attention-head experts and MLP experts) with one sparse top-k router per task and per MoE layer, a learned
    task embedding added before every block, a task-expert mutual-information loss, and one light dense head per task
    (Mod-Squad, Chen et al., CVPR 2023, arXiv 2212.08066).

    The defaults compute what the authors' code computes for their main model, ViT-B/16 (12 blocks, width 768, 12
    heads) with the "twice" layout: 24 attention experts of width 128 (top-12) in the even blocks, 16 MLP experts
    (top-4) in the odd blocks, dense attention with heads of width 128 elsewhere, gates = the top-k routing
    probabilities (not renormalised), mutual-information loss weight 0.005 with the reference's epsilons.
    `ModSquadForDensePrediction.from_pretrained` of a checkpoint converted with
    `python -m modeling_taskexpert.convert_modsquad_original` computes the reference's backbone function.

    Remaining differences from the reference code, each with its reason:

    - The dense heads are this package's light per-task heads (the reference's Taskonomy heads are linear patch
      decoders for other tasks); the converter drops `task_heads.*`.
    - All requested tasks run in one pass, stacked in the batch dimension, instead of one forward call per task: the
      same function, with batched matmuls instead of one call per task.
    - Position embeddings are interpolated bicubically for inputs other than `image_size` (the reference accepts
      224x224 only), so dense prediction can run at any multiple of the patch size.
    - Routing runs in float32 even under autocast (ties and tiny logit gaps decide the experts).
    - The z-loss is computed as log(exp(logsumexp(logits)) + 1e-4)^2 with a stable `logaddexp` (same value; the
      reference's log(sum(exp(logits)) + 1e-4) overflows for large logits).
    - Sample-top-k training (random extra experts, `sample_topk` in the reference) and the reference's "top-k loss"
      (`w_topk_loss`) are not implemented: the main model uses neither (both 0).
    - Dropout and drop-path are not implemented (the reference's MI models use 0 for dropout; set drop-path through
      your training code if needed).
    - Per-task usage statistics for extraction are exact selection counts (plus a moving average) instead of the
      reference's 0.95/0.05 moving average of counts; extraction compares shares, so both give the same ranking.

    Earlier versions of this package computed something else in six places; each stays reachable:
    `use_task_embedding=False` (no task embedding; blocks before the first MoE layer then run once for all tasks),
    `renormalize_gates=True` with `routing_epsilon=0.0` (gates = probabilities renormalised over the top-k),
    `attention_expert_bias=True` (biases on the attention experts' query and output projections),
    `dense_attention_head_dim=hidden_size // num_attention_heads` (the usual ViT head width in dense attention),
    `mutual_information_estimator="exact"` (normalised joint, no epsilons) and `aux_loss_min_tasks=1`. A
    `config.json` written by those versions (it has `load_balance_loss_weight`) loads with these values.

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
            Heads of the dense attention layers.
        intermediate_size (`int`, *optional*, defaults to 3072):
            Hidden width H of the dense MLP layers (4 C in the reference); the MoE MLP experts have H / `mlp_top_k`.
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
            Head width of the MoE attention experts (query, shared key/value, input of the output projection); the
            scale is `attention_head_dim ** -0.5`.
        dense_attention_head_dim (`int`, *optional*):
            Head width of the dense attention layers: qkv = Linear(C, 3 * heads * width), proj = Linear(heads * width,
            C). Defaults to `attention_head_dim`, as in the reference (128 = 2 C / heads in the base model);
            `hidden_size // num_attention_heads` gives the usual ViT attention.
        attention_expert_bias (`bool`, *optional*, defaults to `False`):
            Whether the attention experts' query and output projections have biases (the reference's have none; the
            shared key/value projection always has one).
        num_mlp_experts (`int`, *optional*, defaults to 16):
            Experts per MoE MLP layer.
        mlp_top_k (`int`, *optional*, defaults to 4):
            Experts each token selects in an MoE MLP layer.
        mlp_expert_hidden_size (`int`, *optional*):
            Hidden width of one MLP expert (C -> this -> C, with biases and GELU); defaults to
            `intermediate_size // mlp_top_k`, so a token's MoE MLP costs as much as the dense MLP (as in the reference).
        use_task_embedding (`bool`, *optional*, defaults to `True`):
            Learn a task embedding (1, T, C) (standard-normal init) and add the task's row to every token before every
            block, as the reference does; each task then takes its own pass through all blocks (stacked in the batch
            dimension). `False`: no task embedding; blocks before the first MoE layer run once for all tasks.
        renormalize_gates (`bool`, *optional*, defaults to `False`):
            Divide the top-k gates by their sum. The reference does not: the gates are the selected routing
            probabilities as they are (at initialisation 0.5 in total for 12 of 24 experts).
        routing_epsilon (`float`, *optional*, defaults to 1e-4):
            Added to the softmax of the router logits before the top-k (the reference's 1e-4); these probabilities
            are the gates and feed the auxiliary losses.
        noisy_gating (`bool`, *optional*, defaults to `False`):
            Routers output 2E logits; the second half gives a learned noise scale softplus(.) + 0.01 and the gating
            logits are the first half plus standard-normal noise times that scale, in training and evaluation alike
            (as in the reference, whose main MI models switch it off). Outputs are then random.
        kept_experts (`list[list[int]]`, *optional*):
            Per MoE layer in network order, the ids of the experts this model has, out of `num_attention_experts` /
            `num_mlp_experts`. `None` for a full model; set by [`ModSquadForDensePrediction.extract_task_model`]. See
            `kept_router` for what the routers keep.
        kept_router (`str`, *optional*, defaults to `"full"`):
            The routers of an extracted model (`kept_experts`): `"full"` keeps the task's whole router (all logits;
            the softmax runs over every expert of the full layer, then top-k over the kept ones), so a token routed
            only to kept experts gets the full model's gates bit for bit. `"kept"` keeps only the kept experts' router
            rows, as the authors' pruning does: the softmax runs over the kept experts alone, so every gate is larger
            (renormalised over fewer experts) and the top-k among the kept experts is the same as with `"full"`;
            the outputs differ from the full model's wherever the gates enter unnormalised (`renormalize_gates=False`).
        mutual_information_loss_weight (`float`, *optional*, defaults to 0.005):
            Weight of each MoE layer's mutual-information term (summed over layers).
        mutual_information_estimator (`str`, *optional*, defaults to `"reference"`):
            `"reference"`: the reference's estimate with its epsilons (see [`mutual_information_loss`]); `"exact"`: the
            joint normalised to sum 1, no epsilons.
        cv_loss_weight (`float`, *optional*, defaults to 0.0):
            Weight of the squared coefficient of variation of the per-expert sums of the gates (per layer, over all
            tasks' tokens); 0 in the reference's MI models.
        switch_loss_weight (`float`, *optional*, defaults to 0.0):
            Weight of the switch load-balancing loss E * sum_e P_e f_e (per layer, over all tasks' tokens); 0 in the
            reference's MI models.
        z_loss_weight (`float`, *optional*, defaults to 0.0):
            Weight of the router z-loss mean(log(sum exp(logits) + 1e-4)^2) (per layer); 0 in the reference's MI
            models.
        aux_loss_min_tasks (`int`, *optional*, defaults to 3):
            The auxiliary routing losses join `loss` only when a forward pass runs at least this many tasks (the
            reference adds them with more than 2 tasks); 1 adds them always.
        expert_usage_momentum (`float`, *optional*, defaults to 0.99):
            Momentum of the exponential moving average of per-task expert usage kept beside the exact counts.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the truncated normal weight initialisation (routers start at zero, the task
            embedding at standard normal).

    The task and head fields (`tasks`, `task_id2label`, `task_kinds`, `head_hidden_size`, `head_norm`,
    `depth_activation`, `loss_weights`, `boundary_positive_weight`, `output_gates`) are those of
    [`DenseMultiTaskConfig`].

    The routing report reads with two derived (not saved) attributes: `layer_names`, one name per MoE layer
    (`"block 0 attention"`, `"block 1 mlp"`, ...), and `candidate_names`, per layer the names of its experts in gate
    order (`"expert 7"`: id 7 of the full layer, as in `kept_experts`).

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

    image_size: int
    patch_size: int
    num_channels: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    qkv_bias: bool
    layer_norm_eps: float
    moe_attention_layers: list[int]
    moe_mlp_layers: list[int]
    num_attention_experts: int
    attention_top_k: int
    attention_head_dim: int
    dense_attention_head_dim: int
    attention_expert_bias: bool
    num_mlp_experts: int
    mlp_top_k: int
    mlp_expert_hidden_size: int
    use_task_embedding: bool
    renormalize_gates: bool
    routing_epsilon: float
    noisy_gating: bool
    kept_experts: Optional[list[list[int]]]
    kept_router: str
    mutual_information_loss_weight: float
    mutual_information_estimator: str
    cv_loss_weight: float
    switch_loss_weight: float
    z_loss_weight: float
    aux_loss_min_tasks: int
    expert_usage_momentum: float

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
        dense_attention_head_dim: Optional[int] = None,
        attention_expert_bias: bool = False,
        num_mlp_experts: int = 16,
        mlp_top_k: int = 4,
        mlp_expert_hidden_size: Optional[int] = None,
        use_task_embedding: bool = True,
        renormalize_gates: bool = False,
        routing_epsilon: float = 1e-4,
        noisy_gating: bool = False,
        kept_experts: Optional[list[list[int]]] = None,
        kept_router: str = "full",
        mutual_information_loss_weight: float = 0.005,
        mutual_information_estimator: str = "reference",
        cv_loss_weight: float = 0.0,
        switch_loss_weight: float = 0.0,
        z_loss_weight: float = 0.0,
        aux_loss_min_tasks: int = 3,
        expert_usage_momentum: float = 0.99,
        **kwargs,
    ):
        earlier_version = _earlier_version_fields(kwargs)
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
        if dense_attention_head_dim is None:
            if earlier_version and is_integer(hidden_size) and is_integer(num_attention_heads):
                dense_attention_head_dim = hidden_size // max(num_attention_heads, 1)
            else:
                dense_attention_head_dim = attention_head_dim
        self.dense_attention_head_dim = dense_attention_head_dim
        self.attention_expert_bias = attention_expert_bias
        self.num_mlp_experts = num_mlp_experts
        self.mlp_top_k = mlp_top_k
        if mlp_expert_hidden_size is None and is_integer(intermediate_size) and is_integer(mlp_top_k):
            mlp_expert_hidden_size = max(intermediate_size // max(mlp_top_k, 1), 1)
        self.mlp_expert_hidden_size = mlp_expert_hidden_size
        self.use_task_embedding = use_task_embedding
        self.renormalize_gates = renormalize_gates
        self.routing_epsilon = routing_epsilon
        self.noisy_gating = noisy_gating
        self.kept_experts = (
            [as_list(ids) for ids in kept_experts] if isinstance(kept_experts, (list, tuple)) else kept_experts
        )
        self.kept_router = kept_router
        self.mutual_information_loss_weight = mutual_information_loss_weight
        self.mutual_information_estimator = mutual_information_estimator
        self.cv_loss_weight = cv_loss_weight
        self.switch_loss_weight = switch_loss_weight
        self.z_loss_weight = z_loss_weight
        self.aux_loss_min_tasks = aux_loss_min_tasks
        self.expert_usage_momentum = expert_usage_momentum
        if earlier_version:  # those configs cannot hold these fields: they did not exist
            for field, value in EARLIER_VERSION_FIELDS.items():
                setattr(self, field, value)

        super().__init__(**kwargs)  # the task and head fields, then `validate_architecture`

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

    def router_experts_of(self, kind: str) -> int:
        """Experts a full MoE layer of `kind` ("attention" or "mlp") has: the width of its routers."""
        return self.num_attention_experts if kind == "attention" else self.num_mlp_experts

    @property
    def expert_ids_per_layer(self) -> list[list[int]]:
        """Per MoE layer in network order, the ids of the experts the model has (`kept_experts`, or all)."""
        if self.kept_experts is not None:
            return [list(ids) for ids in self.kept_experts]
        return [list(range(self.router_experts_of(kind))) for _, kind in self.moe_layer_kinds]

    @property
    def num_experts_per_layer(self) -> list[int]:
        """Number of experts of every MoE layer, in network order."""
        return [len(ids) for ids in self.expert_ids_per_layer]

    @property
    def layer_names(self) -> list[str]:
        """Name of every routing (MoE) layer, in network order: `"block 0 attention"`, `"block 1 mlp"`, ..."""
        return [f"block {block} {kind}" for block, kind in self.moe_layer_kinds]

    @property
    def candidate_names(self) -> list[list[str]]:
        """Per routing layer, the names of its experts in gate order (`"expert 7"`: id 7 of the full layer)."""
        return [[f"expert {i}" for i in ids] for ids in self.expert_ids_per_layer]

    def top_k_of(self, kind: str) -> int:
        """Experts a token selects in an MoE layer of `kind` ("attention" or "mlp")."""
        return self.attention_top_k if kind == "attention" else self.mlp_top_k

    def validate_architecture(self) -> None:
        """Check every field; raise a ValueError naming the field and what was expected."""
        positive = (
            "image_size", "patch_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "num_attention_experts", "attention_top_k", "attention_head_dim", "dense_attention_head_dim",
            "num_mlp_experts", "mlp_top_k", "mlp_expert_hidden_size", "aux_loss_min_tasks",
        )  # fmt: skip
        for field in positive:
            check_int(field, getattr(self, field), minimum=1)
        for field in (
            "qkv_bias",
            "attention_expert_bias",
            "use_task_embedding",
            "renormalize_gates",
            "noisy_gating",
        ):
            check_bool(field, getattr(self, field))
        check_number("layer_norm_eps", self.layer_norm_eps, minimum=0.0, min_exclusive=True)
        if self.num_channels != 3:
            raise ValueError(f"`num_channels` must be 3 (RGB input), got {self.num_channels!r}.")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"`image_size` ({self.image_size}) must be a multiple of `patch_size` ({self.patch_size})."
            )
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
            raise ValueError(
                "`moe_attention_layers` and `moe_mlp_layers` are both empty: Mod-Squad needs an MoE layer."
            )
        if self.attention_top_k > self.num_attention_experts:
            raise ValueError(
                f"`attention_top_k` ({self.attention_top_k}) exceeds `num_attention_experts` ({self.num_attention_experts})."
            )
        if self.mlp_top_k > self.num_mlp_experts:
            raise ValueError(f"`mlp_top_k` ({self.mlp_top_k}) exceeds `num_mlp_experts` ({self.num_mlp_experts}).")
        self._validate_kept_experts()
        for field in (
            "mutual_information_loss_weight",
            "cv_loss_weight",
            "switch_loss_weight",
            "z_loss_weight",
            "routing_epsilon",
        ):
            check_number(field, getattr(self, field), minimum=0.0)
        check_number("expert_usage_momentum", self.expert_usage_momentum, 0.0, 1.0, max_exclusive=True)
        check_choice("mutual_information_estimator", self.mutual_information_estimator, MUTUAL_INFORMATION_ESTIMATORS)
        check_choice("kept_router", self.kept_router, KEPT_ROUTERS)
        super().validate_architecture()

    def _validate_kept_experts(self) -> None:
        if self.kept_experts is None:
            return
        kinds = self.moe_layer_kinds
        if not isinstance(self.kept_experts, list) or len(self.kept_experts) != len(kinds):
            count = len(self.kept_experts) if isinstance(self.kept_experts, list) else self.kept_experts
            raise ValueError(
                f"`kept_experts` must list the experts of each of the {len(kinds)} MoE layers, got {count!r}."
            )
        for (block, kind), ids in zip(kinds, self.kept_experts):
            width, top_k = self.router_experts_of(kind), self.top_k_of(kind)
            field = f"kept_experts entry of the MoE {kind} of block {block}"
            check_int_list(field, ids, minimum=0, maximum=width - 1)
            if list(ids) != sorted(set(ids)) or len(ids) < top_k:
                raise ValueError(
                    f"`{field}` must be at least {top_k} (its top-k) increasing expert ids in 0..{width - 1}, got {ids!r}."
                )


def _earlier_version_fields(kwargs: dict) -> bool:
    """Whether `kwargs` come from a config.json written before the model followed the reference code (those versions
    always wrote `load_balance_loss_weight` and `experts_per_layer`); removes those two fields. Refuses what cannot be
    loaded with the earlier behaviour."""
    if "load_balance_loss_weight" not in kwargs and "experts_per_layer" not in kwargs:
        return False
    weight = kwargs.pop("load_balance_loss_weight", 0.0)
    experts_per_layer = kwargs.pop("experts_per_layer", None)
    if weight:
        raise ValueError(
            f"`load_balance_loss_weight` ({weight}) was the per-task switch loss of earlier versions; it is gone. Use "
            "`switch_loss_weight` (the reference's switch loss over all tasks' tokens) instead."
        )
    if experts_per_layer is not None:
        raise ValueError(
            "This config describes a per-task model extracted by an earlier version (`experts_per_layer`), whose "
            "routers kept only the kept experts' logits. Extract it again from the full model with "
            "`extract_task_model` (the new extracted models keep the task's whole router)."
        )
    logger.warning(
        "This Mod-Squad config was written before the model followed the reference code; it loads with the earlier "
        "behaviour: %s and dense_attention_head_dim = hidden_size // num_attention_heads.",
        ", ".join(f"{field}={value!r}" for field, value in EARLIER_VERSION_FIELDS.items()),
    )
    return True


__all__ = ["ModSquadConfig"]
