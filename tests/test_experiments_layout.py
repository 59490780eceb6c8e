"""The experiments layer's shape (issue "One-way layers"), read from the source with ``ast``.

Imports flow one way (config <- problem <- training <- selection <- pipeline <- report/plots
<- run), with no cycle anywhere in ``experiments/`` (imports inside functions included);
run.py is the command line and draws nothing; modules and functions stay short. Each check
is also run on a small synthetic bad case, so that it can fail.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "experiments"
# The pipeline's layers, lowest first; a module may import only from lower layers.
LAYERS = (("config",), ("problem",), ("training",), ("selection",), ("pipeline",),
          ("report", "plots"), ("run",))
MAX_MODULE_LINES, MAX_PIPELINE_LINES, MAX_BODY_LINES = 700, 450, 80


def sources() -> dict:
    return {p.stem: p.read_text() for p in sorted(ROOT.glob("*.py")) if p.stem != "__init__"}


def experiments_imports(source: str) -> set:
    """The ``experiments`` modules a source imports, at any depth (functions included)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "experiments" and len(parts) > 1:
                    found.add(parts[1])
        elif isinstance(node, ast.ImportFrom) and node.module:
            parts = node.module.split(".")
            if parts[0] != "experiments":
                continue
            if len(parts) > 1:
                found.add(parts[1])
            else:  # from experiments import a, b
                found.update(alias.name for alias in node.names)
    return found


def find_cycle(graph: dict) -> list:
    """A cycle of ``graph`` ({module: imported modules}) as a list of modules, or []."""
    state = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt, path + [nxt])
                if cycle:
                    return cycle
        state[node] = 2
        return []

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [start])
            if cycle:
                return cycle
    return []


def upward_imports(graph: dict) -> list:
    """``(module, imported)`` pairs where a layer module imports one of its layer or above."""
    rank = {m: i for i, layer in enumerate(LAYERS) for m in layer}
    return sorted((m, dep) for m, deps in graph.items() if m in rank
                  for dep in deps if dep in rank and rank[dep] >= rank[m] and dep != m)


def body_lines(fn: ast.AST) -> int:
    """Lines of a function's body, without its docstring and nested function definitions."""
    body = fn.body
    if (body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)):
        body = body[1:]
    lines, nested = set(), set()
    for stmt in body:
        lines.update(range(stmt.lineno, stmt.end_lineno + 1))
        for node in ast.walk(stmt):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                nested.update(range(node.lineno, node.end_lineno + 1))
    return len(lines - nested)


def long_functions(source: str, limit: int = MAX_BODY_LINES) -> list:
    return [(node.name, body_lines(node)) for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and body_lines(node) > limit]


def plotting_in(source: str) -> list:
    """What in a source draws: matplotlib imports, plt/matplotlib use, plot_*/fig* defs."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "matplotlib"]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] == "matplotlib":
                found.append(node.module)
        elif isinstance(node, ast.Name) and node.id in ("plt", "matplotlib"):
            found.append(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if node.name.lstrip("_").startswith(("plot", "fig", "write_fig", "draw")):
                found.append(f"def {node.name}")
    return found


def graph_of(srcs: dict) -> dict:
    return {name: experiments_imports(src) & set(srcs) for name, src in srcs.items()}


# ----------------------------------------------------------------------------- the real tree


def test_no_import_cycle_in_experiments():
    assert find_cycle(graph_of(sources())) == []


def test_layers_import_only_downwards():
    srcs = sources()
    assert {m for layer in LAYERS for m in layer} <= set(srcs)
    assert upward_imports(graph_of(srcs)) == []


def test_run_is_the_command_line_only():
    assert plotting_in(sources()["run"]) == []


def test_module_and_function_sizes():
    srcs = sources()
    assert len(srcs["pipeline"].splitlines()) < MAX_PIPELINE_LINES
    assert {n: len(s.splitlines()) for n, s in srcs.items()
            if len(s.splitlines()) >= MAX_MODULE_LINES} == {}
    assert {n: long_functions(s) for n, s in srcs.items() if long_functions(s)} == {}


# ----------------------------------------------------------------------------- the checks fail


def test_cycle_check_finds_a_cycle_through_a_function_level_import():
    bad = {"config": "from experiments import models\n",
           "models": "def f():\n    from experiments.pipeline import run\n",
           "pipeline": "import experiments.config\n"}
    assert find_cycle(graph_of(bad)) == ["config", "models", "pipeline", "config"]
    bad["pipeline"] = "import numpy\n"
    assert find_cycle(graph_of(bad)) == []


def test_layer_check_finds_an_upward_import():
    bad = {"config": "def f():\n    from experiments import pipeline\n", "pipeline": ""}
    assert upward_imports(graph_of(bad)) == [("config", "pipeline")]


def test_plotting_check_finds_figure_code():
    assert plotting_in("import matplotlib.pyplot as plt\n") == ["matplotlib.pyplot"]
    assert plotting_in("def main():\n    from matplotlib import pyplot\n") == ["matplotlib"]
    assert plotting_in("def plot_fig4(cfg):\n    return cfg\n") == ["def plot_fig4"]
    assert plotting_in("from experiments import plots\nplots.write_plots()\n") == []


@pytest.mark.parametrize("extra, expected", [(0, []), (1, [("f", MAX_BODY_LINES + 1)])])
def test_length_check_counts_the_body_only(extra, expected):
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_BODY_LINES + extra))
    nested = "    def g():\n" + "".join(f"        y{i} = {i}\n" for i in range(50))
    source = f'def f():\n    """A\n    docstring."""\n{nested}{body}'
    assert long_functions(source) == expected
