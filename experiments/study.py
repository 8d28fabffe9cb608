"""The study of `make experiments`, defined in one place: which models are trained, with which recipe and seeds.

Every variant is a recipe of `hub_configs/` (plus command-line overrides); the study trains each with every seed into
`<output_root>/<variant>/seed<seed>`. The quick mode trains a few variants for a few steps on a generated toy dataset
to exercise the machinery (runner, report, figures) in minutes; its numbers are no evidence of anything.
"""

from dataclasses import dataclass, field

from modeling_taskexpert.task_definitions import TASKS

SEEDS = (0, 1, 2)

# Kinds of variants, in the order the report lists them.
KINDS = ("taskexpert", "ablation", "baseline", "modsquad", "single-task")


@dataclass(frozen=True)
class Variant:
    """One model of the study: a recipe and its overrides (recipe field -> value), trained once per seed."""

    name: str
    recipe: str
    kind: str
    description: str
    overrides: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Variant {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}.")


@dataclass(frozen=True)
class Run:
    """One training run: a variant with one seed and the overrides of the mode it runs in."""

    variant: Variant
    seed: int
    overrides: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.variant.name}/seed{self.seed}"

    @property
    def all_overrides(self) -> dict:
        """The variant's overrides, then the mode's (which win: the quick mode shortens every run alike)."""
        return {**self.variant.overrides, **self.overrides}


ABLATIONS = "hub_configs/ablations"
VARIANTS = (
    Variant("taskexpert", "hub_configs/synthetic-tiny.yaml", "taskexpert",
            "TaskExpert (default): 4 experts, dynamic gates, memory, MMoE at layers 2 and 4"),
    Variant("no-memory", f"{ABLATIONS}/synthetic-tiny-no-memory.yaml", "ablation", "without the multi-task memory"),
    Variant("uniform-gates", f"{ABLATIONS}/synthetic-tiny-uniform-gates.yaml", "ablation",
            "uniform instead of dynamic gates"),
    Variant("one-expert", f"{ABLATIONS}/synthetic-tiny-one-expert.yaml", "ablation", "1 expert (with memory)"),
    Variant("two-experts", f"{ABLATIONS}/synthetic-tiny-two-experts.yaml", "ablation", "2 experts"),
    Variant("twelve-experts", f"{ABLATIONS}/synthetic-tiny-twelve-experts.yaml", "ablation", "12 experts"),
    Variant("last-layer-only", f"{ABLATIONS}/synthetic-tiny-last-layer-only.yaml", "ablation",
            "MMoE at the last layer only"),
    Variant("shared-decoder", f"{ABLATIONS}/synthetic-tiny-shared-decoder.yaml", "baseline",
            "shared-decoder multi-task baseline: 1 expert, no memory, uniform gates"),
    Variant("modsquad", "hub_configs/modsquad-synthetic-tiny.yaml", "modsquad",
            "Mod-Squad (tiny): MoE attention and MLP with per-task routers"),
) + tuple(
    Variant(f"single-{task}", f"{ABLATIONS}/synthetic-tiny-single-{task}.yaml", "single-task",
            f"single-task model for {task} (the Δm reference)")
    for task in TASKS
)  # fmt: skip

# The quick mode: two tasks (one higher- and one lower-is-better main metric, so that Δm is exercised both ways),
# the variants needed for every section of the report, one seed, three steps on a toy dataset.
QUICK_TASKS = ("semseg", "depth")
QUICK_VARIANTS = ("taskexpert", "shared-decoder", "modsquad", "single-semseg", "single-depth")
QUICK_SEEDS = (0,)
QUICK_OVERRIDES = {
    "max_steps": 3, "warmup_steps": 0, "eval_steps": 0, "save_steps": 0, "logging_steps": 1,
    "per_device_train_batch_size": 2, "per_device_eval_batch_size": 4,
}  # fmt: skip
QUICK_DATASET = {"train_size": 8, "val_size": 4, "image_size": 128, "seed": 0}


def variants_by_name() -> dict[str, Variant]:
    return {variant.name: variant for variant in VARIANTS}


def study_runs(quick: bool = False, only: tuple[str, ...] = ()) -> list[Run]:
    """The runs of the full study (or of the quick mode), optionally restricted to some variants by name."""
    known = variants_by_name()
    unknown = [name for name in only if name not in known]
    if unknown:
        raise ValueError(f"Unknown study variant(s) {unknown}; the study has {sorted(known)}.")
    names = QUICK_VARIANTS if quick else tuple(known)
    if only:
        names = tuple(name for name in names if name in only)
        if not names:
            raise ValueError(f"None of {list(only)} is part of the {'quick' if quick else 'full'} study ({list(QUICK_VARIANTS if quick else known)}).")
    seeds = QUICK_SEEDS if quick else SEEDS
    runs = []
    for name in names:
        variant = known[name]
        overrides = dict(QUICK_OVERRIDES) if quick else {}
        if quick and variant.kind != "single-task":
            overrides["tasks"] = list(QUICK_TASKS)
        runs.extend(Run(variant, seed, overrides) for seed in seeds)
    return runs
