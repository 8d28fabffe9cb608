"""The study of `make experiments`, defined in one place: which models are trained, with which recipe and seeds, and
which paired comparisons settle the paper's claims.

Every variant is a recipe of `hub_configs/` (plus command-line overrides); the study trains each with every seed into
`<output_root>/<variant>/seed<seed>`. Every ablation changes exactly one thing against the model it is compared with
(its recipe says which). Runs of one seed are paired: `train.py` seeds the backbone's initial weights, the data order
and the augmentation draws from the seed alone, so two variants of a seed differ only by what the variant changes
(`tests/test_experiments_pairing.py` checks it).

Three modes:
- `full`: every variant with every seed of `SEEDS` (`make experiments`).
- `pilot`: the few runs that estimate the seed noise of the paired differences, from which `experiments/power.py`
  derives how many seeds the full study needs (`make experiments PILOT=1`).
- `quick`: a few variants for a few steps on a generated toy dataset, to exercise the machinery in minutes; its
  numbers are no evidence of anything.
"""

from dataclasses import dataclass, field
from typing import Optional

from modeling_taskexpert.task_definitions import TASKS

MODES = ("full", "pilot", "quick")


def descriptive_seeds(seeds: tuple[int, ...]) -> tuple[int, ...]:
    """The first half of a study's seeds, rounded up: what its descriptive variants train with."""
    return seeds[: (len(seeds) + 1) // 2]


# Seeds of the full study: the pre-registered plan (experiments/preregistration.md), fixed before its runs. Each claim
# gets the seeds that detect a 2-point Δm difference with 80 % power at α = 0.05 / 5 (Holm over the five claims,
# sized for its strictest step), from the per-comparison noise measured before (`PLAN_NOISE`), capped at
# `PLAN_SEED_CAP` by the CPU budget; a model trains the most seeds any of its claims needs. The descriptive variants
# (no claim rests on them) train with the first half of the seeds, enough for an interval.
PLAN_EFFECT, PLAN_POWER, PLAN_ALPHA, PLAN_SEED_CAP = 2.0, 0.8, 0.05, 10
PLAN_NOISE = {"gating": 0.97, "memory": 3.39, "experts": 1.78, "shared-decoder": 1.00, "multi-task-gain": 1.65}
PLAN_CLAIM_SEEDS = {"gating": 7, "memory": 10, "experts": 10, "shared-decoder": 7, "multi-task-gain": 10}
SEEDS = tuple(range(PLAN_SEED_CAP))
DESCRIPTIVE_SEEDS = descriptive_seeds(SEEDS)
DESCRIPTIVE_VARIANTS = ("two-experts", "twelve-experts", "last-layer-only", "modsquad")

# The commit whose code trains every run of the full study (`python -m experiments.run` checks it out and trains
# there), so that the study is one revision however long it takes and whatever changes on main meanwhile. None: the
# working tree.
STUDY_REVISION: Optional[str] = "68841843f7bdb00591f3b4e15c41ffaac2a6a1ea"

# Recipe fields every run of the study sets, whatever its recipe (experiments/preregistration.md, amendment 1): the
# final evaluation scores boundaries with both scorers, and the exact one (the protocol's) gives the numbers of the
# study; no evaluation during training (the study reads the final numbers only, and each evaluation costs CPU time;
# `eval_steps` does not change what is trained, so the recipe fingerprint leaves it out).
STUDY_OVERRIDES = {"final_boundary_modes": ["approximate", "exact"], "eval_steps": 0}

# The secondary endpoint (preregistration, amendment 1): Δm without these tasks, which sit near chance at this size.
SECONDARY_EXCLUDED_TASKS = ("human_parts",)

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


@dataclass(frozen=True)
class Comparison:
    """A claim as a paired comparison: `variant` against `reference`, seed by seed.

    The claim is that `variant` is better (higher Δm, better primary metrics). `reference` is another variant, or
    `SINGLE_TASK` for the multi-task gain (Δm of `variant` against the single-task models of the same seed).
    `claim` is None for a comparison the paper makes no claim about (shown with its interval, without a verdict).
    """

    name: str
    variant: str
    reference: str
    claim: Optional[str]


SINGLE_TASK = "single-task"
ABLATIONS = "hub_configs/ablations"
VARIANTS = (
    Variant("taskexpert", "hub_configs/synthetic-tiny.yaml", "taskexpert",
            "TaskExpert (default): 4 experts, dynamic gates, memory, MMoE at layers 2 and 4, heads read the final memory"),
    Variant("all-layer-heads", f"{ABLATIONS}/synthetic-tiny-all-layer-heads.yaml", "taskexpert",
            "TaskExpert whose heads read every MMoE layer's task features (head_uses_all_layers)"),
    Variant("no-memory", f"{ABLATIONS}/synthetic-tiny-no-memory.yaml", "ablation",
            "all-layer-heads without the multi-task memory (heads read both MMoE layers, as in the reference)"),
    Variant("uniform-gates", f"{ABLATIONS}/synthetic-tiny-uniform-gates.yaml", "ablation",
            "taskexpert with uniform instead of dynamic gates"),
    Variant("one-expert", f"{ABLATIONS}/synthetic-tiny-one-expert.yaml", "ablation",
            "taskexpert with 1 expert, 40 wide (as many parameters as the 4 experts: the claim is about mixing)"),
    Variant("two-experts", f"{ABLATIONS}/synthetic-tiny-two-experts.yaml", "ablation", "taskexpert with 2 experts"),
    Variant("twelve-experts", f"{ABLATIONS}/synthetic-tiny-twelve-experts.yaml", "ablation",
            "taskexpert with 12 experts"),
    Variant("last-layer-only", f"{ABLATIONS}/synthetic-tiny-last-layer-only.yaml", "ablation",
            "taskexpert with MMoE at the last layer only"),
    Variant("shared-decoder", f"{ABLATIONS}/synthetic-tiny-shared-decoder.yaml", "baseline",
            "shared-decoder multi-task baseline of all-layer-heads: 1 expert 42 wide (parameters matched), uniform "
            "gates, no memory, heads reading both MMoE layers"),
    Variant("modsquad", "hub_configs/modsquad-synthetic-tiny.yaml", "modsquad",
            "Mod-Squad (tiny): MoE attention and MLP with per-task routers"),
) + tuple(
    Variant(f"single-{task}", f"{ABLATIONS}/synthetic-tiny-single-{task}.yaml", "single-task",
            f"single-task model for {task} (the Δm reference)")
    for task in TASKS
)  # fmt: skip

COMPARISONS = (
    Comparison("gating", "taskexpert", "uniform-gates", "Dynamic gating helps (TaskExpert vs uniform gates)"),
    Comparison("memory", "all-layer-heads", "no-memory",
               "The multi-task memory helps (heads reading both MMoE layers, with and without memory)"),
    Comparison("experts", "taskexpert", "one-expert",
               "Mixing several experts helps (TaskExpert vs one expert with as many parameters)"),
    Comparison("shared-decoder", "all-layer-heads", "shared-decoder",
               "TaskExpert beats a shared decoder (same parameters, heads reading the same layers)"),
    Comparison("multi-task-gain", "taskexpert", SINGLE_TASK, "Multi-task gain: Δm > 0 (TaskExpert vs single-task models)"),
    Comparison("all-layer-heads", "all-layer-heads", "taskexpert", None),
    Comparison("twelve-experts", "twelve-experts", "taskexpert", None),
    Comparison("modsquad", "taskexpert", "modsquad", None),
)  # fmt: skip

# The pilot: the default TaskExpert, the all-layer-heads TaskExpert and its two comparisons whose seed noise was the
# largest in earlier studies (memory, shared decoder), five seeds each, the single-task models of one seed (their metrics only scale Δm differences) and Mod-Squad with
# one seed (its measured CPU time plans the full study).
PILOT_VARIANTS = ("taskexpert", "all-layer-heads", "no-memory", "shared-decoder")
PILOT_SEEDS = (0, 1, 2, 3, 4)
PILOT_ONE_SEED_VARIANTS = ("modsquad",) + tuple(f"single-{task}" for task in TASKS)

# The quick mode: two tasks (one higher- and one lower-is-better primary metric, so that Δm is exercised both ways),
# the variants needed for every section of the report, two seeds (so that paired intervals exist; Mod-Squad, the
# slowest, one), three steps on a toy dataset.
QUICK_TASKS = ("semseg", "depth")
QUICK_VARIANTS = ("taskexpert", "all-layer-heads", "shared-decoder", "modsquad", "single-semseg", "single-depth")
QUICK_SEEDS = (0, 1)
QUICK_ONE_SEED_VARIANTS = ("modsquad",)
QUICK_OVERRIDES = {
    "max_steps": 3, "warmup_steps": 0, "eval_steps": 0, "save_steps": 0, "logging_steps": 1,
    "per_device_train_batch_size": 2, "per_device_eval_batch_size": 4,
}  # fmt: skip
QUICK_DATASET = {"train_size": 8, "val_size": 4, "image_size": 128, "seed": 0}


def variants_by_name() -> dict[str, Variant]:
    return {variant.name: variant for variant in VARIANTS}


def mode_variants(mode: str) -> tuple[str, ...]:
    """Names of the variants a mode trains."""
    if mode not in MODES:
        raise ValueError(f"Unknown study mode {mode!r}; the modes are {MODES}.")
    if mode == "quick":
        return QUICK_VARIANTS
    if mode == "pilot":
        return PILOT_VARIANTS + PILOT_ONE_SEED_VARIANTS
    return tuple(variant.name for variant in VARIANTS)


def claim_seed_counts() -> dict[str, int]:
    """Per model of a claim, the seeds it trains (the most any of its claims needs, `PLAN_CLAIM_SEEDS`); the
    single-task models train with the multi-task gain's."""
    counts: dict[str, int] = {}
    for comparison in COMPARISONS:
        if comparison.claim is None:
            continue
        names = [comparison.variant, comparison.reference]
        if comparison.reference == SINGLE_TASK:
            names = [comparison.variant] + [f"single-{task}" for task in TASKS]
        for name in names:
            counts[name] = max(counts.get(name, 0), PLAN_CLAIM_SEEDS[comparison.name])
    return counts


def mode_seeds(mode: str, variant: Variant, seed_count: Optional[int] = None) -> tuple[int, ...]:
    """Seeds a variant trains with. `seed_count` (full study only) replaces `SEEDS` by its first `seed_count` seeds,
    e.g. seeds 0-4 of a study cut to fit a smaller CPU budget (the descriptive variants then train with the first half,
    rounded up); a later run with more seeds adds the missing ones to the same study."""
    if mode == "quick":
        return QUICK_SEEDS[:1] if variant.name in QUICK_ONE_SEED_VARIANTS else QUICK_SEEDS
    if mode == "pilot":
        return PILOT_SEEDS[:1] if variant.name in PILOT_ONE_SEED_VARIANTS else PILOT_SEEDS
    seeds = SEEDS if seed_count is None else tuple(range(seed_count))
    if variant.name in DESCRIPTIVE_VARIANTS:
        return descriptive_seeds(seeds)
    return seeds[: claim_seed_counts().get(variant.name, len(seeds))]


def study_runs(mode: str = "full", only: tuple[str, ...] = (), seed_count: Optional[int] = None) -> list[Run]:
    """The runs of a mode (see the module docstring), optionally restricted to some variants by name and, in the full
    study, to its first `seed_count` seeds (`mode_seeds`)."""
    if seed_count is not None and (mode != "full" or seed_count < 1):
        raise ValueError(f"A seed count applies to the full study only and must be at least 1, got {seed_count} "
                         f"for the {mode} study.")  # fmt: skip
    known = variants_by_name()
    unknown = [name for name in only if name not in known]
    if unknown:
        raise ValueError(f"Unknown study variant(s) {unknown}; the study has {sorted(known)}.")
    names = mode_variants(mode)
    if only:
        names = tuple(name for name in names if name in only)
        if not names:
            raise ValueError(f"None of {list(only)} is part of the {mode} study ({list(mode_variants(mode))}).")
    runs = []
    for name in names:
        variant = known[name]
        overrides = {**STUDY_OVERRIDES, **(QUICK_OVERRIDES if mode == "quick" else {})}
        if mode == "quick" and variant.kind != "single-task":
            overrides["tasks"] = list(QUICK_TASKS)
        runs.extend(Run(variant, seed, overrides) for seed in mode_seeds(mode, variant, seed_count))
    # Seed by seed: a study cut short (it spans several sessions of a CPU budget) holds complete pairs of every
    # comparison for its first seeds rather than every seed of the first variants.
    return sorted(runs, key=lambda run: run.seed)
