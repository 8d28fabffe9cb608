"""The converter from the authors' Mod-Squad checkpoint layout: a state dict built in that layout, run through an
independent implementation of the authors' computation (`modsquad_reference.py`, one task and one expert at a time),
converted, reloaded and compared; the errors for checkpoints that do not fit."""

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from modsquad_reference import ReferenceArchitecture, random_reference_state, reference_features

from modeling_taskexpert import ModSquadForDensePrediction, DenseMultiTaskImageProcessor
from modeling_taskexpert.convert_modsquad_original import ConversionError, convert, main

REPO = Path(__file__).resolve().parents[1]
TINY = dict(
    hidden=32, depth=4, heads=2, head_dim=16, attention_experts=6, attention_top_k=2, mlp_experts=5, mlp_top_k=2,
    num_tasks=3, patch=8, image=32, moe_attention=[0, 2], moe_mlp=[1, 3],
)  # fmt: skip


def save_checkpoint(path: Path, state: dict, wrapped: bool = True) -> Path:
    """As the authors' training script saves it: the weights under 'model' beside the argparse namespace."""
    torch.save(
        {"model": state, "epoch": 3, "args": argparse.Namespace(lr=4e-4, model="mod_squad")} if wrapped else state, path
    )
    return path


def features_of(model, pixel_values, task):
    with torch.no_grad():
        features = model.modsquad(pixel_values, tasks=[task]).task_features[:, 0]
    return features.flatten(2).transpose(1, 2)  # (B, h*w, C), as the reference returns them


@pytest.mark.parametrize("layout", ["twice", "every"])
def test_converted_checkpoint_computes_the_reference_function(tmp_path, layout, capsys):
    arch = ReferenceArchitecture(**TINY)
    if layout == "every":
        arch.moe_attention = arch.moe_mlp = [0, 1, 2, 3]
    state = random_reference_state(arch)
    state["task_heads.0.2.weight"] = torch.randn(64, 32)  # the authors' Taskonomy heads: left out
    checkpoint = save_checkpoint(tmp_path / "checkpoint.pth", state)
    extra = ["--num-heads", "2", "--mlp-top-k", "2"] if layout == "every" else []
    assert main(["--checkpoint", str(checkpoint), "--output-dir", str(tmp_path / "out"),
                 "--tasks", "depth=2", "normals=0", *extra]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "left out 1 tensors task_heads.*" in printed and "left out 2 tensors fc_norm.*" in printed
    assert "depth <- row 2, normals <- row 0" in printed

    model = ModSquadForDensePrediction.from_pretrained(tmp_path / "out").eval()
    config = model.config
    assert config.tasks == ["depth", "normals"]
    assert (config.hidden_size, config.num_hidden_layers, config.patch_size, config.image_size) == (32, 4, 8, 32)
    assert (config.num_attention_experts, config.attention_top_k, config.attention_head_dim) == (6, 2, 16)
    assert (config.num_mlp_experts, config.mlp_top_k, config.mlp_expert_hidden_size, config.intermediate_size) == (
        5,
        2,
        64,
        128,
    )
    assert config.moe_attention_layers == arch.moe_attention and config.moe_mlp_layers == arch.moe_mlp
    assert not config.noisy_gating and not config.renormalize_gates and config.use_task_embedding
    assert isinstance(DenseMultiTaskImageProcessor.from_pretrained(tmp_path / "out"), DenseMultiTaskImageProcessor)

    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    for task, row in (("depth", 2), ("normals", 0)):
        expected = reference_features(state, arch, pixel_values, row)
        torch.testing.assert_close(features_of(model, pixel_values, task), expected, rtol=1e-4, atol=1e-5)
    # Routing matters here: another task row gives other features.
    assert (
        reference_features(state, arch, pixel_values, 1) - features_of(model, pixel_values, "depth")
    ).abs().max() > 1e-2


def test_bare_state_dict_tasks_in_order_and_noisy_routers(tmp_path):
    arch = ReferenceArchitecture(**{**TINY, "num_tasks": 2}, noisy_gating=True)
    state = random_reference_state(arch)
    checkpoint = save_checkpoint(tmp_path / "weights.pth", state, wrapped=False)
    convert(checkpoint, tmp_path / "out", ["semseg", "edge"])
    model = ModSquadForDensePrediction.from_pretrained(tmp_path / "out")
    assert model.config.noisy_gating and model.config.tasks == ["semseg", "edge"]
    layer = model.modsquad.blocks[1].mlp
    assert layer.router_weight.shape == (2, 32, 10)  # 2E logits: clean and noise scale
    torch.testing.assert_close(layer.router_weight[1], state["blocks.1.mlp.f_gate.1.0.weight"].T)
    torch.testing.assert_close(model.modsquad.task_embedding, state["task_embedding"])


@pytest.mark.parametrize(
    "change, tasks, message",
    [
        (lambda s: s.pop("blocks.1.mlp.experts.b"), ["depth=0"], "1 missing key(s): blocks.1.mlp.experts.b"),
        (
            lambda s: s.pop("blocks.2.attn.kv_proj.0.bias"),
            ["depth=0"],
            "1 missing key(s): blocks.2.attn.kv_proj.0.bias",
        ),
        (
            lambda s: s.update({"blocks.0.attn.extra": torch.zeros(1), "decoder.weight": torch.zeros(1)}),
            ["depth=0"],
            "2 unknown key(s): blocks.0.attn.extra, decoder.weight",
        ),
        (
            lambda s: s.pop("blocks.3.mlp.f_gate.1.0.weight"),
            ["depth=0"],
            "1 missing key(s): blocks.3.mlp.f_gate.1.0.weight",
        ),
        (lambda s: None, ["depth", "edge"], "The checkpoint has 3 tasks and --tasks names 2"),
        (lambda s: None, ["depth=0", "edge=0"], "maps two tasks to the same row"),
        (lambda s: None, ["depth=5"], "rows are 0..2"),
        (lambda s: None, ["depth=0", "edge"], "give a row for every task or for none"),
        (lambda s: None, ["colour=0"], "'colour' is not one of the preset tasks"),
        (lambda s: s.update({"blocks.1.mlp.f_gate.0.0.weight": torch.zeros(7, 32)}), ["depth=0"], "all must be E"),
    ],
)
def test_layout_errors_are_clear(tmp_path, change, tasks, message):
    state = random_reference_state(ReferenceArchitecture(**TINY))
    change(state)
    checkpoint = save_checkpoint(tmp_path / "checkpoint.pth", state)
    with pytest.raises(ConversionError, match=re.escape(message)):
        convert(checkpoint, tmp_path / "out", tasks)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]  # nothing half-written


def test_config_file_supplies_fields_and_must_agree(tmp_path):
    state = random_reference_state(ReferenceArchitecture(**TINY))
    checkpoint = save_checkpoint(tmp_path / "checkpoint.pth", state)
    (tmp_path / "good.json").write_text(
        '{"model_type": "modsquad", "hidden_size": 32, "head_hidden_size": 8, "layer_norm_eps": 1e-5, '
        '"task_id2label": {"semseg": {"0": "floor", "1": "wall"}}, "mutual_information_loss_weight": 0.01}'
    )
    convert(checkpoint, tmp_path / "out", ["semseg=1", "depth=0"], config_file=tmp_path / "good.json")
    config = ModSquadForDensePrediction.from_pretrained(tmp_path / "out").config
    assert (config.head_hidden_size, config.layer_norm_eps, config.mutual_information_loss_weight) == (8, 1e-5, 0.01)
    assert config.task_id2label == {"semseg": {0: "floor", 1: "wall"}}

    (tmp_path / "wrong.json").write_text('{"model_type": "modsquad", "hidden_size": 48}')
    with pytest.raises(ConversionError, match="sets hidden_size=48 but the checkpoint has 32"):
        convert(checkpoint, tmp_path / "other", ["depth=0"], config_file=tmp_path / "wrong.json")
    (tmp_path / "renormalised.json").write_text('{"model_type": "modsquad", "renormalize_gates": true}')
    with pytest.raises(
        ConversionError, match="sets renormalize_gates=True; a checkpoint of the authors' code needs False"
    ):
        convert(checkpoint, tmp_path / "other", ["depth=0"], config_file=tmp_path / "renormalised.json")


class NotATensor:
    """An object a pickle can rebuild only by importing code: the weights-only loader refuses it."""


def test_pickles_with_code_and_bad_outputs_are_refused(tmp_path):
    torch.save({"model": {"x": torch.zeros(1)}, "optimizer": NotATensor()}, tmp_path / "custom.pth")
    with pytest.raises(ConversionError, match="cannot be read as a weights-only PyTorch checkpoint"):
        convert(tmp_path / "custom.pth", tmp_path / "out", ["depth"])
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ConversionError, match="holds neither a state dict nor a dict with one under 'model'"):
        convert(tmp_path / "list.pth", tmp_path / "out", ["depth"])
    with pytest.raises(ConversionError, match="is not a file"):
        convert(tmp_path / "missing.pth", tmp_path / "out", ["depth"])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(ConversionError, match="already holds files"):
        convert(tmp_path / "list.pth", tmp_path / "full", ["depth"])


def test_command_line_exit_codes(tmp_path):
    state = random_reference_state(ReferenceArchitecture(**TINY))
    checkpoint = save_checkpoint(tmp_path / "checkpoint.pth", state)
    command = [sys.executable, "-m", "modeling_taskexpert.convert_modsquad_original", "--checkpoint", str(checkpoint)]
    bad = subprocess.run(
        [*command, "--output-dir", str(tmp_path / "a"), "--tasks", "depth"], capture_output=True, text=True, cwd=REPO
    )
    assert bad.returncode == 2 and "error: The checkpoint has 3 tasks and --tasks names 1" in bad.stderr
    good = subprocess.run([*command, "--output-dir", str(tmp_path / "b"), "--tasks", "depth", "edge", "saliency"],
                          capture_output=True, text=True, cwd=REPO)  # fmt: skip
    assert good.returncode == 0, good.stderr
    assert (tmp_path / "b" / "model.safetensors").is_file() and not list(tmp_path.glob(".b.*"))


def test_the_mlp_top_k_of_a_small_mi_checkpoint_is_asked_for_not_guessed(tmp_path, capsys):
    """Round-3 probe: with the authors' mlp_ratio 1 (`..._small_MI`), experts are C // k wide while the dense MLP stays
    4C: the converter read k = 8 (all experts) and the features were off by 9e-2 from the first MoE MLP on, and an
    explicit, correct --mlp-top-k 2 was refused. Now the ambiguity is refused naming the flags, and either flag gives
    the reference function."""
    arch = ReferenceArchitecture(**{**TINY, "mlp_experts": 8, "mlp_ratio": 1})  # experts 32 // 2 = 16 wide
    state = random_reference_state(arch)
    checkpoint = save_checkpoint(tmp_path / "checkpoint.pth", state)
    base = ["--checkpoint", str(checkpoint), "--tasks", "depth=2"]
    assert main([*base, "--output-dir", str(tmp_path / "guess")]) == 2
    assert "top-k 8 with mlp_ratio 4 or top-k 2 with mlp_ratio 1" in capsys.readouterr().err
    assert main([*base, "--output-dir", str(tmp_path / "both"), "--mlp-top-k", "2", "--mlp-ratio", "4"]) == 2
    assert "disagree with the checkpoint" in capsys.readouterr().err
    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    expected = reference_features(state, arch, pixel_values, 2)
    for flags in (["--mlp-top-k", "2"], ["--mlp-ratio", "1"]):
        folder = tmp_path / flags[0].strip("-")
        assert main([*base, "--output-dir", str(folder), *flags]) == 0
        model = ModSquadForDensePrediction.from_pretrained(folder).eval()
        assert model.config.mlp_top_k == 2 and model.config.mlp_expert_hidden_size == 16
        torch.testing.assert_close(features_of(model, pixel_values, "depth"), expected, rtol=1e-4, atol=1e-5)
