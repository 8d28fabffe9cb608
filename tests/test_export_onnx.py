"""ONNX export (modeling_taskexpert.export): parity with PyTorch in ONNX Runtime for both models, task subsets,
routing outputs, the folder's description, the torch-free example of docs/deployment.md, and the errors."""

import json
import os
import shutil
from types import SimpleNamespace
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config
from markdown_snippets import python_snippets
from modsquad_reference import build_modsquad

onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from modeling_taskexpert import TaskExpertForDensePrediction, DenseMultiTaskImageProcessor  # noqa: E402
from modeling_taskexpert.export import OnnxExportError, export_onnx  # noqa: E402
from modeling_taskexpert.export.__main__ import main as export_main  # noqa: E402
from modeling_taskexpert.image_processing_dense_multitask import logits_to_predictions  # noqa: E402
from modeling_taskexpert.task_definitions import KINDS, make_task_spec  # noqa: E402

pytestmark = pytest.mark.slow
REPOSITORY = Path(__file__).resolve().parent.parent
SIZES = [(1, 32, 32), (3, 48, 64), (2, 64, 24)]  # (batch, height, width): training size, larger, narrower


def taskexpert():
    torch.manual_seed(0)
    return TaskExpertForDensePrediction(tiny_config()).eval()


def session_of(folder: Path):
    return onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])


def run(session, pixel_values: torch.Tensor) -> dict[str, np.ndarray]:
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, {"pixel_values": pixel_values.numpy()})))


def assert_same_segmentation(onnx_logits: np.ndarray, torch_logits: torch.Tensor) -> None:
    """Argmax identical except where the two best classes are within 1e-4 (a tie within float rounding)."""
    ours, theirs = onnx_logits.argmax(axis=1), torch_logits.argmax(dim=1).numpy()
    top2 = np.sort(torch_logits.numpy(), axis=1)[:, -2:]
    tie = (top2[:, 1] - top2[:, 0]) < 1e-4
    assert np.array_equal(ours[~tie], theirs[~tie])


@pytest.fixture(scope="module")
def exported_taskexpert(tmp_path_factory):
    """A saved TaskExpert exported by the command line (dynamic size, gates): (model, folder of the export)."""
    model = taskexpert()
    root = tmp_path_factory.mktemp("onnx")
    model.save_pretrained(root / "model")
    DenseMultiTaskImageProcessor(size=48, size_divisor=8).save_pretrained(root / "model")
    arguments = [
        "onnx",
        "--model",
        str(root / "model"),
        "--output",
        str(root / "taskexpert"),
        "--dynamic-size",
        "--gates",
    ]
    assert export_main(arguments) == 0
    return model, SimpleNamespace(folder=root / "taskexpert")


@pytest.fixture(scope="module")
def exported_modsquad(tmp_path_factory):
    model = build_modsquad()
    folder = tmp_path_factory.mktemp("onnx") / "modsquad"
    result = export_onnx(model, folder, dynamic_size=True, gates=True)
    return model, result


@pytest.mark.parametrize("which", ["taskexpert", "modsquad"])
def test_onnx_runtime_equals_pytorch_for_every_task_size_and_batch(which, exported_taskexpert, exported_modsquad):
    model, result = exported_taskexpert if which == "taskexpert" else exported_modsquad
    session = session_of(result.folder)
    tasks = model.config.tasks
    assert [o.name for o in session.get_inputs()] == ["pixel_values"]
    generator = torch.Generator().manual_seed(1)
    for batch, height, width in SIZES:
        pixel_values = torch.randn(batch, 3, height, width, generator=generator)
        got = run(session, pixel_values)
        with torch.no_grad():
            expected = model(pixel_values, output_gates=True)
        for task in tasks:
            onnx_logits, torch_logits = got[f"logits.{task}"], expected.logits[task]
            assert onnx_logits.shape == tuple(torch_logits.shape) == (batch, onnx_logits.shape[1], height, width)
            np.testing.assert_allclose(onnx_logits, torch_logits.numpy(), atol=1e-4, rtol=0)
        predictions = logits_to_predictions(expected.logits, model.config)
        onnx_predictions = logits_to_predictions({t: torch.from_numpy(got[f"logits.{t}"]) for t in tasks}, model.config)
        assert_same_segmentation(got["logits.semseg"], expected.logits["semseg"])
        for task in ("saliency", "normals", "depth"):
            torch.testing.assert_close(onnx_predictions[task], predictions[task], atol=1e-4, rtol=0)
        for layer, layer_gates in enumerate(expected.gates):
            for task in tasks:
                np.testing.assert_allclose(got[f"gates.{layer}.{task}"], layer_gates[task].numpy(), atol=1e-5, rtol=0)


def test_modsquad_topk_choices_differ_within_a_batch_and_survive_export(exported_modsquad):
    model, result = exported_modsquad
    session = session_of(result.folder)
    pixel_values = torch.randn(4, 3, 40, 48, generator=torch.Generator().manual_seed(2))
    got = run(session, pixel_values)
    with torch.no_grad():
        expected = model(pixel_values, output_gates=True)
    differing = 0
    for layer, layer_gates in enumerate(expected.gates):
        for task in model.config.tasks:
            chosen = layer_gates[task] > 0  # (B, h, w, E): the selected experts of every token
            onnx_chosen = got[f"gates.{layer}.{task}"] > 0
            assert np.array_equal(onnx_chosen, chosen.numpy()), (layer, task)
            # The experts of one token position differ between the samples of the batch.
            differing += int((chosen != chosen[:1]).any(dim=-1).any(dim=0).sum())
            k = model.config.top_k_of(model.config.moe_layer_kinds[layer][1])
            assert (onnx_chosen.sum(axis=-1) == k).all()
    assert differing > 0, "the test inputs must route samples of one batch to different experts"


def test_the_description_names_outputs_kinds_and_sizes(exported_taskexpert):
    model, result = exported_taskexpert
    info = json.loads((result.folder / "onnx_export.json").read_text())
    config = model.config
    assert info["tasks"] == config.tasks and info["model_type"] == "taskexpert"
    assert info["inputs"][0]["height"] == {"multiple_of": 8, "min": 8, "max": 4096}
    by_task = {output["task"]: output for output in info["outputs"]}
    assert by_task["semseg"]["class_names"] == ["floor", "wall", "box"]
    assert by_task["semseg"]["postprocess"] == [{"op": "argmax"}]
    assert by_task["depth"]["scales_with_zoom"] is True and by_task["depth"]["unit"] == "m"
    assert len(info["routing_outputs"]) == len(config.layer_names) * len(config.tasks)
    assert info["routing_outputs"][0]["candidates"] == config.candidate_names[0]
    assert info["opset"] >= 18
    session = session_of(result.folder)
    assert [o.name for o in session.get_outputs()] == [o["name"] for o in info["outputs"]] + [
        o["name"] for o in info["routing_outputs"]
    ]
    assert json.loads((result.folder / "preprocessor_config.json").read_text())["size"] == {"height": 48, "width": 48}
    assert json.loads((result.folder / "config.json").read_text())["tasks"] == config.tasks


def test_a_task_subset_holds_only_those_tasks(tmp_path):
    import onnx

    model = taskexpert()
    result = export_onnx(model, tmp_path / "subset", tasks=["depth", "semseg"], size=(32, 32))
    graph = onnx.load(str(result.model_file))
    assert [o.name for o in graph.graph.output] == ["logits.semseg", "logits.depth"]  # the model's order
    weights = " ".join(initializer.name for initializer in graph.graph.initializer)
    assert "heads.semseg" in weights and "heads.depth" in weights
    assert "heads.normals" not in weights and "heads.saliency" not in weights
    assert graph.graph.input[0].type.tensor_type.shape.dim[2].dim_value == 32  # fixed size
    got = run(session_of(result.folder), pixel_values := torch.randn(2, 3, 32, 32))
    with torch.no_grad():
        expected = model(pixel_values, tasks=["semseg", "depth"]).logits
    for task in ("semseg", "depth"):
        np.testing.assert_allclose(got[f"logits.{task}"], expected[task].numpy(), atol=1e-4, rtol=0)


def test_postprocess_steps_of_every_kind_equal_the_kinds_postprocess():
    namespace = {"__name__": "deployment_example"}
    exec(compile(deployment_snippet(), "docs/deployment.md", "exec"), namespace)
    generator = torch.Generator().manual_seed(3)
    declarations = {
        "segmentation": {"kind": "segmentation"},
        "saliency": {"kind": "saliency"}, "boundary": {"kind": "boundary"}, "normals": {"kind": "normals"},
        "depth": {"kind": "depth"}, "regression": {"kind": "regression", "channels": 2, "value_range": [-1.0, 2.5]},
        "image_classification": {"kind": "image_classification"},
    }  # fmt: skip
    assert set(declarations) == set(KINDS)
    for name, declaration in declarations.items():
        classes = ["a", "b", "c", "d"] if name in ("segmentation", "image_classification") else None
        spec = make_task_spec(name, declaration, class_names=classes)
        shape = (2, spec.head_channels) if spec.kind.image_level else (2, spec.head_channels, 5, 7)
        logits = torch.randn(*shape, generator=generator) * 3
        expected = spec.kind.postprocess(logits, spec).numpy()
        got = namespace["postprocess"](logits.numpy(), spec.kind.postprocess_steps(spec))
        assert got.shape == expected.shape, name
        np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0, err_msg=name)


def deployment_snippet() -> str:
    snippets = [s for s in python_snippets(REPOSITORY / "docs" / "deployment.md", "docs/deployment.md")]
    (example,) = [s for s in snippets if "onnxruntime" in s.code]
    return example.code


def test_the_deployment_example_runs_without_torch(exported_taskexpert, tmp_path):
    """The export the command line wrote (fixture); the docs' script, in a process where torch cannot be imported,
    gives the maps of the PyTorch processor + model + post-processing."""
    model, result = exported_taskexpert
    shutil.copytree(result.folder, tmp_path / "taskexpert-onnx")
    processor = DenseMultiTaskImageProcessor(size=48, size_divisor=8)
    rng = np.random.default_rng(0)
    from PIL import Image

    image = Image.fromarray(rng.integers(0, 256, (60, 40, 3), dtype=np.uint8))  # shrunk to 48 x 32 on the canvas
    image.save(tmp_path / "example.png")
    script = tmp_path / "example.py"
    script.write_text(deployment_snippet())
    block_torch = "import runpy, sys\nsys.modules['torch'] = None\nrunpy.run_path(sys.argv[1], run_name='__main__')\n"
    env = {**os.environ, "PYTHONPATH": ""}
    completed = subprocess.run(
        [sys.executable, "-c", block_torch, str(script)], cwd=tmp_path, capture_output=True, text=True, env=env
    )
    assert completed.returncode == 0, completed.stderr
    maps = np.load(tmp_path / "predictions.npz")

    inputs = processor(image)
    with torch.no_grad():
        logits = model(**inputs).logits
    (expected,) = processor.post_process_dense_predictions({"logits": logits}, task_specs=model.config)
    top, left = (48 - 48) // 2, (48 - 32) // 2
    for task in model.config.tasks:
        ours = maps[task]
        theirs = expected[task][..., top : top + 48, left : left + 32].numpy()
        if task == "depth":
            theirs = theirs * (48 / 60)  # the scale of the shrink
        assert ours.shape == theirs.shape, task
        if task in ("semseg", "human_parts"):
            top2 = np.sort(logits[task][0, :, top : top + 48, left : left + 32].numpy(), axis=0)[-2:]
            tie = (top2[1] - top2[0]) < 1e-4
            assert np.array_equal(ours[~tie], theirs[~tie]), task
        else:
            np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0, err_msg=task)


def test_errors_are_clear_and_leave_nothing(tmp_path):
    model = taskexpert()
    with pytest.raises(OnnxExportError, match=r"Unknown task\(s\) \['roads'\]"):
        export_onnx(model, tmp_path / "a", tasks=["roads"])
    with pytest.raises(OnnxExportError, match="multiples of the patch size 8"):
        export_onnx(model, tmp_path / "b", size=(30, 32))
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("x")
    with pytest.raises(OnnxExportError, match="not empty"):
        export_onnx(model, occupied)
    assert [p.name for p in occupied.iterdir()] == ["keep.txt"]

    class NumpyInForward(TaskExpertForDensePrediction):
        def forward(self, pixel_values, **kwargs):  # a data-dependent Python branch the exporter cannot trace
            if float(pixel_values.numpy().mean()) > 10:
                pixel_values = pixel_values * 2
            return super().forward(pixel_values, **kwargs)

    torch.manual_seed(0)
    broken = NumpyInForward(tiny_config()).eval()
    with pytest.raises(OnnxExportError, match="torch.onnx.export could not export this taskexpert model"):
        export_onnx(broken, tmp_path / "c", size=(32, 32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["occupied"]  # no output, no staging folder


def test_a_graph_that_does_not_match_pytorch_is_refused(exported_modsquad):
    """The verification step (run by every export before anything is written) names the output and the input; here
    with a tolerance nothing meets."""
    from modeling_taskexpert.export.onnx_export import ExportedForward, output_names, verify

    model, result = exported_modsquad
    wrapper = ExportedForward(model, model.config.tasks, gates=True).eval()
    names = output_names(model.config, model.config.tasks, gates=True)
    example = torch.randn(2, 3, 40, 48, generator=torch.Generator().manual_seed(4))
    assert verify(result.model_file, wrapper, [example], names, tolerance=1e-4) <= 1e-4
    with pytest.raises(OnnxExportError, match=r"Output logits\.semseg on input \(2, 3, 40, 48\): ONNX Runtime differs"):
        verify(result.model_file, wrapper, [example], names, tolerance=0.0)


def test_the_cli_names_a_missing_model(tmp_path, capsys):
    assert export_main(["onnx", "--model", str(tmp_path / "nowhere"), "--output", str(tmp_path / "out")]) == 1
    assert "nowhere" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
