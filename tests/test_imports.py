"""The project's modules import one another in one direction only (no import circle, lazy imports included)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def project_modules():
    """{module name: path} of every .py file of the project outside tests/ and the venv."""
    mods = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("tests", ".venv", "pretrained_models", "data", "logs", "checkpoints") or rel.parts[0].startswith("."):
            continue
        name = ".".join(rel.with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = path
    return mods


def import_graph():
    mods = project_modules()
    graph = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for t in targets:
                if t in mods and t != name:
                    deps.add(t)
        graph[name] = deps
    return graph


def find_cycle(graph):
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for d in sorted(graph[n]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                cycle = visit(d)
                if cycle:
                    return cycle
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            cycle = visit(n)
            if cycle:
                return cycle
    return None


def test_the_graph_sees_the_known_edges():
    graph = import_graph()
    assert "utils_io" in graph["utils_data"] and "evaluation.stage" in graph["utils_train"]
    assert "evaluation.sandbox" in graph["evaluation.code_score"]


def test_no_import_circle_among_project_modules():
    assert find_cycle(import_graph()) is None


def test_find_cycle_detects_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_config_and_evaluation_do_not_reach_back():
    graph = import_graph()
    assert graph["configs.base_config"] <= {"utils_io"}
    assert graph["utils_io"] == set()
    for name, deps in graph.items():
        if name.startswith("evaluation"):
            assert "utils_train" not in deps and "utils_eval" not in deps, name
