"""The shape of the code (docs/architecture.md): no import circle among the project's modules, the model files (the
Hub remote code) import only each other, and train.py stays a readable top-to-bottom script."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("modeling_taskexpert", "experiments", "bench", "space_app")


def module_files() -> dict[str, Path]:
    """Every project module by dotted name (`space_app` and `bench` files also import each other by bare name)."""
    modules = {"train": REPO / "train.py"}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `name` imports at module level or inside functions (both can close a circle)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            # `space_app` and `bench` run as scripts whose folder is on the path: `import rendering` is theirs.
            for candidate in (target, f"space_app.{target}", f"bench.{target}"):
                if candidate in modules and candidate != name:
                    found.add(candidate)
                    break
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]):
    """One import circle as a list of modules, or None (a package importing its own submodules is not one)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if target.startswith(node + "."):  # a package's __init__ importing its submodules
                continue
            if state.get(target) == 1 and not node.startswith(target + "."):
                return stack[stack.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_sees_known_imports():
    """The checker itself: it finds imports of each form the project uses (else 'no circle' would mean nothing)."""
    graph = import_graph()
    assert "modeling_taskexpert.dense_model_utils" in graph["modeling_taskexpert.modeling_taskexpert"]  # relative
    assert "modeling_taskexpert.training.run" in graph["train"]  # absolute, from-import
    assert "space_app.model_loading" in graph["space_app.app"]  # a script's bare sibling import
    assert "bench.formatting" in graph["bench.report"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"p": {"p.x"}, "p.x": {"p.y"}, "p.y": set()}) is None


def test_no_import_circle_among_the_project_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_model_files_import_only_model_files():
    """The flat model files are the remote code a checkpoint ships: they never import data/, evaluation/, training/,
    export/ or anything outside the package."""
    graph = import_graph()
    flat = {name for name, path in module_files().items() if path.parent == REPO / "modeling_taskexpert"}
    registry = {"modeling_taskexpert", "modeling_taskexpert.model_types", "modeling_taskexpert.loading"}
    for name in sorted(flat - registry):
        outside = sorted(target for target in graph[name] if target not in flat)
        assert not outside, f"{name} imports {outside}"


@pytest.mark.parametrize("function, limit", [("main", 100)])
def test_train_main_reads_top_to_bottom(function, limit):
    tree = ast.parse((REPO / "train.py").read_text())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function)
    assert node.end_lineno - node.lineno + 1 <= limit
