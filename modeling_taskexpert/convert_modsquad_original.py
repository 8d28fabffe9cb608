"""Convert a checkpoint of the authors' Mod-Squad code into a `ModSquadForDensePrediction` folder (safetensors).

    python -m modeling_taskexpert.convert_modsquad_original --checkpoint checkpoint.pth --output-dir modsquad-converted \
        --tasks semseg=10 normals=6 depth=1

The checkpoint is the authors' `.pth` (a dict holding `model`, or a bare state dict). It is a pickle, so it is read
with `torch.load(weights_only=True)`, which builds tensors and plain containers only (the `args` namespace the
authors' training script stores beside the weights is allowed too). The architecture (width, depth, patch size, input
size, MoE layers, experts, head widths, top-k, noisy gating) is read from the tensor shapes; `--config` adds the
fields the shapes do not hold (e.g. `task_id2label`, `head_hidden_size`, `layer_norm_eps`) and must agree with them.

`--tasks` names this package's tasks and, after `=`, the row of the authors' task embedding and routers that becomes
that task (the authors' Taskonomy order); without rows, the tasks take the rows in order and must be as many as the
checkpoint has. The backbone computes the authors' function for those tasks; the dense heads are new (this package's
light heads, randomly initialised from `--seed`): fine-tune them. The authors' Taskonomy heads (`task_heads.*`) and the
classification pooling norm (`fc_norm.*`) are left out, with a message. Any other unknown key, or a missing one, is an
error that lists them. This module is a command-line tool: the model files do not import it.
"""

import argparse
import json
import math
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch

from .configuration_modsquad import ModSquadConfig
from .image_processing_dense_multitask import DenseMultiTaskImageProcessor
from .modeling_modsquad import ModSquadForDensePrediction

IGNORED_PREFIXES = {
    "task_heads.": "the authors' per-task output heads (this package's dense heads are new)",
    "fc_norm.": "the norm of the pooled class token of the authors' classification tasks (unused by dense heads)",
}
# Fields the checkpoint's shapes decide; a --config that says otherwise is an error.
ARCHITECTURE_FIELDS = (
    "hidden_size", "patch_size", "image_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "qkv_bias", "moe_attention_layers", "moe_mlp_layers", "num_attention_experts", "attention_top_k",
    "attention_head_dim", "dense_attention_head_dim", "num_mlp_experts", "mlp_top_k", "mlp_expert_hidden_size",
    "noisy_gating",
)  # fmt: skip
# How the authors' code routes; a --config that says otherwise is an error.
REFERENCE_FIELDS = {
    "use_task_embedding": True,
    "renormalize_gates": False,
    "routing_epsilon": 1e-4,
    "attention_expert_bias": False,
}


class ConversionError(ValueError):
    """The checkpoint or the arguments cannot be converted; the message says why."""


def load_reference_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of the authors' checkpoint at `path` (`{"model": state_dict, ...}` or a bare state dict)."""
    if not path.is_file():
        raise ConversionError(f"--checkpoint {path} is not a file.")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # the unpickler's errors have many types; all mean "not a plain tensor checkpoint"
        raise ConversionError(
            f"{path} cannot be read as a weights-only PyTorch checkpoint ({error}). Only tensors and plain containers "
            "are loaded; extract the state dict with `torch.save(checkpoint['model'], 'weights.pth')` in an "
            "environment you trust and convert that file."
        ) from error
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        keys = sorted(checkpoint)[:10] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ConversionError(f"{path} holds neither a state dict nor a dict with one under 'model' (found {keys}).")
    return dict(state)


def _shape(state: dict, key: str) -> tuple[int, ...]:
    if key not in state:
        raise ConversionError(f"The checkpoint has no {key!r}, which every Mod-Squad checkpoint has.")
    return tuple(state[key].shape)


# The `mlp_ratio` of the authors' variants: 4, and 1 for the `..._small_MI` ones.
REFERENCE_MLP_RATIOS = (4, 1)


def _mlp_top_k(hidden: int, width: int, experts: int, top_k: Optional[int], ratio: Optional[float]) -> int:
    """The MoE MLP top-k. In the authors' code an expert is `int(C * mlp_ratio) // k` wide, so the shapes give k only
    with the ratio: the given `--mlp-top-k` (checked against `--mlp-ratio` when both are given), else the k of the given
    `--mlp-ratio`, else the k that every ratio of the authors' variants agrees on; an ambiguous checkpoint is refused
    naming the flags (it was silently converted with k = 8 for the `_small_MI` variants)."""

    def k_for(mlp_ratio) -> Optional[int]:
        total = int(hidden * mlp_ratio)
        k = total // width if width else 0
        return k if 1 <= k <= experts and total // k == width else None

    if top_k is not None:
        if not 1 <= top_k <= experts:
            raise ConversionError(f"--mlp-top-k {top_k} must be in 1..{experts} (the checkpoint's MLP experts).")
        if ratio is not None and k_for(ratio) != top_k:
            raise ConversionError(
                f"--mlp-top-k {top_k} and --mlp-ratio {ratio:g} disagree with the checkpoint: its experts are {width} "
                f"wide for hidden size {hidden}, and int(C * mlp_ratio) // k must equal that."
            )
        return top_k
    if ratio is not None:
        k = k_for(ratio)
        if k is None:
            raise ConversionError(
                f"--mlp-ratio {ratio:g}: no top-k in 1..{experts} makes experts {width} wide for hidden size {hidden}."
            )
        return k
    candidates = {mlp_ratio: k for mlp_ratio in REFERENCE_MLP_RATIOS if (k := k_for(mlp_ratio)) is not None}
    if len(set(candidates.values())) == 1:
        return next(iter(candidates.values()))
    readings = " or ".join(f"top-k {k} with mlp_ratio {r:g}" for r, k in candidates.items())
    raise ConversionError(
        f"The checkpoint's MoE MLP experts are {width} wide for hidden size {hidden}: "
        + (
            f"that is {readings}, and the shapes cannot tell which"
            if candidates
            else "no reading of the authors' mlp_ratio fits"
        )
        + ". Pass --mlp-top-k (or --mlp-ratio, e.g. 1 for the authors' `_small_MI` variants)."
    )


def infer_architecture(
    state: dict[str, torch.Tensor],
    num_heads: Optional[int],
    mlp_top_k: Optional[int],
    mlp_ratio: Optional[float] = None,
) -> dict:
    """The config fields the tensor shapes determine (see `ARCHITECTURE_FIELDS`), plus `num_reference_tasks`."""
    hidden, channels, patch, _ = _shape(state, "patch_embed.proj.weight")
    if channels != 3:
        raise ConversionError(f"patch_embed.proj.weight has {channels} input channels; Mod-Squad takes RGB (3).")
    positions = _shape(state, "pos_embed")[1] - 1
    grid = math.isqrt(positions)
    if grid * grid != positions:
        raise ConversionError(f"pos_embed has {positions} patch positions, not a square grid.")
    num_tasks = _shape(state, "task_embedding")[1]
    blocks = sorted({int(m.group(1)) for key in state if (m := re.match(r"blocks\.(\d+)\.", key))})
    if not blocks or blocks != list(range(len(blocks))):
        raise ConversionError(f"The checkpoint's blocks are not numbered 0..n-1 (found {blocks}).")
    moe_attention = [b for b in blocks if f"blocks.{b}.attn.q_proj.experts.w" in state]
    moe_mlp = [b for b in blocks if f"blocks.{b}.mlp.experts.w" in state]
    if not moe_attention and not moe_mlp:
        raise ConversionError(
            "The checkpoint has no MoE layer (no `blocks.*.attn.q_proj.*` or `blocks.*.mlp.experts.*`)."
        )
    fields = {
        "hidden_size": hidden, "patch_size": patch, "image_size": grid * patch, "num_hidden_layers": len(blocks),
        "moe_attention_layers": moe_attention, "moe_mlp_layers": moe_mlp, "num_reference_tasks": num_tasks,
    }  # fmt: skip
    gate_rows = set()
    if moe_attention:
        experts, _, head_dim = _shape(state, f"blocks.{moe_attention[0]}.attn.q_proj.experts.w")
        fields.update(num_attention_experts=experts, attention_head_dim=head_dim)
        gate_rows |= {(experts, _shape(state, f"blocks.{b}.attn.q_proj.f_gate.0.0.weight")[0]) for b in moe_attention}
    dense_attention = [b for b in blocks if b not in moe_attention]
    heads = num_heads  # the authors' MoE attention selects as many experts as the model has heads
    if dense_attention:
        fields["qkv_bias"] = f"blocks.{dense_attention[0]}.attn.qkv.bias" in state
        inner = _shape(state, f"blocks.{dense_attention[0]}.attn.proj.weight")[1]
        if moe_attention:  # the authors' dense attention uses the MoE head width
            if heads is not None and heads * fields["attention_head_dim"] != inner:
                raise ConversionError(
                    f"--num-heads {heads} disagrees with the checkpoint: its dense attention is {inner} wide with heads "
                    f"of {fields['attention_head_dim']}."
                )
            heads = inner // fields["attention_head_dim"]
        elif heads is None:
            raise ConversionError(
                "Without MoE attention layers the number of heads is not in the shapes: pass --num-heads."
            )
        fields["dense_attention_head_dim"] = inner // heads
    elif heads is None:
        raise ConversionError(
            "Every block has MoE attention, so the number of heads (= the attention top-k) is not in the shapes: pass "
            "--num-heads."
        )
    fields.update(num_attention_heads=heads, attention_top_k=heads)
    fields.setdefault("attention_head_dim", fields.get("dense_attention_head_dim"))
    fields.setdefault("dense_attention_head_dim", fields["attention_head_dim"])
    if moe_mlp:
        experts, _, expert_hidden = _shape(state, f"blocks.{moe_mlp[0]}.mlp.experts.w")
        top_k = _mlp_top_k(hidden, expert_hidden, experts, mlp_top_k, mlp_ratio)
        fields.update(num_mlp_experts=experts, mlp_expert_hidden_size=expert_hidden, mlp_top_k=top_k)
        gate_rows |= {(experts, _shape(state, f"blocks.{b}.mlp.f_gate.0.0.weight")[0]) for b in moe_mlp}
    dense_mlp = [b for b in blocks if b not in moe_mlp]
    if dense_mlp:  # the authors' dense MLP is 4C wide whatever `mlp_ratio`: it says nothing about the experts
        fields["intermediate_size"] = _shape(state, f"blocks.{dense_mlp[0]}.mlp.fc1.weight")[0]
    else:
        fields["intermediate_size"] = fields["mlp_top_k"] * fields["mlp_expert_hidden_size"]
    noisy = {rows == 2 * experts for experts, rows in gate_rows}
    if any(rows not in (experts, 2 * experts) for experts, rows in gate_rows) or len(noisy) > 1:
        raise ConversionError(
            f"The routers have {sorted(rows for _, rows in gate_rows)} rows for {sorted(e for e, _ in gate_rows)} "
            "experts: all must be E (plain) or all 2E (noisy gating)."
        )
    fields["noisy_gating"] = noisy.pop()
    return fields


def parse_tasks(specs: Sequence[str], num_reference_tasks: int) -> dict[str, int]:
    """`["semseg=3", "depth=0"]` (or `["semseg", "depth"]`, rows in order) -> {task: row of the authors' tasks}."""
    rows = {}
    for position, spec in enumerate(specs):
        name, _, row = spec.partition("=")
        if name in rows:
            raise ConversionError(f"--tasks names {name!r} twice.")
        try:
            rows[name] = int(row) if row else position
        except ValueError:
            raise ConversionError(f"--tasks entry {spec!r}: the row after '=' must be an integer.") from None
    given = [spec for spec in specs if "=" in spec]
    if not given and len(specs) != num_reference_tasks:
        raise ConversionError(
            f"The checkpoint has {num_reference_tasks} tasks and --tasks names {len(specs)}: give the row of each, "
            f"e.g. --tasks {specs[0] if specs else 'depth'}=0 ..."
        )
    if given and len(given) != len(specs):
        raise ConversionError("--tasks: give a row for every task or for none.")
    for name, row in rows.items():
        if not 0 <= row < num_reference_tasks:
            raise ConversionError(f"--tasks {name}={row}: the checkpoint's task rows are 0..{num_reference_tasks - 1}.")
    if len(set(rows.values())) != len(rows):
        raise ConversionError(f"--tasks maps two tasks to the same row: {rows}.")
    return rows


def build_config(architecture: dict, task_rows: dict[str, int], config_file: Optional[Path]) -> ModSquadConfig:
    """The model config: `config_file`'s fields (if any), the architecture from the shapes, the tasks."""
    fields = {}
    if config_file is not None:
        try:
            fields = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise ConversionError(f"--config {config_file} cannot be read as JSON: {error}") from error
        if not isinstance(fields, dict) or fields.get("model_type", "modsquad") != "modsquad":
            raise ConversionError(
                f"--config {config_file} is not a Mod-Squad config (a JSON object with model_type 'modsquad')."
            )
        if "load_balance_loss_weight" in fields or "experts_per_layer" in fields:
            raise ConversionError(
                f"--config {config_file} was written by an earlier version of this package; start from a current one "
                "such as hub_configs/models/modsquad-vitb.json."
            )
        for name in ARCHITECTURE_FIELDS:
            if name in fields and name in architecture and fields[name] != architecture[name]:
                raise ConversionError(
                    f"--config {config_file} sets {name}={fields[name]!r} but the checkpoint has {architecture[name]!r}."
                )
        for name in ("model_type", "transformers_version", "architectures", "auto_map", "kept_experts"):
            fields.pop(name, None)
        for name, value in REFERENCE_FIELDS.items():
            if name in fields and fields[name] != value:
                raise ConversionError(
                    f"--config {config_file} sets {name}={fields[name]!r}; a checkpoint of the authors' code needs {value!r}."
                )
        for name in ("task_id2label", "loss_weights", "task_kinds"):  # only the converted tasks
            fields[name] = {task: value for task, value in (fields.get(name) or {}).items() if task in task_rows}
    fields.update({k: v for k, v in architecture.items() if k != "num_reference_tasks"})
    fields.update(tasks=list(task_rows), kept_experts=None, **REFERENCE_FIELDS)
    try:
        return ModSquadConfig(**fields)
    except ValueError as error:
        raise ConversionError(f"The converted config is invalid: {error}") from error


def convert_state_dict(state: dict[str, torch.Tensor], config: ModSquadConfig, task_rows: dict[str, int]):
    """The authors' state dict -> (this package's backbone state dict under `modsquad.`, notes on what was left out).
    Raises a ConversionError listing unknown and missing keys."""
    rows = [task_rows[task] for task in config.tasks]
    num_reference_tasks = state["task_embedding"].shape[1]
    converted, used, absent, notes = {}, set(), [], []

    def take(source: str, target: str, transform=None):
        if source not in state:
            absent.append(source)
            return
        used.add(source)
        converted[f"modsquad.{target}"] = transform(state[source]) if transform else state[source]

    def take_routers(source: str, target: str):
        """The per-task routers `{source}.{t}.0.weight` (E or 2E, C) of the chosen rows -> (T, C, E or 2E)."""
        keys = [f"{source}.{t}.0.weight" for t in range(num_reference_tasks)]
        absent.extend(key for key in keys if key not in state)
        used.update(key for key in keys if key in state)
        if all(key in state for key in keys):
            converted[f"modsquad.{target}"] = torch.stack([state[keys[row]].T for row in rows])

    take("patch_embed.proj.weight", "embeddings.patch_embeddings.weight")
    take("patch_embed.proj.bias", "embeddings.patch_embeddings.bias")
    take("cls_token", "embeddings.cls_token")
    take("pos_embed", "embeddings.position_embeddings")
    take("task_embedding", "task_embedding", lambda v: v[:, rows])
    for name in ("weight", "bias"):
        take(f"norm.{name}", f"norm.{name}")
    for block in range(config.num_hidden_layers):
        source, target = f"blocks.{block}", f"blocks.{block}"
        for norm in ("norm1", "norm2"):
            for name in ("weight", "bias"):
                take(f"{source}.{norm}.{name}", f"{target}.{norm}.{name}")
        if block in config.moe_attention_layers:
            take(f"{source}.attn.q_proj.experts.w", f"{target}.attention.query_weight")
            take(f"{source}.attn.q_proj.output_experts.w", f"{target}.attention.output_weight")
            take(f"{source}.attn.kv_proj.0.weight", f"{target}.attention.key_value.weight")
            take(f"{source}.attn.kv_proj.0.bias", f"{target}.attention.key_value.bias")
            take_routers(f"{source}.attn.q_proj.f_gate", f"{target}.attention.router_weight")
        else:
            for name in ("weight", "bias"):
                take(f"{source}.attn.qkv.{name}", f"{target}.attention.qkv.{name}")
                take(f"{source}.attn.proj.{name}", f"{target}.attention.proj.{name}")
        if block in config.moe_mlp_layers:
            take(f"{source}.mlp.experts.w", f"{target}.mlp.fc1_weight")
            take(f"{source}.mlp.experts.b", f"{target}.mlp.fc1_bias")
            take(f"{source}.mlp.output_experts.w", f"{target}.mlp.fc2_weight")
            take(f"{source}.mlp.output_experts.b", f"{target}.mlp.fc2_bias")
            take_routers(f"{source}.mlp.f_gate", f"{target}.mlp.router_weight")
        else:
            for layer in ("fc1", "fc2"):
                for name in ("weight", "bias"):
                    take(f"{source}.mlp.{layer}.{name}", f"{target}.mlp.{layer}.{name}")

    for prefix, reason in IGNORED_PREFIXES.items():
        ignored = [key for key in state if key.startswith(prefix)]
        if ignored:
            used.update(ignored)
            notes.append(f"left out {len(ignored)} tensors {prefix}*: {reason}")
    unknown = sorted(set(state) - used)
    expected = {
        key for key, value in ModSquadForDensePrediction(config).state_dict().items()
        if key.startswith("modsquad.") and not key.endswith(("expert_counts", "expert_usage_ema"))
    }  # fmt: skip
    if unknown or absent:
        problems = []
        if unknown:
            problems.append(f"{len(unknown)} unknown key(s): {', '.join(unknown)}")
        if absent:
            problems.append(f"{len(absent)} missing key(s): {', '.join(absent)}")
        raise ConversionError("The checkpoint does not have the Mod-Squad layout: " + "; ".join(problems) + ".")
    if expected != set(converted):  # the layout above and the model disagree: a bug here, not in the checkpoint
        raise RuntimeError(f"Conversion does not cover the model: {sorted(expected ^ set(converted))}.")
    return converted, notes


def convert(
    checkpoint: Path,
    output_dir: Path,
    tasks: Sequence[str],
    config_file: Optional[Path] = None,
    num_heads: Optional[int] = None,
    mlp_top_k: Optional[int] = None,
    seed: int = 0,
    mlp_ratio: Optional[float] = None,
) -> list[str]:
    """Convert and write the model folder; returns notes for the user. Raises ConversionError for bad input."""
    if output_dir.exists() and any(output_dir.iterdir()):
        raise ConversionError(f"--output-dir {output_dir} already holds files; choose a new or empty folder.")
    state = load_reference_state_dict(checkpoint)
    architecture = infer_architecture(state, num_heads, mlp_top_k, mlp_ratio)
    task_rows = parse_tasks(tasks, architecture["num_reference_tasks"])
    config = build_config(architecture, task_rows, config_file)
    converted, notes = convert_state_dict(state, config, task_rows)
    torch.manual_seed(seed)
    model = ModSquadForDensePrediction(config)
    model_state = model.state_dict()
    for key, value in converted.items():
        if tuple(value.shape) != tuple(model_state[key].shape):
            raise ConversionError(
                f"{key}: the checkpoint gives shape {tuple(value.shape)}, the model needs {tuple(model_state[key].shape)}."
            )
    model.load_state_dict(converted, strict=False)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=f".{output_dir.name}."))
    try:
        model.save_pretrained(staging)
        processor = DenseMultiTaskImageProcessor(
            size={"height": config.image_size, "width": config.image_size}, size_divisor=config.patch_size
        )
        processor.save_pretrained(staging)
        if output_dir.exists():
            output_dir.rmdir()  # empty, checked above
        staging.rename(output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    rows = ", ".join(f"{task} <- row {row}" for task, row in task_rows.items())
    notes.append(f"tasks: {rows}; the dense heads are new (seed {seed}): fine-tune them before use")
    notes.append(
        f"image processor: {config.image_size}x{config.image_size}, the package's default normalisation; check it "
        "against the normalisation the checkpoint was trained with"
    )
    return notes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m modeling_taskexpert.convert_modsquad_original",
        description="Convert a checkpoint of the authors' Mod-Squad code into a ModSquadForDensePrediction folder.",
    )
    parser.add_argument(
        "--checkpoint", type=Path, required=True, help="the authors' .pth (holding 'model', or a state dict)"
    )
    parser.add_argument("--output-dir", type=Path, required=True, help="new folder for the converted model")
    parser.add_argument(
        "--tasks", nargs="+", required=True, metavar="TASK[=ROW]",
        help="this package's task names, each with the row of the checkpoint's tasks it takes (default: in order)",
    )  # fmt: skip
    parser.add_argument("--config", type=Path, help="ModSquadConfig JSON for the fields the shapes do not give")
    parser.add_argument(
        "--num-heads",
        dest="num_heads",
        type=int,
        help="heads (= MoE attention top-k), when every block has MoE attention",
    )
    parser.add_argument(
        "--mlp-top-k", type=int, help="MoE MLP top-k, when the shapes cannot tell it (the converter says so)"
    )
    parser.add_argument(
        "--mlp-ratio", type=float, help="the authors' mlp_ratio of the checkpoint (4; 1 for the `_small_MI` variants)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the new dense heads")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        notes = convert(
            args.checkpoint,
            args.output_dir,
            args.tasks,
            args.config,
            args.num_heads,
            args.mlp_top_k,
            args.seed,
            mlp_ratio=args.mlp_ratio,
        )
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as error:
        print(f"error while converting: {error}", file=sys.stderr)
        return 1
    for note in notes:
        print(f"note: {note}")
    print(f"Converted model written to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
