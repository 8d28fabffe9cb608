"""Helpers of the Mod-Squad tests (not a test module): tiny configs, and an independent implementation of what the
authors' code computes, written from its description in issue 15 (not from our model), one task and one expert at a
time, reading weights in the authors' key layout.

The authors' layout for a ViT with `depth` blocks (C = width, hd = head width, E = experts, T = tasks):

    patch_embed.proj.{weight,bias}   cls_token (1, 1, C)   pos_embed (1, 1 + grid^2, C)   task_embedding (1, T, C)
    blocks.{i}.norm1|norm2.{weight,bias}
    MoE attention:  blocks.{i}.attn.q_proj.experts.w (E, C, hd), .output_experts.w (E, hd, C),
                    .f_gate.{t}.0.weight (E, or 2E with noisy gating, C), blocks.{i}.attn.kv_proj.0.{weight,bias}
    dense attention: blocks.{i}.attn.qkv.{weight,bias} (3 heads hd, C), blocks.{i}.attn.proj.{weight,bias} (C, heads hd)
    MoE MLP:        blocks.{i}.mlp.experts.{w,b} ((E, C, H/k), (E, H/k)), .output_experts.{w,b}, .f_gate.{t}.0.weight
    dense MLP:      blocks.{i}.mlp.fc1|fc2.{weight,bias}
    norm.{weight,bias}   fc_norm.{weight,bias} (pooled class-token norm of the classification tasks)
"""

from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

ALL_TASKS = ["semseg", "human_parts", "saliency", "normals", "edge", "depth"]
LABELS = {"semseg": {0: "floor", 1: "wall", 2: "box"}, "human_parts": {0: "background", 1: "head", 2: "torso"}}


def tiny_modsquad_config(**overrides):
    from modeling_taskexpert import ModSquadConfig

    kwargs = dict(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
        num_attention_experts=6, attention_top_k=2, attention_head_dim=16, num_mlp_experts=5, mlp_top_k=2,
        tasks=ALL_TASKS, task_id2label=LABELS, head_hidden_size=16,
    )  # fmt: skip
    kwargs.update(overrides)
    return ModSquadConfig(**kwargs)


def build_modsquad(config=None, seed=0, router_std=0.5):
    """A model in eval mode with random (non-zero) routers, so that routing depends on the input."""
    from modeling_taskexpert import ModSquadForDensePrediction

    torch.manual_seed(seed)
    model = ModSquadForDensePrediction(config or tiny_modsquad_config()).eval()
    for _, layer in model.modsquad.moe_layers:
        torch.nn.init.normal_(layer.router_weight, std=router_std)
    return model


@dataclass
class ReferenceArchitecture:
    """The hyper-parameters of the authors' MTVisionTransformerMoETaskGating, as their layout needs them."""

    hidden: int = 768
    depth: int = 12
    heads: int = 12
    head_dim: int = 128
    attention_experts: int = 24
    attention_top_k: int = 12
    mlp_experts: int = 16
    mlp_top_k: int = 4
    mlp_ratio: int = 4
    num_tasks: int = 5
    patch: int = 16
    image: int = 224
    moe_attention: list = field(default_factory=lambda: list(range(0, 12, 2)))
    moe_mlp: list = field(default_factory=lambda: list(range(1, 12, 2)))
    noisy_gating: bool = False

    @property
    def expert_hidden(self) -> int:
        return self.mlp_ratio * self.hidden // self.mlp_top_k


def reference_shapes(arch: ReferenceArchitecture) -> dict[str, tuple[int, ...]]:
    """Every key of the authors' state dict (without `task_heads.*`) with its shape."""
    c, hd, t = arch.hidden, arch.head_dim, arch.num_tasks
    grid = arch.image // arch.patch
    shapes = {
        "patch_embed.proj.weight": (c, 3, arch.patch, arch.patch), "patch_embed.proj.bias": (c,),
        "cls_token": (1, 1, c), "pos_embed": (1, 1 + grid * grid, c), "task_embedding": (1, t, c),
    }  # fmt: skip
    gate_rows = lambda experts: 2 * experts if arch.noisy_gating else experts  # noqa: E731
    for i in range(arch.depth):
        b = f"blocks.{i}"
        for norm in ("norm1", "norm2"):
            shapes[f"{b}.{norm}.weight"] = shapes[f"{b}.{norm}.bias"] = (c,)
        if i in arch.moe_attention:
            e = arch.attention_experts
            shapes[f"{b}.attn.q_proj.experts.w"] = (e, c, hd)
            shapes[f"{b}.attn.q_proj.output_experts.w"] = (e, hd, c)
            for task in range(t):
                shapes[f"{b}.attn.q_proj.f_gate.{task}.0.weight"] = (gate_rows(e), c)
            shapes[f"{b}.attn.kv_proj.0.weight"], shapes[f"{b}.attn.kv_proj.0.bias"] = (2 * hd, c), (2 * hd,)
        else:
            inner = arch.heads * hd
            shapes[f"{b}.attn.qkv.weight"], shapes[f"{b}.attn.qkv.bias"] = (3 * inner, c), (3 * inner,)
            shapes[f"{b}.attn.proj.weight"], shapes[f"{b}.attn.proj.bias"] = (c, inner), (c,)
        if i in arch.moe_mlp:
            e, h = arch.mlp_experts, arch.expert_hidden
            shapes[f"{b}.mlp.experts.w"], shapes[f"{b}.mlp.experts.b"] = (e, c, h), (e, h)
            shapes[f"{b}.mlp.output_experts.w"], shapes[f"{b}.mlp.output_experts.b"] = (e, h, c), (e, c)
            for task in range(t):
                shapes[f"{b}.mlp.f_gate.{task}.0.weight"] = (gate_rows(e), c)
        else:
            h = 4 * c  # the authors' dense MLP is 4C wide whatever mlp_ratio (only the experts follow it)
            shapes[f"{b}.mlp.fc1.weight"], shapes[f"{b}.mlp.fc1.bias"] = (h, c), (h,)
            shapes[f"{b}.mlp.fc2.weight"], shapes[f"{b}.mlp.fc2.bias"] = (c, h), (c,)
    shapes["norm.weight"] = shapes["norm.bias"] = (c,)
    shapes["fc_norm.weight"] = shapes["fc_norm.bias"] = (c,)
    return shapes


def random_reference_state(arch: ReferenceArchitecture, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict in the authors' layout with random values (routers too, so that routing depends on the input)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in reference_shapes(arch).items():
        scale = 1.0 if key in ("task_embedding", "cls_token") else 0.5 if "f_gate" in key else 0.1
        value = torch.randn(shape, generator=generator) * scale
        if key.endswith(("norm1.weight", "norm2.weight", "norm.weight")):
            value = 1.0 + value
        state[key] = value
    return state


# ---------------------------------------------------------------------------------------------------------------------
# The computation, one expert at a time
# ---------------------------------------------------------------------------------------------------------------------
def reference_gates(
    tokens: torch.Tensor, router: torch.Tensor, top_k: int, epsilon: float = 1e-4, renormalize: bool = False
):
    """tokens (N, C), router weight in the authors' layout (E, C) -> probabilities (N, E) = softmax + epsilon and
    the dense gates (N, E): the k largest probabilities where selected, 0 elsewhere."""
    probabilities = torch.softmax(tokens @ router.T, dim=-1) + epsilon
    top, index = probabilities.topk(top_k, dim=-1)
    if renormalize:
        top = top / top.sum(-1, keepdim=True)
    return probabilities, torch.zeros_like(probabilities).scatter(-1, index, top)


def reference_moe_mlp(x, experts_w, experts_b, output_w, output_b, router, top_k, **gate_options):
    """x (B, N, C) -> sum over the selected experts e of gate_e * (GELU(x W1_e + b1_e) W2_e + b2_e), expert by
    expert."""
    _, gates = reference_gates(x.reshape(-1, x.shape[-1]), router, top_k, **gate_options)
    gates = gates.view(*x.shape[:2], -1)
    output = torch.zeros_like(x)
    for e in range(experts_w.shape[0]):
        hidden = F.gelu(x @ experts_w[e] + experts_b[e])
        output = output + gates[..., e : e + 1] * (hidden @ output_w[e] + output_b[e])
    return output


def reference_moe_attention(
    x, query_w, output_w, router, kv_w, kv_b, top_k, query_b=None, output_b=None, **gate_options
):
    """x (B, N, C): each selected expert e makes a query head q_e = x Wq_e (width hd) that attends over the shared
    keys/values [k, v] = x Wkv + b (scale hd^-0.5); its result goes through Wo_e and is weighted by the gate. Since
    the keys are shared, a head's output depends only on its own expert, so expert by expert is the same sum."""
    head_dim = query_w.shape[-1]
    _, gates = reference_gates(x.reshape(-1, x.shape[-1]), router, top_k, **gate_options)
    gates = gates.view(*x.shape[:2], -1)
    key_value = x @ kv_w.T + kv_b
    key, value = key_value[..., :head_dim], key_value[..., head_dim:]
    output = torch.zeros_like(x)
    for e in range(query_w.shape[0]):
        query = x @ query_w[e] + (query_b[e] if query_b is not None else 0)
        attention = torch.softmax(query @ key.transpose(1, 2) * head_dim**-0.5, dim=-1)
        projected = (attention @ value) @ output_w[e] + (output_b[e] if output_b is not None else 0)
        output = output + gates[..., e : e + 1] * projected
    return output


def reference_dense_attention(x, qkv_w, qkv_b, proj_w, proj_b, heads):
    batch, length, _ = x.shape
    qkv = (x @ qkv_w.T + qkv_b).view(batch, length, 3, heads, -1)
    head_dim = qkv.shape[-1]
    outputs = []
    for h in range(heads):
        q, k, v = qkv[:, :, 0, h], qkv[:, :, 1, h], qkv[:, :, 2, h]
        outputs.append(torch.softmax(q @ k.transpose(1, 2) * head_dim**-0.5, dim=-1) @ v)
    return torch.cat(outputs, dim=-1) @ proj_w.T + proj_b


def reference_features(
    state: dict, arch: ReferenceArchitecture, pixel_values: torch.Tensor, task: int, eps: float = 1e-6
):
    """The token features one task's pass gives in the authors' model: (B, grid^2, C) after the final norm, the class
    token dropped."""
    norm = lambda x, name: F.layer_norm(x, x.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"], eps)  # noqa: E731
    x = F.conv2d(pixel_values, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=arch.patch)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([state["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + state["pos_embed"]
    for i in range(arch.depth):
        b = f"blocks.{i}"
        x = x + state["task_embedding"][:, task]
        h = norm(x, f"{b}.norm1")
        if i in arch.moe_attention:
            x = x + reference_moe_attention(
                h, state[f"{b}.attn.q_proj.experts.w"], state[f"{b}.attn.q_proj.output_experts.w"],
                state[f"{b}.attn.q_proj.f_gate.{task}.0.weight"], state[f"{b}.attn.kv_proj.0.weight"],
                state[f"{b}.attn.kv_proj.0.bias"], arch.attention_top_k,
            )  # fmt: skip
        else:
            x = x + reference_dense_attention(
                h, state[f"{b}.attn.qkv.weight"], state[f"{b}.attn.qkv.bias"], state[f"{b}.attn.proj.weight"],
                state[f"{b}.attn.proj.bias"], arch.heads,
            )  # fmt: skip
        h = norm(x, f"{b}.norm2")
        if i in arch.moe_mlp:
            x = x + reference_moe_mlp(
                h, state[f"{b}.mlp.experts.w"], state[f"{b}.mlp.experts.b"], state[f"{b}.mlp.output_experts.w"],
                state[f"{b}.mlp.output_experts.b"], state[f"{b}.mlp.f_gate.{task}.0.weight"], arch.mlp_top_k,
            )  # fmt: skip
        else:
            hidden = F.gelu(h @ state[f"{b}.mlp.fc1.weight"].T + state[f"{b}.mlp.fc1.bias"])
            x = x + hidden @ state[f"{b}.mlp.fc2.weight"].T + state[f"{b}.mlp.fc2.bias"]
    return norm(x, "norm")[:, 1:]
