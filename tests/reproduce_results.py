"""Recompute the numbers of the study's page from its committed data alone, with arithmetic of its own.

    python tests/reproduce_results.py            # docs/results.md against experiments/results/*
    python tests/reproduce_results.py --table T --page P --measurements M --plan experiments/preregistration.md

Independent of `experiments/` and of the package on purpose: it reads the table with the `csv` module, defines the
primary metrics from the benchmark protocol, computes Δm, the paired t intervals and p-values (scipy's t
distribution), the exact sign-flip test (by enumerating the sign patterns), Holm's adjustment and the power of the
paired t-test (scipy's noncentral t), then parses the page and compares every number it prints from the table (claims,
other comparisons, per-task differences, power, overview, metrics per task, the claim sentences, the best checkpoint)
with the recomputed value, to the page's precision. The numbers measured on the trained models (parameters, FLOPs,
routing, pairing) are compared with the measurements file. The GPU guide (estimates of recipes not run here) is not
checked. Exit status 1 and a list of the differences when anything disagrees.
"""

import argparse
import csv
import itertools
import json
import math
import re
import statistics
import sys
from pathlib import Path

from scipy import optimize, stats

ROOT = Path(__file__).resolve().parents[1]
# Primary metric of every task and whether higher is better (docs/benchmark protocol; the boundary's exact odsF).
PRIMARY = {"semseg": ("semseg/mIoU", True), "human_parts": ("human_parts/mIoU", True),
           "saliency": ("saliency/maxF", True), "normals": ("normals/mean", False), "edge": ("edge/odsF", True),
           "depth": ("depth/RMSE", False)}  # fmt: skip
APPROXIMATE_EDGE = "edge/odsF_approx"
SECONDARY_EXCLUDED = ("human_parts",)
RUN_COLUMNS = {"variant", "kind", "seed", "tasks", "model_type", "git_commit", "git_dirty", "package_version",
               "torch_version", "recipe_sha256", "machine", "cpu_seconds", "wall_seconds", "step_seconds",
               "final_training_loss"}  # fmt: skip
NUMBER = r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?"


class Checker:
    def __init__(self):
        self.errors: list[str] = []
        self.checked = 0

    def number(self, where: str, printed: str, expected: float, slack: float = 1e-6) -> None:
        """`printed` (as the page shows it) equals `expected` to the printed precision."""
        self.checked += 1
        printed = printed.strip()
        if expected is None or (isinstance(expected, float) and math.isnan(expected)):
            if printed != "n/a":
                self.errors.append(f"{where}: page {printed!r}, recomputed: none")
            return
        try:
            value = float(printed)
        except ValueError:
            self.errors.append(f"{where}: page {printed!r} is not a number (recomputed {expected:.6g})")
            return
        mantissa = printed.lower().split("e")[0]
        decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
        exponent = int(printed.lower().split("e")[1]) if "e" in printed.lower() else 0
        tolerance = 0.5 * 10 ** (exponent - decimals) + slack
        if abs(value - expected) > tolerance:
            self.errors.append(f"{where}: page {printed}, recomputed {expected:.6g}")

    def text(self, where: str, printed: str, expected: str) -> None:
        self.checked += 1
        if printed.strip() != expected:
            self.errors.append(f"{where}: page {printed.strip()!r}, expected {expected!r}")


# ---------------------------------------------------------------------------------------------------------------------
# The table and the arithmetic
# ---------------------------------------------------------------------------------------------------------------------
def read_rows(path: Path) -> list[dict]:
    rows = []
    with open(path, newline="") as handle:
        for cells in csv.DictReader(handle):
            row = {}
            for column, text in cells.items():
                if column in ("variant", "kind", "tasks", "model_type", "git_commit", "git_dirty", "package_version",
                              "torch_version", "recipe_sha256", "machine"):  # fmt: skip
                    row[column] = text
                elif column == "seed":
                    row[column] = int(text)
                elif text != "":
                    row[column] = float(text)
            row["tasks"] = row["tasks"].split(";")
            rows.append(row)
    return rows


def primary_key(task: str, rows: list[dict]) -> str:
    key = PRIMARY[task][0]
    if task == "edge" and not all(key in row for row in rows if "edge" in row["tasks"]):
        return APPROXIMATE_EDGE
    return key


def delta_m(row: dict, baseline: dict, tasks: list[str], keys: dict) -> float:
    total = 0.0
    for task in tasks:
        key, higher = keys[task], PRIMARY[task][1]
        total += (1 if higher else -1) * (row[key] - baseline[key]) / baseline[key]
    return 100 * total / len(tasks)


def t_stats(values: list[float]) -> dict:
    n = len(values)
    mean = sum(values) / n
    # The exact sign-flip test: the share of the 2^n sign patterns whose sum is at least as far from 0 as observed.
    observed = abs(sum(values))
    tolerance = 1e-12 * max(1.0, sum(abs(v) for v in values))
    patterns = list(itertools.product((1, -1), repeat=n))
    extreme = sum(abs(sum(s * abs(v) for s, v in zip(signs, values))) >= observed - tolerance for signs in patterns)
    flip = extreme / len(patterns)
    if n < 2:
        return {"n": n, "mean": mean, "sd": None, "low": None, "high": None, "p": None, "flip": flip}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    p = (0.0 if mean != 0 else 1.0) if sd == 0 else 2 * stats.t.sf(abs(mean) / (sd / math.sqrt(n)), n - 1)
    return {"n": n, "mean": mean, "sd": sd, "low": mean - half, "high": mean + half, "p": p, "flip": flip}


def holm(p_values: dict) -> dict:
    ordered = sorted(p_values, key=p_values.get)
    adjusted, running = {}, 0.0
    for rank, name in enumerate(ordered):
        running = max(running, min(1.0, (len(ordered) - rank) * p_values[name]))
        adjusted[name] = running
    return adjusted


def t_power(n: int, sigma: float, difference: float, alpha: float) -> float:
    df, critical = n - 1, stats.t.ppf(1 - alpha / 2, n - 1)
    shift = difference * math.sqrt(n) / sigma
    # P(T > c) + P(T < -c) for T noncentral t with shift λ; the second as P(T' > c) with shift -λ (by symmetry),
    # which scipy keeps finite where its cdf at -c gives NaN for a large λ.
    return stats.nct.sf(critical, df, shift) + stats.nct.sf(critical, df, -shift)


def resolved_difference(n: int, sigma: float, alpha: float, target: float = 0.8) -> float:
    high = sigma
    while t_power(n, sigma, high, alpha) < target:
        high *= 2
    return optimize.brentq(lambda d: t_power(n, sigma, d, alpha) - target, 0.0, high)


class Study:
    """The table's runs and what follows from them: per-seed Δm (same-seed references), paired comparisons."""

    def __init__(self, rows: list[dict]):
        self.rows = rows
        self.runs: dict[str, dict[int, dict]] = {}
        for row in rows:
            self.runs.setdefault(row["variant"], {})[row["seed"]] = row
        self.keys = {task: primary_key(task, rows) for task in PRIMARY}
        self.singles = {task: self.runs.get(f"single-{task}", {}) for task in PRIMARY}

    def same_seed_delta_m(self, variant: str, excluded=()) -> dict[int, float]:
        found = {}
        for seed, row in self.runs.get(variant, {}).items():
            tasks = [t for t in row["tasks"] if t not in excluded]
            if all(seed in self.singles[t] for t in tasks):
                baseline = {self.keys[t]: self.singles[t][seed][self.keys[t]] for t in tasks}
                found[seed] = delta_m(row, baseline, tasks, self.keys)
        return found

    def paired(self, variant: str, reference: str, excluded=()) -> dict:
        mine = self.same_seed_delta_m(variant, excluded)
        if reference == "single-task models":
            values = [mine[s] for s in sorted(mine)]
        else:
            other = self.same_seed_delta_m(reference, excluded)
            values = [mine[s] - other[s] for s in sorted(mine.keys() & other.keys())]
        return t_stats(values) if values else None

    def per_task(self, variant: str, reference: str, task: str) -> dict:
        key, higher = self.keys[task], PRIMARY[task][1]
        sign = 1 if higher else -1
        mine = self.runs.get(variant, {})
        other = self.singles[task] if reference == "single-task models" else self.runs.get(reference, {})
        values = [sign * (mine[s][key] - other[s][key]) for s in sorted(mine.keys() & other.keys())
                  if key in mine[s] and key in other[s]]  # fmt: skip
        return t_stats(values) if values else None


# ---------------------------------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------------------------------
def markdown_tables(lines: list[str], start: int) -> list[list[str]]:
    """The rows (cells) of the first table at or after line `start`, header included."""
    index = start
    while index < len(lines) and not lines[index].startswith("|"):
        index += 1
    rows = []
    while index < len(lines) and lines[index].startswith("|"):
        if not lines[index].startswith("|---"):
            rows.append([cell.strip() for cell in lines[index].strip().strip("|").split("|")])
        index += 1
    return rows


def section(lines: list[str], heading: str) -> int:
    for index, line in enumerate(lines):
        if line.strip() == heading:
            return index
    raise SystemExit(f"The page has no section {heading!r}.")


def check_interval(check: Checker, where: str, cell: str, result: dict) -> None:
    if result is None:
        check.text(where, cell, "n/a")
        return
    match = re.fullmatch(rf"({NUMBER}) (?:\[({NUMBER}), ({NUMBER})\]|\(one seed\))", cell)
    if not match:
        check.errors.append(f"{where}: cannot read the interval {cell!r}")
        return
    check.number(where + " mean", match.group(1), result["mean"])
    if match.group(2) is not None:
        check.number(where + " low", match.group(2), result["low"])
        check.number(where + " high", match.group(3), result["high"])
    elif result["n"] != 1:
        check.errors.append(f"{where}: one seed on the page, {result['n']} recomputed")


def check_mean_std(check: Checker, where: str, cell: str, values: list[float]) -> None:
    parts = cell.split(" ± ")
    check.number(where + " mean", parts[0], statistics.fmean(values))
    if len(values) > 1:
        if len(parts) != 2:
            check.errors.append(f"{where}: no standard deviation on the page for {len(values)} values")
        else:
            check.number(where + " std", parts[1], statistics.stdev(values))


def plan_numbers(plan_text: str) -> tuple[dict, dict, int]:
    """(claim -> (variant, reference), claim -> planned seeds, planned runs) as the pre-registered plan states them."""
    pairs = {m.group(1): (m.group(2), m.group(3) or "single-task models")
             for m in re.finditer(r"^\| ([a-z-]+) \| `([a-z-]+)` \| (?:`([a-z-]+)`|the single-task models) \|",
                                  plan_text, re.M)}  # fmt: skip
    seeds = {m.group(1): int(m.group(2))
             for m in re.finditer(r"^\| ([a-z-]+) \| [\d.]+ \| \d+ \| (\d+) \|", plan_text, re.M)}  # fmt: skip
    runs = int(re.search(r"the plan's (\d+) runs", plan_text).group(1))
    return pairs, seeds, runs


def reproduce(table: Path, page: Path, measurements: Path, plan: Path) -> Checker:
    check = Checker()
    rows = read_rows(table)
    study = Study(rows)
    lines = page.read_text().splitlines()
    text = page.read_text()
    pairs, planned_seeds, planned_runs = plan_numbers(plan.read_text())
    measured = json.loads(measurements.read_text()) if measurements.is_file() else {}

    # The claims: the plan's five, each with its pair, interval, seeds, p-values, verdict and secondary Δm.
    claim_rows = markdown_tables(lines, section(lines, "## The paper's claims on this benchmark"))[1:]
    by_pair = {pair: name for name, pair in pairs.items()}
    results = {}
    for cells in claim_rows:
        variant, reference = cells[1].split(" − ")
        name = by_pair.get((variant, reference))
        if name is None:
            check.errors.append(f"claims table: {cells[1]} is not a pair of the plan")
            continue
        results[name] = (cells, study.paired(variant, reference), study.paired(variant, reference, SECONDARY_EXCLUDED))
    complete = len(results) == len(pairs) and all(r[1] and r[1]["n"] >= planned_seeds[n] for n, r in results.items())
    adjusted = holm({name: r[1]["p"] for name, r in results.items()}) if complete else {}
    for name, (cells, result, secondary) in results.items():
        where = f"claim {name}"
        check_interval(check, where, cells[2], result)
        check.text(where + " seeds", cells[3], f"{result['n'] if result else 0} of {planned_seeds[name]}")
        check.number(where + " p", cells[4], result["p"] if result else None)
        check.number(where + " Holm p", cells[5], adjusted.get(name))
        check.number(where + " sign-flip p", cells[6], result["flip"] if result else None)
        if not complete:
            expected = "interim: no verdict before every planned seed"
        elif adjusted[name] < 0.05:
            expected = "holds" if result["mean"] > 0 else "fails"
        else:
            expected = "inconclusive"
        check.text(where + " verdict", cells[7], expected)
        check_interval(check, where + " without human parts", cells[8], secondary)
        # Its sentence in the notes: the same numbers.
        if result is None:
            check.text(
                where + " sentence", str(f"- **{cells[0]}**: not assessed (Δm is not available)." in lines), "True"
            )
            continue
        sentence = next((line for line in lines if line.startswith(f"- **{cells[0]}:")), None)
        if sentence is None:
            check.errors.append(f"{where}: no sentence in the notes")
            continue
        numbers = re.search(
            rf"\(({NUMBER}) points(?:, 95 % interval ({NUMBER}) to ({NUMBER}))?, (\d+) seeds?", sentence
        )
        check.number(where + " sentence mean", numbers.group(1), result["mean"])
        if numbers.group(2):
            check.number(where + " sentence low", numbers.group(2), result["low"])
            check.number(where + " sentence high", numbers.group(3), result["high"])
        check.text(where + " sentence seeds", numbers.group(4), str(result["n"]))
        p = re.search(rf"; p = ({NUMBER})", sentence)
        if p:
            check.number(where + " sentence p", p.group(1), result["p"])
        holm_text = re.search(rf"Holm-adjusted over (\d+) claims ({NUMBER})", sentence)
        if holm_text or adjusted:
            check.number(where + " sentence Holm p", holm_text.group(2) if holm_text else "n/a", adjusted.get(name))
        flip = re.search(rf"sign-flip test p = ({NUMBER})", sentence)
        if flip:
            check.number(where + " sentence sign-flip p", flip.group(1), result["flip"])
        bounds = re.search(rf"rules out effects above ({NUMBER}) and below ({NUMBER})", sentence)
        if bounds:
            check.number(where + " sentence upper bound", bounds.group(1), result["high"])
            check.number(where + " sentence lower bound", bounds.group(2), result["low"])
        without = re.search(
            rf"\(secondary, no verdict\): ({NUMBER} (?:\[{NUMBER}, {NUMBER}\]|\(one seed\))|n/a)", sentence
        )
        if secondary is not None:
            check_interval(check, where + " sentence without human parts", without.group(1).strip(), secondary)
    if sorted(results) != sorted(pairs):
        check.errors.append(f"claims table: {sorted(results)}, the plan has {sorted(pairs)}")

    # Other comparisons and the per-task differences.
    start = next((i for i, line in enumerate(lines) if line.startswith("Other paired comparisons")), None)
    if start is not None:
        for cells in markdown_tables(lines, start)[1:]:
            variant, reference = cells[0].split(" − ")
            result = study.paired(variant, reference)
            check_interval(check, f"comparison {cells[0]}", cells[1], result)
            check.text(f"comparison {cells[0]} seeds", cells[2], str(result["n"] if result else 0))
    start = next(i for i, line in enumerate(lines) if line.startswith("Per task: paired difference"))
    table_rows = markdown_tables(lines, start)
    tasks = [cell.split(" ")[0] for cell in table_rows[0][1:]]
    for cells in table_rows[1:]:
        variant, reference = cells[0].split(" − ")
        for task, cell in zip(tasks, cells[1:]):
            if cell != "—":
                check_interval(check, f"per task {cells[0]} {task}", cell, study.per_task(variant, reference, task))

    # Power, claim by claim, and what remains to run.
    alpha = 0.05 / len(pairs)
    for cells in markdown_tables(lines, section(lines, "## Power and the study plan"))[1:]:
        name, result = cells[0], results[cells[0]][1]
        check.number(f"power {name} sigma", cells[1], result["sd"])
        check.text(f"power {name} seeds", cells[2], f"{result['n']} of {planned_seeds[name]}")
        check.number(f"power {name} resolved", cells[3], resolved_difference(result["n"], result["sd"], alpha), 1e-4)
        check.number(f"power {name} at 2 points", cells[4], t_power(result["n"], result["sd"], 2.0, alpha), 1e-4)
    remaining = re.search(
        rf"Still to run: (\d+) runs of the plan, about ({NUMBER}) CPU-hours .*?\(({NUMBER}) min\)", text
    )
    if len(rows) < planned_runs:
        cpu = [row["cpu_seconds"] for row in rows if "cpu_seconds" in row]
        check.text("runs still to run", remaining.group(1), str(planned_runs - len(rows)))
        check.number(
            "CPU-hours still to run", remaining.group(2), (planned_runs - len(rows)) * statistics.fmean(cpu) / 3600
        )
        check.number("mean CPU minutes per run", remaining.group(3), statistics.fmean(cpu) / 60)
        interim = re.search(r"INTERIM — (\d+) of the plan's (\d+) runs", text)
        check.text("runs in the table", interim.group(1), str(len(rows)))
        check.text("runs of the plan", interim.group(2), str(planned_runs))

    # Overview: seeds, cost, step and CPU time, Δm (same-seed references).
    for cells in markdown_tables(lines, section(lines, "## Overview"))[1:]:
        name = cells[0].split(" (")[0]
        runs = study.runs.get(name, {})
        check.text(f"overview {name} seeds", cells[2], str(len(runs)))
        cost = measured.get("costs", {}).get(name)
        if cost:
            check.number(f"overview {name} parameters", cells[3], cost["parameters"] / 1e6)
            check.number(f"overview {name} GFLOPs", cells[4], cost["flops"] / 1e9)
        steps = [row["step_seconds"] for row in runs.values() if "step_seconds" in row]
        if steps:
            check_mean_std(check, f"overview {name} s/step", cells[5], steps)
        cpu = [row["cpu_seconds"] / 60 for row in runs.values() if "cpu_seconds" in row]
        if cpu:
            check_mean_std(check, f"overview {name} CPU minutes", cells[6], cpu)
        if cells[7] != "reference":
            values = study.same_seed_delta_m(name)
            if len(values) == len(runs):
                check_mean_std(check, f"overview {name} Δm", cells[7], list(values.values()))
            else:
                check.text(f"overview {name} Δm", cells[7], "n/a")

    # Metrics per task: mean ± standard deviation over seeds of every metric column.
    for task in PRIMARY:
        heading = f"### {task}"
        if heading not in lines:
            continue
        table_rows = markdown_tables(lines, section(lines, heading))
        keys = [cell.strip("*") for cell in table_rows[0][1:]]
        for cells in table_rows[1:]:
            runs = study.runs[cells[0]]
            for key, cell in zip(keys, cells[1:]):
                check_mean_std(check, f"{cells[0]} {key}", cell, [row[key] for row in runs.values()])

    # Routing tables, from the measurements.
    for name, usage in measured.get("usage", {}).items():
        table_rows = markdown_tables(lines, section(lines, f"### {name}"))
        for cells in table_rows[1:]:
            weights_per_layer = usage["tasks"][cells[0]]["mean_weight"]
            for layer, (cell, weights) in enumerate(zip(cells[1:], weights_per_layer)):
                top = max(range(len(weights)), key=lambda i: weights[i])
                match = re.fullmatch(rf"(.+) \(({NUMBER})\)", cell)
                check.text(f"routing {name} {cells[0]} layer {layer}", match.group(1), usage["candidates"][layer][top])
                check.number(f"routing {name} {cells[0]} layer {layer} weight", match.group(2), weights[top])

    # The best checkpoint: the default TaskExpert's seed with the lowest final training loss.
    best = re.search(rf"seed (\d+) \(Δm ({NUMBER}) %, final training loss ({NUMBER}),", text)
    taskexpert = study.runs.get("taskexpert", {})
    if best and taskexpert:
        seed = min(taskexpert, key=lambda s: (taskexpert[s]["final_training_loss"], s))
        check.text("best seed", best.group(1), str(seed))
        check.number("best Δm", best.group(2), study.same_seed_delta_m("taskexpert")[seed])
        check.number("best training loss", best.group(3), taskexpert[seed]["final_training_loss"])
    return check


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", type=Path, default=ROOT / "experiments/results/study-runs.csv")
    parser.add_argument("--page", type=Path, default=ROOT / "docs/results.md")
    parser.add_argument("--measurements", type=Path, default=ROOT / "experiments/results/study-measurements.json")
    parser.add_argument("--plan", type=Path, default=ROOT / "experiments/preregistration.md")
    args = parser.parse_args(argv)
    check = reproduce(args.table, args.page, args.measurements, args.plan)
    for error in check.errors:
        print(error)
    print(f"{check.checked} numbers checked, {len(check.errors)} differ.")
    return 1 if check.errors else 0


if __name__ == "__main__":
    sys.exit(main())
