"""Reading the study's run folders and aggregating them: metrics per variant (mean ± sample standard deviation over
seeds), Δm per seed, the code revision of every run, and the paired comparisons of `study.COMPARISONS`.

A run folder (written by `train.py`) holds `metrics.json` (final evaluation), `config.json`, `recipe.yaml`,
`train_log.jsonl`, `provenance.json` (git commit, package and torch versions, recipe hash) and, from the runner,
`launch.json` (wall and CPU time). Nothing here trains or loads a model (that is `measure.py`).
"""

import json
import statistics
from pathlib import Path
from typing import Optional

import yaml

from modeling_taskexpert.evaluation import PRIMARY_METRICS, compute_delta_m
from modeling_taskexpert.evaluation.delta_m import APPROXIMATE_EDGE_METRIC

from . import paired, table
from .paths import LAUNCH_FILE, STUDY_FILE
from .study import (
    COMPARISONS,
    KINDS,
    MODES,
    PLAN_CLAIM_SEEDS,
    SECONDARY_EXCLUDED_TASKS,
    SINGLE_TASK,
    Comparison,
    study_runs,
    variants_by_name,
)

PROVENANCE_FILE = "provenance.json"
UNRECORDED = "unrecorded"  # the revision of a run without provenance.json


class StudyError(RuntimeError):
    """A study that cannot run or be reported as asked; the message names the run or file and what is wrong."""


def read_study(output_root: Path) -> dict:
    """`study.json` of an output root: the mode, and every run with its variant, seed and folder."""
    path = Path(output_root) / STUDY_FILE
    try:
        study = json.loads(path.read_text())
    except FileNotFoundError:
        raise StudyError(f"No {STUDY_FILE} under {output_root}: run `python -m experiments.run` first.") from None
    except json.JSONDecodeError as error:
        raise StudyError(f"{path} is not valid JSON: {error}") from None
    if study.get("mode") not in MODES or not isinstance(study.get("runs"), list):
        raise StudyError(f"{path} must hold 'mode' (one of {', '.join(MODES)}) and a list of 'runs'.")
    return study


# ---------------------------------------------------------------------------------------------------------------------
# One run folder
# ---------------------------------------------------------------------------------------------------------------------
def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise StudyError(f"Missing {path}.") from None
    except json.JSONDecodeError as error:
        raise StudyError(f"{path} is not valid JSON: {error}") from None


def read_log(path: Path) -> list[dict]:
    records = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise StudyError(f"{path}, line {number}: not valid JSON ({error}).") from None
    return records


def load_run(folder: Path) -> dict:
    """The final metrics, tasks, recipe, log, revision and cost of one finished run folder."""
    folder = Path(folder)
    metrics = _read_json(folder / "metrics.json")
    config = _read_json(folder / "config.json")
    try:
        recipe = yaml.safe_load((folder / "recipe.yaml").read_text())
        log = read_log(folder / "train_log.jsonl")
    except FileNotFoundError as error:
        raise StudyError(f"Run folder {folder} is incomplete: missing {Path(error.filename).name}.") from None
    except yaml.YAMLError as error:
        raise StudyError(f"Run folder {folder}: cannot parse recipe.yaml ({error}).") from None
    for key in ("tasks", "model_type"):
        if key not in config:
            raise StudyError(f"{folder / 'config.json'} has no {key!r}.")
    provenance = _read_json(folder / PROVENANCE_FILE) if (folder / PROVENANCE_FILE).is_file() else None
    launches = _read_json(folder / LAUNCH_FILE) if (folder / LAUNCH_FILE).is_file() else []
    return {
        "folder": folder, "metrics": metrics, "tasks": list(config["tasks"]), "recipe": recipe, "log": log,
        "model_type": config["model_type"], "step_seconds": step_seconds(log, recipe),
        "provenance": provenance, "revision": revision_of(provenance), "short_revision": short_revision(provenance),
        "cpu_seconds": sum(launch["cpu_seconds"] for launch in launches) if _complete(launches) else None,
        "wall_seconds": sum(launch["wall_seconds"] for launch in launches) if _complete(launches) else None,
        # The machine(s) it trained on: one seed gives the same numbers on one machine, not across CPU models.
        "machine": "; ".join(dict.fromkeys(launch.get("machine") or "not recorded" for launch in launches)) or None,
        "final_training_loss": final_training_loss(log),
    }  # fmt: skip


def _complete(launches: list[dict]) -> bool:
    """Whether the launches cover the whole run: the first one started it afresh (records without "fresh" predate
    that field and were written by complete runs only)."""
    return bool(launches) and launches[0].get("fresh", True)


def step_seconds(log: list[dict], recipe: dict) -> Optional[float]:
    """Median wall time of one optimiser step, from the logged throughput. The first logging window holds the
    warm-up (allocator, lazy initialisation) and is left out when there are others."""
    records = [r for r in log if r.get("kind") == "train" and r.get("images_per_second")]
    if len(records) > 1:
        records = records[1:]
    if not records:
        return None
    images_per_step = recipe["per_device_train_batch_size"] * recipe["gradient_accumulation_steps"]
    return statistics.median(images_per_step * r.get("world_size", 1) / r["images_per_second"] for r in records)


# ---------------------------------------------------------------------------------------------------------------------
# Revisions
# ---------------------------------------------------------------------------------------------------------------------
def _describe(provenance: dict) -> str:
    commit = provenance.get("git_commit")
    text = f"commit {commit[:12]}" if commit else "no git commit"
    if provenance.get("git_dirty"):
        text += " with uncommitted changes"
    return f"{text}, package {provenance.get('package_version')}, torch {provenance.get('torch_version')}"


def revision_of(provenance: Optional[dict]) -> str:
    """The code a run was trained with, as one string: commit (and whether the tree had uncommitted changes), package
    and torch versions. A run resumed under other code is "mixed: A; B"."""
    if provenance is None:
        return UNRECORDED
    revisions = [_describe(provenance)] + [_describe(resume) for resume in provenance.get("resumes", [])]
    distinct = list(dict.fromkeys(revisions))
    return distinct[0] if len(distinct) == 1 else "mixed: " + "; ".join(distinct)


def short_revision(provenance: Optional[dict]) -> str:
    """The commit of a run in 12 hex digits ("+changes" when the tree had uncommitted changes), for table cells."""
    if provenance is None:
        return UNRECORDED
    commits = [provenance] + list(provenance.get("resumes", []))
    texts = list(
        dict.fromkeys(
            f"{(p.get('git_commit') or 'no-commit')[:12]}{'+changes' if p.get('git_dirty') else ''}" for p in commits
        )
    )
    return texts[0] if len(texts) == 1 else "mixed " + "/".join(texts)


def revisions(collected: dict) -> dict[str, list[str]]:
    """Revision -> the runs ("variant/seedS") trained with it."""
    found: dict[str, list[str]] = {}
    for name, variant in collected["variants"].items():
        for seed, run in sorted(variant["runs"].items()):
            found.setdefault(run["revision"], []).append(f"{name}/seed{seed}")
    return found


def check_one_revision(collected: dict, allow_mixed: bool = False) -> None:
    """Refuse a study whose runs come from more than one revision (their differences would mix code changes with the
    compared factor), unless `allow_mixed`."""
    found = revisions(collected)
    if len(found) > 1 and not allow_mixed:
        listing = "; ".join(
            f"{revision}: {len(runs)} run(s), e.g. {', '.join(runs[:3])}" for revision, runs in found.items()
        )
        raise StudyError(
            f"The runs come from {len(found)} code revisions ({listing}). Retrain the runs of the other revisions "
            "(delete their folders and run `python -m experiments.run` again), or pass --allow-mixed-revisions to "
            "report them anyway, each model marked with its revision."
        )


# ---------------------------------------------------------------------------------------------------------------------
# The study
# ---------------------------------------------------------------------------------------------------------------------
def collect(output_root: Path) -> dict:
    """Every variant of the study with its finished seeds (runs still missing are listed, not fatal)."""
    study = read_study(output_root)
    variants: dict[str, dict] = {}
    for entry in study["runs"]:
        variant = variants.setdefault(entry["variant"], {
            "name": entry["variant"], "kind": entry["kind"], "description": entry["description"],
            "recipe": entry["recipe"], "runs": {}, "missing": [],
        })  # fmt: skip
        folder = Path(output_root) / entry["folder"]
        if (folder / "metrics.json").is_file():
            variant["runs"][entry["seed"]] = load_run(folder)
        else:
            variant["missing"].append(entry["seed"])
    order = {kind: index for index, kind in enumerate(KINDS)}
    ordered = sorted(variants.values(), key=lambda v: order[v["kind"]])  # stable: the study's order within a kind
    return {"mode": study["mode"], "dataset": study["dataset"], "jobs": study.get("jobs", 1),
            "cpu_count": study.get("cpu_count"), "variants": {v["name"]: v for v in ordered},
            "boundary_scorer": one_boundary_scorer(ordered)}  # fmt: skip


def table_run(row: dict, source: str) -> dict:
    """A run as the report reads it, from its row of a results table (`experiments/table.py`)."""
    provenance = {"git_commit": row["git_commit"] or None, "git_dirty": row["git_dirty"],
                  "package_version": row["package_version"] or None, "torch_version": row["torch_version"] or None,
                  "recipe_sha256": row["recipe_sha256"] or None}  # fmt: skip
    return {
        "folder": source, "metrics": table.metric_columns(row), "tasks": row["tasks"].split(";"),
        "model_type": row["model_type"], "provenance": provenance, "revision": revision_of(provenance),
        "short_revision": short_revision(provenance), "cpu_seconds": row["cpu_seconds"],
        "wall_seconds": row["wall_seconds"], "step_seconds": row["step_seconds"],
        "final_training_loss": row["final_training_loss"], "machine": row["machine"] or None,
    }  # fmt: skip


def collect_table(rows: list[dict], mode: str = "full", source: str = "the results table", dataset: str = "",
                  jobs: int = 1, cpu_count: Optional[int] = None) -> dict:  # fmt: skip
    """The study as `collect` gives it, from the rows of a results table alone: every variant of the study's `mode`
    with the seeds that have a row (the planned seeds without one are `missing`)."""
    known = variants_by_name()
    planned: dict[str, list[int]] = {}
    for run in study_runs(mode):
        planned.setdefault(run.variant.name, []).append(run.seed)

    def entry(name: str) -> dict:
        variant = known[name]
        return {"name": name, "kind": variant.kind, "description": variant.description, "recipe": variant.recipe,
                "runs": {}, "missing": []}  # fmt: skip

    variants = {name: entry(name) for name in planned}
    for row in rows:
        name = row["variant"]
        if name not in known:
            raise StudyError(f"{source}: variant {name!r} of seed {row['seed']} is not a variant of the study "
                             f"({', '.join(known)}).")  # fmt: skip
        # a model trained beyond this mode's plan (e.g. by --only) is reported too
        variants.setdefault(name, entry(name))["runs"][row["seed"]] = table_run(
            row, f"{source} ({name} seed {row['seed']})"
        )
    for name, seeds in planned.items():
        variants[name]["missing"] = [seed for seed in seeds if seed not in variants[name]["runs"]]
    order = {kind: index for index, kind in enumerate(KINDS)}
    ordered = sorted(variants.values(), key=lambda v: order[v["kind"]])
    for variant in ordered:
        variant["runs"] = dict(sorted(variant["runs"].items()))
    return {"mode": mode, "dataset": dataset, "jobs": jobs, "cpu_count": cpu_count,
            "variants": {v["name"]: v for v in ordered}, "boundary_scorer": one_boundary_scorer(ordered),
            "planned": planned}  # fmt: skip


def one_boundary_scorer(variants: list[dict]) -> Optional[str]:
    """Compare every model on one boundary scorer: the exact one when every run with boundaries has it, else the
    approximate one, whose keys every run has (the exact keys are then dropped from the runs' metrics). Returns
    "exact", "approximate", or None without a boundary task."""
    runs = [run for variant in variants for run in variant["runs"].values() if "edge" in run["tasks"]]
    if not runs:
        return None
    if all(PRIMARY_METRICS["edge"][0] in run["metrics"] for run in runs):
        return "exact"
    for run in runs:
        run["metrics"] = {k: v for k, v in run["metrics"].items() if not k.startswith("edge/") or k.endswith("_approx")}
    return "approximate"


def primary_key(task: str, metrics: dict) -> str:
    """The primary metric of a task as reported (boundary odsF from the approximate scorer when the exact one is absent)."""
    key = PRIMARY_METRICS[task][0]
    return (
        APPROXIMATE_EDGE_METRIC if task == "edge" and key not in metrics and APPROXIMATE_EDGE_METRIC in metrics else key
    )


def higher_is_better(task: str) -> bool:
    return PRIMARY_METRICS[task][1]


def mean_std(values: list[float]) -> tuple[float, Optional[float]]:
    """Mean and sample standard deviation (None for a single value)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def single_task_runs(collected: dict) -> dict[str, dict[int, dict]]:
    """Task -> seed -> the run of that task's single-task model."""
    found = {}
    for variant in collected["variants"].values():
        if variant["kind"] == "single-task":
            for seed, run in variant["runs"].items():
                if len(run["tasks"]) != 1:
                    raise StudyError(f"{run['folder']}: a single-task model must have one task, it has {run['tasks']}.")
                found.setdefault(run["tasks"][0], {})[seed] = run
    return found


def single_task_baselines(collected: dict) -> dict[str, float]:
    """Mean over seeds of every metric of the single-task models (each holds the metrics of its one task)."""
    baselines = {}
    for runs in single_task_runs(collected).values():
        runs = list(runs.values())
        for key in runs[0]["metrics"]:
            values = [run["metrics"][key] for run in runs if isinstance(run["metrics"].get(key), (int, float))]
            if values and len(values) == len(runs):
                baselines[key] = statistics.fmean(values)
    return baselines


def delta_m_of(run: dict, baselines: dict, excluded: tuple[str, ...] = ()) -> Optional[float]:
    """Δm of one multi-task run over its tasks but `excluded`; None when a task has no single-task reference (or
    none is left)."""
    tasks = [task for task in run["tasks"] if task not in excluded]
    if not tasks or not all(primary_key(task, run["metrics"]) in baselines for task in tasks):
        return None
    return compute_delta_m(run["metrics"], baselines, tasks=tasks)


def same_seed_delta_m(
    run: dict, seed: int, singles: dict[str, dict[int, dict]], excluded: tuple[str, ...] = ()
) -> Optional[float]:
    """Δm of a multi-task run against the single-task models of the same seed (None when one is missing)."""
    tasks = [task for task in run["tasks"] if task not in excluded]
    if not all(seed in singles.get(task, {}) for task in tasks):
        return None
    baselines = {}
    for task in tasks:
        baselines.update(singles[task][seed]["metrics"])
    return delta_m_of(run, baselines, excluded)


def aggregate(collected: dict) -> dict:
    """Per variant: mean ± std over seeds of every metric, Δm per seed (against the seed-mean of the single-task
    models, and against the single-task models of the same seed) and its mean ± std, the step time, the revision."""
    baselines = single_task_baselines(collected)
    singles = single_task_runs(collected)
    summary = {}
    for name, variant in collected["variants"].items():
        runs = variant["runs"]
        if not runs:
            summary[name] = {"seeds": [], "missing": variant["missing"], "metrics": {}}
            continue
        first = next(iter(runs.values()))
        metric_keys = [k for k, v in first["metrics"].items() if isinstance(v, (int, float)) and "/IoU/" not in k]
        missing_keys = [(seed, k) for seed, run in runs.items() for k in metric_keys if k not in run["metrics"]]
        if missing_keys:
            seed, key = missing_keys[0]
            raise StudyError(f"{runs[seed]['folder']}: no {key!r}, which the other seeds of {name} have.")
        metrics = {key: mean_std([run["metrics"][key] for run in runs.values()]) for key in sorted(metric_keys)}
        entry = {"seeds": sorted(runs), "missing": variant["missing"], "tasks": first["tasks"], "metrics": metrics,
                 "primary": {task: primary_key(task, first["metrics"]) for task in first["tasks"]},
                 "revisions": sorted({run["revision"] for run in runs.values()}),
                 "recipe_sha256": {seed: (run.get("provenance") or {}).get("recipe_sha256") for seed, run in sorted(runs.items())}}  # fmt: skip
        times = [run["step_seconds"] for run in runs.values() if run["step_seconds"] is not None]
        entry["step_seconds"] = mean_std(times) if times else None
        cpu = [run["cpu_seconds"] for run in runs.values() if run["cpu_seconds"] is not None]
        entry["cpu_seconds"] = mean_std(cpu) if cpu else None
        if variant["kind"] != "single-task":
            deltas = {seed: delta_m_of(run, baselines) for seed, run in sorted(runs.items())}
            entry["delta_m_per_seed"] = deltas
            entry["delta_m"] = mean_std(list(deltas.values())) if deltas and None not in deltas.values() else None
            entry["delta_m_same_seed"] = {
                seed: same_seed_delta_m(run, seed, singles) for seed, run in sorted(runs.items())
            }
            same_seed = list(entry["delta_m_same_seed"].values())
            entry["delta_m_same_seed_mean"] = mean_std(same_seed) if same_seed and None not in same_seed else None
            # The secondary endpoint (experiments/preregistration.md): Δm without the tasks near chance.
            excluded = SECONDARY_EXCLUDED_TASKS
            entry["secondary_delta_m_per_seed"] = {
                seed: delta_m_of(run, baselines, excluded) for seed, run in sorted(runs.items())
            }
            entry["secondary_delta_m_same_seed"] = {
                seed: same_seed_delta_m(run, seed, singles, excluded) for seed, run in sorted(runs.items())
            }
        summary[name] = entry
    return {"baselines": baselines, "variants": summary}


# ---------------------------------------------------------------------------------------------------------------------
# Paired comparisons
# ---------------------------------------------------------------------------------------------------------------------
def _known(values: dict) -> dict:
    return {seed: value for seed, value in values.items() if value is not None}


def endpoint_keys(mode: str) -> tuple[str, str]:
    """The per-seed Δm the comparisons of a study use (primary, secondary): in the full study the pre-registered
    endpoint, Δm against the single-task models of the same seed; in the pilot and the quick mode, whose single-task
    models train one seed or few, Δm against their seed mean."""
    if mode == "full":
        return "delta_m_same_seed", "secondary_delta_m_same_seed"
    return "delta_m_per_seed", "secondary_delta_m_per_seed"


def compare(comparison: Comparison, collected: dict, summary: dict) -> Optional[dict]:
    """The paired differences of one comparison: Δm, and each task's primary metric (signed so that positive means the
    variant is better), with their t intervals and the verdict on Δm. None when a model of it was not trained."""
    variants = collected["variants"]
    if comparison.variant not in variants or not variants[comparison.variant]["runs"]:
        return None
    runs = variants[comparison.variant]["runs"]
    tasks = summary["variants"][comparison.variant]["tasks"]
    if comparison.reference == SINGLE_TASK:
        singles = single_task_runs(collected)
        if not all(task in singles for task in tasks):
            return None
        entry = summary["variants"][comparison.variant]
        delta_m = paired.compare(_known(entry["delta_m_same_seed"]), {seed: 0.0 for seed in runs})
        secondary = paired.compare(_known(entry["secondary_delta_m_same_seed"]), {seed: 0.0 for seed in runs})
        references = {task: singles[task] for task in tasks}
    else:
        if comparison.reference not in variants or not variants[comparison.reference]["runs"]:
            return None
        reference_runs = variants[comparison.reference]["runs"]
        entry, reference_entry = summary["variants"][comparison.variant], summary["variants"][comparison.reference]
        key, secondary_key = endpoint_keys(collected["mode"])
        delta_m = paired.compare(_known(entry.get(key, {})), _known(reference_entry.get(key, {})))
        secondary = paired.compare(_known(entry.get(secondary_key, {})), _known(reference_entry.get(secondary_key, {})))
        reference_tasks = summary["variants"][comparison.reference]["tasks"]
        tasks = [task for task in tasks if task in reference_tasks]
        references = {task: reference_runs for task in tasks}
    per_task = {}
    for task in tasks:
        key = primary_key(task, next(iter(runs.values()))["metrics"])
        sign = 1.0 if higher_is_better(task) else -1.0
        values = {seed: run["metrics"][key] for seed, run in runs.items()}
        reference_values = {
            seed: run["metrics"][key] for seed, run in references[task].items() if key in run["metrics"]
        }
        difference = paired.compare(values, reference_values, sign)
        if difference is not None:
            per_task[task] = {"metric": key, "higher_is_better": higher_is_better(task), "difference": difference}
    compared = list(runs.values()) + [run for task_runs in references.values() for run in task_runs.values()]
    return {"comparison": comparison, "delta_m": delta_m, "secondary_delta_m": secondary, "per_task": per_task,
            "verdict": delta_m.verdict() if (delta_m is not None and comparison.claim) else None,
            "revisions": sorted({run["short_revision"] for run in compared})}  # fmt: skip


def claim_complete(result: dict) -> bool:
    """Whether a claim of the full study has every seed the plan gives it (`study.PLAN_CLAIM_SEEDS`)."""
    difference = result["delta_m"]
    return difference is not None and difference.n >= PLAN_CLAIM_SEEDS[result["comparison"].name]


def comparisons(collected: dict, summary: dict) -> list[dict]:
    """Every comparison of the study whose two models were trained. The claims with enough seeds are one family:
    their verdicts use Holm-adjusted p-values (`adjusted_p`, `family_size`), so that the chance of any false verdict
    among them stays at most 5 %. In the full study (the pre-registered plan) the family is formed only once every
    claim has all its planned seeds: until then each claim's verdict is `paired.INTERIM`."""
    full = collected["mode"] == "full"
    results = []
    for comparison in COMPARISONS:
        result = compare(comparison, collected, summary)
        if result is None and full and comparison.claim:  # every claim of the plan is on the page, run or not yet
            result = {"comparison": comparison, "delta_m": None, "secondary_delta_m": None, "per_task": {},
                      "verdict": None, "revisions": []}  # fmt: skip
        if result is not None:
            results.append(result)
    claims = [result for result in results if result["comparison"].claim]
    if full and not all(claim_complete(result) for result in claims):
        for result in claims:
            result["verdict"] = paired.INTERIM
        return results
    family = {
        r["comparison"].name: r
        for r in results
        if r["verdict"] not in (None, paired.TOO_FEW_SEEDS) and r["delta_m"].p_value is not None
    }
    adjusted = paired.holm_adjusted({name: r["delta_m"].p_value for name, r in family.items()})
    for name, result in family.items():
        result["adjusted_p"], result["family_size"] = adjusted[name], len(family)
        result["verdict"] = result["delta_m"].verdict(adjusted_p=adjusted[name])
    return results


def comparisons_to_json(results: list[dict]) -> list[dict]:
    return [{
        "name": r["comparison"].name, "variant": r["comparison"].variant, "reference": r["comparison"].reference,
        "claim": r["comparison"].claim, "verdict": r["verdict"], "revisions": r["revisions"],
        "adjusted_p": r.get("adjusted_p"), "family_size": r.get("family_size"),
        "delta_m": r["delta_m"].to_dict() if r["delta_m"] else None,
        "secondary_delta_m": r["secondary_delta_m"].to_dict() if r["secondary_delta_m"] else None,
        "per_task": {task: {"metric": v["metric"], "higher_is_better": v["higher_is_better"], **v["difference"].to_dict()}
                     for task, v in r["per_task"].items()},
    } for r in results]  # fmt: skip


def final_training_loss(log: list[dict]) -> Optional[float]:
    """The training loss of a run's last logged window (None without one)."""
    losses = [r["loss"] for r in log if r.get("kind") == "train" and "loss" in r]
    return float(losses[-1]) if losses else None


def best_run(collected: dict, summary: dict, variant: str = "taskexpert") -> Optional[dict]:
    """{"seed", "delta_m", "training_loss", "run"} of the seed of `variant` copied for the Space: the one with the
    lowest final training loss. The choice reads no validation number, so the reported (validation) metrics do not
    select the model they describe; None when no seed logged a training loss."""
    runs = collected["variants"].get(variant, {}).get("runs") or {}
    losses = {seed: loss for seed, run in runs.items() if (loss := run.get("final_training_loss")) is not None}
    if not losses:
        return None
    seed = min(losses, key=lambda s: (losses[s], s))
    delta_m = (summary["variants"].get(variant, {}).get(endpoint_keys(collected["mode"])[0]) or {}).get(seed)
    return {"seed": seed, "delta_m": delta_m, "training_loss": losses[seed], "run": runs[seed]}
