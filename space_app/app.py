"""The Space of this package's dense multi-task models (TaskExpert, Mod-Squad): every task's dense map for one image, and how each task routes through the model's experts.

Run it with `make space` or `python space_app/app.py` (serves on 127.0.0.1, port `GRADIO_SERVER_PORT` or 7860). The
model comes from `TASKEXPERT_MODEL` (a local folder, relative ones from the repository root, or a Hub id), by
default the study's best model or the folder `make train` writes.

This file is the page; the work is in the files beside it: `model_loading.py` (model and images), `inference.py`
(running the model), `rendering.py` (maps and legends), `experts_tab.py` (routing), `resources.py` (bounds on memory
and disk, cleanup on exit).
"""

import html
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

import gradio as gr
from gradio.data_classes import ImageData
from pydantic import Field, model_validator
from pydantic.json_schema import SkipJsonSchema

from experts_tab import (
    ExpertsState,
    candidate_color_map,
    candidates_note,
    dominant_label,
    dominant_overlay,
    plot_routing,
)
from inference import DemoPrediction, predict, save_npz
from model_loading import EXAMPLES_DIR, MAX_UPLOAD_MB, DemoModel, ModelUnavailable, load_demo_model
from modeling_taskexpert.model_types import MODEL_TYPES
from rendering import (
    LEGEND_CSS,
    OVERLAY_OPACITY,
    AnnotatedImageOutput,
    ImageOutput,
    class_color_map,
    class_names,
    empty_map_note,
    render_task,
    task_legend,
    task_title,
)
from resources import CacheJanitor, ErrorNotes, ResourceLimits, StorageFull, stop_on_sigterm

logger = logging.getLogger(__name__)

# Requests waiting in the queue at most (beyond, a request is refused with "Queue is full"); the model serves one
# request at a time. A waiting request holds only its upload, which is on disk and counted in the cache budget.
MAX_QUEUE_SIZE = 32

TITLE = "Multi-task dense prediction with mixtures of experts"
DESCRIPTION = (
    "One model predicts several dense maps of an image at once. TaskExpert (Ye & Xu, ICCV 2023) mixes a set of "
    "expert networks with a gate per task, pixel by pixel, together with a per-task memory carried from layer to "
    "layer; Mod-Squad (Chen et al., CVPR 2023) routes every token of every task to a few of its attention and MLP "
    "experts. Upload an image (or pick an example), choose tasks and press **Run**; the **Experts** tab shows which "
    "candidate each task relies on where."
)
CSS = (
    """
.gradio-container {max-width: 1280px !important; margin: auto;}
#model-info {font-size: 0.9em;}
#model-missing {border-left: 4px solid #e5484d; padding-left: 12px;}
#model-limits {border-left: 4px solid #f5a524; padding-left: 12px;}
.status-error {border-left: 4px solid #e5484d; padding: 4px 12px; background: rgba(229, 72, 77, 0.08);}
/* Maps of tiny inputs (down to 1x1) are shown enlarged and crisp; the files and the API keep the image's size. */
.task-map img {image-rendering: pixelated; min-width: 128px; min-height: 128px; object-fit: contain;}
"""
    + LEGEND_CSS
)
READY = "Upload an image and press **Run**."
NEW_IMAGE = "New image: press **Run** to predict its maps."


class UploadedImageData(ImageData):
    """`ImageData` that lets a bare string through validation (a path or URL sent through the API instead of a file),
    so that `ImageUpload.preprocess` can refuse it with the reason rather than with an unexplained validation error."""

    sent_text: SkipJsonSchema[Optional[str]] = Field(default=None, exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _keep_text_for_the_message(cls, value):
        return {"sent_text": value} if isinstance(value, str) else value


class ImageUpload(gr.Image):
    """`gr.Image` input that passes the uploaded file's path on without decoding it: `model_loading.load_image`
    checks and decodes it in the request, so every problem with the file gets the same clear message.

    A template of `gr.Image`: the page shows the standard image component.
    """

    is_template = True
    data_model = UploadedImageData

    def preprocess(self, payload):
        if payload is not None and payload.sent_text is not None:
            raise gr.Error(
                f"The image must be sent as a file, not as the text “{payload.sent_text[:80]}”: the app does not open "
                "paths or URLs by itself. With gradio_client, wrap it: client.predict(handle_file(path_or_url), ...).",
                print_exception=False,
            )
        if payload is None or payload.path is None or (payload.url or "").startswith("data:"):
            return super().preprocess(payload)
        return str(payload.path)


class TaskChoice(gr.CheckboxGroup):
    """`gr.CheckboxGroup` of tasks that refuses an unknown task (sent through the API) with the tasks the model has,
    and without a traceback in the server log (a user's mistake, not a failure of the app).

    A template of `gr.CheckboxGroup`: the page shows the standard component.
    """

    is_template = True

    def preprocess(self, payload):
        known = [value for _, value in self.choices]
        unknown = [str(value) for value in payload or [] if value not in known]
        if unknown:
            raise gr.Error(
                f"Unknown task(s) {', '.join(unknown)}; this model predicts {', '.join(map(str, known)) or 'nothing'}.",
                print_exception=False,
            )
        return super().preprocess(payload)


@dataclass
class SpaceDemo:
    """The page and what serves it: the model (None when unavailable), the cache janitor and the limits."""

    blocks: gr.Blocks
    demo_model: Optional[DemoModel]
    janitor: CacheJanitor
    limits: ResourceLimits
    errors: ErrorNotes

    def close(self) -> None:
        self.blocks.close()


def status_text(prediction: DemoPrediction, device: str) -> str:
    """The status box after a run: what ran, on what, how long, and what was done to the input."""
    height, width = prediction.image.shape[:2]
    lines = [
        f"**{len(prediction.predictions)} task(s)** on a {width}×{height} image in **{prediction.seconds:.2f} s** "
        f"({device}). {prediction.model_view()}"
    ]
    lines += [f"- {note}" for note in prediction.notes]
    return "\n".join(lines)


def error_box(message: str) -> str:
    """The status box after a failure (HTML, so that the plain-text message is shown as written)."""
    return f'<div class="status-error" role="alert"><strong>Error:</strong> {html.escape(message)}</div>'


def build_demo(model_path: Optional[str] = None, limits: Optional[ResourceLimits] = None) -> SpaceDemo:
    """The Gradio page for the model at `model_path` (see `model_loading.resolve_model_source`), with the `predict`
    API endpoint. Without a loadable model the page explains how to get one and the Run button is disabled."""
    limits = limits or ResourceLimits.from_env()
    try:
        demo_model, problem = load_demo_model(model_path), None
    except ModelUnavailable as error:
        demo_model, problem = None, str(error)
    tasks = demo_model.tasks if demo_model else []
    titles = {task: task_title(spec) for task, spec in demo_model.config.task_specs.items()} if demo_model else {}
    layer_names = list(demo_model.config.layer_names) if demo_model else []
    errors = ErrorNotes()

    # The page names the served model's architecture (TaskExpert, Mod-Squad), else the package's topic.
    page_title = MODEL_TYPES[demo_model.config.model_type].title.split(" (")[0] if demo_model else "Dense multi-task"
    with gr.Blocks(title=f"{page_title} demo") as demo:
        gr.Markdown(f"# {TITLE}\n{DESCRIPTION}")
        if problem:
            gr.Markdown(f"**The demo has no model.** {problem}", elem_id="model-missing")
        else:
            gr.Markdown(demo_model.describe(), elem_id="model-info")
        experts_state = gr.State(time_to_live=limits.state_ttl_s)
        map_notes = gr.State(time_to_live=limits.state_ttl_s)  # per task: what an empty map shows nothing of

        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=300):
                image_input = ImageUpload(
                    label="Image", type="filepath", image_mode=None, sources=["upload", "webcam", "clipboard"],
                    height=300, elem_id="input-image",
                )  # fmt: skip
                task_choice = TaskChoice(choices=[(titles[task], task) for task in tasks], value=tasks, label="Tasks")
                run_button = gr.Button("Run", variant="primary", interactive=demo_model is not None, elem_id="run")
                examples = sorted(str(path) for path in EXAMPLES_DIR.glob("*.jpg"))
                if examples:
                    gr.Examples(
                        examples=examples, inputs=image_input, label="Examples (scenes of the synthetic benchmark)"
                    )
            with gr.Column(scale=3):
                if demo_model is not None:
                    gr.Markdown(demo_model.limitations(), elem_id="model-limits")
                status = gr.Markdown(READY, elem_id="status")
                with gr.Tabs():
                    with gr.Tab("Task maps"):
                        task_outputs, legends = {}, {}
                        for row_start in range(0, len(tasks), 3):
                            with gr.Row():
                                for task in tasks[row_start : row_start + 3]:
                                    with gr.Column(min_width=240):
                                        task_outputs[task] = _task_component(task, demo_model)
                                        legend = task_legend(demo_model.config.task_specs[task])
                                        if legend is not None:
                                            legends[task] = gr.HTML(legend, elem_id=f"legend-{task}")
                    with gr.Tab("Experts"):
                        gr.Markdown(
                            "For one task and one routing layer: which candidate (expert, or TaskExpert's memory) has "
                            "the largest gate weight at each pixel (hover a legend entry to highlight its region). The "
                            "plots show each candidate's mean gate weight per layer for that task, and per task at "
                            "that layer."
                        )
                        with gr.Row():
                            expert_task = gr.Dropdown(
                                choices=[(titles[task], task) for task in tasks],
                                value=tasks[0] if tasks else None, label="Task", elem_id="expert-task",
                            )  # fmt: skip
                            expert_layer = gr.Radio(
                                choices=[(name, k) for k, name in enumerate(layer_names)],
                                value=0 if layer_names else None, label="Routing layer",
                            )  # fmt: skip
                        expert_note = gr.Markdown("Run the model to see its routing.", elem_id="expert-note")
                        expert_map = AnnotatedImageOutput(
                            label="Dominant candidate", format="png", height=420, elem_id="expert-map"
                        )
                        expert_plot = gr.Plot(label="Gate weights", show_label=False, elem_id="expert-plot")
                    with gr.Tab("Raw arrays"):
                        gr.Markdown(
                            "All predictions as numpy arrays (`np.load`): `image`, one array per task at the image's "
                            "size (class ids, probabilities, unit normals (3, H, W), depth in metres), the routing "
                            "layers and candidates (`layer_names`, `candidate_names/<l>`), and per task "
                            "`dominant_candidate/<task>` (layers, H, W) and `mean_weight/<task>/<l>`. The file is "
                            "kept for a limited time: download it soon."
                        )
                        arrays_file = gr.File(label="Predictions (.npz)", elem_id="arrays")

        janitor = CacheJanitor(demo, limits)

        def fail(message: str, request: Optional[gr.Request]):
            errors.record(getattr(request, "session_hash", None), message)
            raise gr.Error(message, print_exception=False)  # a toast that fades; the status box keeps it

        def run(image, chosen_tasks, request: gr.Request):
            if demo_model is None:
                fail(problem.replace("`", ""), request)  # Markdown on the page, plain text in a toast or API error
            if image is None:
                fail("Upload an image or pick an example first.", request)
            try:
                janitor.admit(image if isinstance(image, str) else None)  # the disk budget, before any work
            except StorageFull as error:
                fail(str(error), request)
            try:
                prediction = predict(demo_model, image, chosen_tasks)
            except ValueError as error:  # the user's input: the message says what is wrong
                fail(str(error), request)
            except Exception as error:  # a failure of the app: the log gets the traceback, the user a message
                logger.exception("Inference failed")
                fail(f"Inference failed ({type(error).__name__}: {error}).", request)
            janitor.sweep()  # make room before this request's files are written: only earlier files can go
            device = "GPU" if demo_model.model.device.type == "cuda" else "CPU"
            maps = []
            for task in task_outputs:
                if task not in prediction.predictions:
                    maps.append(None)
                    continue
                value = prediction.predictions[task]
                maps.append(render_task(value, task, prediction.image, demo_model.config))
            arrays = save_npz(prediction, arrays_file.GRADIO_CACHE)
            depth = prediction.predictions.get("depth")
            state = ExpertsState.from_prediction(prediction.image, prediction.routing, depth)
            # An empty map says so in its title rather than showing the bare photo (set after the API's outputs).
            notes = {
                task: empty_map_note(value, task, demo_model.config) for task, value in prediction.predictions.items()
            }
            return status_text(prediction, device), *maps, str(arrays), state, notes

        def label_maps(notes: Optional[dict]):
            notes = notes or {}
            return [
                gr.update(label=titles[task] + (f": {notes[task]}" if notes.get(task) else "")) for task in task_outputs
            ]

        def after_run(state: Optional[ExpertsState], layer: Optional[int]):
            selected = state.routing.tasks
            legend_values = [gr.update(value=task_legend(task, state.depth_range)) if task == "depth" else gr.skip()
                             for task in legends]  # fmt: skip
            dropdown = gr.update(choices=[(titles[task], task) for task in selected], value=selected[0])
            return dropdown, *show_experts(state, selected[0], layer), *legend_values

        def show_error(request: gr.Request):
            # The maps of an earlier image must not stay under this request's error: they are cleared.
            message = errors.pop(request.session_hash)
            if message is None:
                return gr.skip(), *[gr.skip()] * (len(task_outputs) + 1)
            return error_box(message), *[None] * (len(task_outputs) + 1)

        def clear_for_new_image():
            return NEW_IMAGE, *[gr.update(value=None, label=titles[task]) for task in task_outputs], None

        def show_tasks(chosen_tasks):
            return [gr.update(visible=task in chosen_tasks) for task in task_outputs] + [
                gr.update(visible=task in chosen_tasks) for task in legends
            ]

        def show_experts(state: Optional[ExpertsState], task: Optional[str], layer: Optional[int]):
            if state is None or task not in state.routing.gates:
                note = (
                    "Run the model to see its routing." if state is None
                    else f"{titles.get(task, task)} was not among the tasks of the last run; run it to see its routing."
                )  # fmt: skip
                return gr.update(value=note), gr.update(value=None), None
            layer = int(layer or 0)
            names = state.routing.candidate_names[layer]
            overlay = gr.update(
                value=dominant_overlay(state, task, layer, OVERLAY_OPACITY),
                color_map=candidate_color_map(names),
                label=dominant_label(state.routing, titles[task], layer),
            )
            note = candidates_note(state.routing, layer)
            return gr.update(value=note), overlay, plot_routing(state.routing, task, layer, titles)

        def forget_session(request: gr.Request):
            # A closed page (or a finished API client) needs its state no more; Gradio itself would keep it an hour.
            demo.state_holder.delete_state(request.session_hash)
            errors.pop(request.session_hash)

        demo.unload(forget_session)

        # Run is disabled while this session's request is in flight (a second click would be dropped silently) and
        # enabled again however the request ends. The API endpoint returns the status, every task's map and the
        # arrays; the rest of the page follows.
        busy = run_button.click(
            lambda: gr.update(interactive=False, value="Running..."), None, run_button, queue=False,
            api_visibility="private",
        )  # fmt: skip
        run_event = busy.then(
            run,
            inputs=[image_input, task_choice],
            outputs=[status, *task_outputs.values(), arrays_file, experts_state, map_notes],
            api_name="predict",
            show_progress_on=[status],
        )
        for ended in (run_event.success, run_event.failure):
            ended(lambda: gr.update(interactive=True, value="Run"), None, run_button, api_visibility="private")
        run_event.success(label_maps, map_notes, list(task_outputs.values()), api_visibility="private")
        image_input.change(
            clear_for_new_image, None, [status, *task_outputs.values(), arrays_file], api_visibility="private"
        )
        run_event.success(
            after_run,
            inputs=[experts_state, expert_layer],
            outputs=[expert_task, expert_note, expert_map, expert_plot, *legends.values()],
            api_visibility="private",
        )
        run_event.failure(
            show_error, inputs=None, outputs=[status, *task_outputs.values(), arrays_file], api_visibility="private"
        )
        task_choice.change(
            show_tasks, inputs=task_choice, outputs=[*task_outputs.values(), *legends.values()],
            api_visibility="private",
        )  # fmt: skip
        for control in (expert_task, expert_layer):
            control.input(
                show_experts,
                inputs=[experts_state, expert_task, expert_layer],
                outputs=[expert_note, expert_map, expert_plot],
                api_visibility="private",
            )
    demo.queue(default_concurrency_limit=1, max_size=MAX_QUEUE_SIZE)
    return SpaceDemo(blocks=demo, demo_model=demo_model, janitor=janitor, limits=limits, errors=errors)


def _task_component(task: str, demo_model: DemoModel):
    """The output component of one task: an annotated overlay for segmentation, an image otherwise."""
    common = {
        "label": task_title(demo_model.config.task_specs[task]),
        "format": "png",
        "elem_id": f"map-{task}",
        "elem_classes": ["task-map"],
        "min_width": 240,
    }
    if demo_model.config.task_specs[task].kind.name == "segmentation":
        return AnnotatedImageOutput(color_map=class_color_map(class_names(demo_model.config, task)), **common)
    return ImageOutput(interactive=False, **common)


def launch(space: SpaceDemo, **launch_kwargs):
    """Launch the page with its style, the upload limit, the session bound and the cache janitor; `launch_kwargs` go
    to `Blocks.launch` (host and port default to `GRADIO_SERVER_NAME` / `GRADIO_SERVER_PORT`, else
    127.0.0.1:7860). The janitor sweeps while the server runs and deletes every file the app created when it stops."""
    return space.blocks.launch(
        max_file_size=f"{MAX_UPLOAD_MB}mb",
        css=CSS,
        theme=gr.themes.Soft(),
        state_session_capacity=space.limits.max_sessions,
        app_kwargs={"lifespan": space.janitor.lifespan()},
        **launch_kwargs,
    )


def serve(model_path: Optional[str] = None, **launch_kwargs) -> None:
    """Serve the page until Ctrl-C or SIGTERM, then close it (ending open connections at once) and delete every file
    the app created. Unless `GRADIO_TEMP_DIR` names a folder, the app's files go to a new folder of the system's
    temporary folder, removed whole at the end (no other app shares it)."""
    stop_on_sigterm()
    own_folder = None
    if not os.environ.get("GRADIO_TEMP_DIR"):
        own_folder = tempfile.mkdtemp(prefix="taskexpert-space-")
        os.environ["GRADIO_TEMP_DIR"] = own_folder
    space = None
    try:
        space = build_demo(model_path)
        launch(space, prevent_thread_lock=True, **launch_kwargs)
        while space.blocks.is_running:
            time.sleep(0.2)
    except KeyboardInterrupt:
        logger.info("Stopping the server.")
    finally:
        if space is not None:
            space.close()
            space.janitor.stop()
            space.janitor.delete_all()
        if own_folder is not None:
            shutil.rmtree(own_folder, ignore_errors=True)


def main() -> None:
    logging.basicConfig(level=logging.INFO)
    serve()


if __name__ == "__main__":
    main()
