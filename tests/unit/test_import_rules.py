"""The import rules of docs/design.md, read from the code (every import, function-level ones included): no circle;
no shared module names a recipe's module (they ask the recipe table); the table imports nothing of the package and
no torch; nothing on a rank imports the launcher."""
import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = "finetune_launcher"
ROOT = Path(__file__).resolve().parents[2]
RANK_SIDE = ("loop", "task", "lm_task", "rank", "engines", "checkpoint", "history", "schedule", "guards",
             "distributed", "data", "models")


def modules():
    found = {}
    for path in (ROOT / PACKAGE).rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def imports():
    """{module: {imported module of the package}}, each `from a import b` counted as a.b where that is a module."""
    known = modules()

    def owner(name):
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in known.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {owner(alias.name) for alias in node.names if alias.name.startswith(PACKAGE)}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(PACKAGE):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    targets.add(full if full in known else owner(node.module))
        graph[name] = {t for t in targets if t and t != name}
    return graph


def cycles(graph):
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return found


def is_recipe_module(name):
    return name.startswith(f"{PACKAGE}.recipes.") and name.count(".") >= 3


def test_no_import_circle_not_even_through_function_level_imports():
    assert cycles(imports()) == []


def test_shared_modules_reach_a_recipe_only_through_the_recipe_table():
    offenders = {name: sorted(t for t in targets if is_recipe_module(t))
                 for name, targets in imports().items() if not name.startswith(f"{PACKAGE}.recipes")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_recipe_table_imports_nothing_of_the_package_and_no_torch():
    assert imports()[f"{PACKAGE}.recipe_table"] == set()
    code = f"import sys, {PACKAGE}.recipe_table as t; t.names(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"


def test_nothing_on_a_rank_imports_the_launcher():
    rank = {name: targets for name, targets in imports().items()
            if any(name == f"{PACKAGE}.{part}" or name.startswith(f"{PACKAGE}.{part}.") for part in RANK_SIDE)}
    offenders = {name: sorted(t for t in targets if t.startswith(f"{PACKAGE}.launch"))
                 for name, targets in rank.items()}
    assert {k: v for k, v in offenders.items() if v} == {}
