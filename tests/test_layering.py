"""pivotal's one-way layers and its one set of argument checks (issue 14, "One-way layers").

The structure checks read pivotal's modules with ``ast`` (imports inside functions included).
Each is a function over ``{module name: source}``; every one is also run on a synthetic bad
case, so a test that passes here is one that could have failed.
"""

from __future__ import annotations

import ast
import functools
import pathlib
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

PIVOTAL = pathlib.Path(__file__).resolve().parents[1] / "pivotal"
MAX_MODULE_LINES = 700
MAX_BODY_LINES = 80
# What pivotal may import besides itself and the standard library.
THIRD_PARTY = {"jax", "jaxlib", "optax", "chex", "numpy"}
# The only modules that may import pivotal.sharding: the package and the old-path facade.
SHARDING_IMPORTERS = {"pivotal", "pivotal.features"}


# --------------------------------------------------------------------------- reading the tree


def read_sources(root: pathlib.Path = PIVOTAL) -> dict[str, str]:
    """``{"pivotal": __init__ source, "pivotal.kmeans": ..., ...}``."""
    out = {}
    for path in sorted(root.glob("*.py")):
        name = "pivotal" if path.stem == "__init__" else f"pivotal.{path.stem}"
        out[name] = path.read_text()
    return out


def _is_package(module: str) -> bool:
    return module == "pivotal"


def imports_of(module: str, source: str) -> list[tuple[str, str | None, int]]:
    """Every import in ``source``, at any depth: ``(imported module, imported name or None, line)``.

    Relative imports are resolved against ``module``.
    """
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module if _is_package(module) else module.rsplit(".", 1)[0]
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found += [(base, alias.name, node.lineno) for alias in node.names]
    return found


def import_graph(sources: dict[str, str]) -> dict[str, set[str]]:
    """``{module: pivotal modules it imports}``. ``from pivotal import x`` is an edge to the
    submodule ``pivotal.x`` when there is one, else to the package itself (its ``__init__``)."""
    graph: dict[str, set[str]] = {name: set() for name in sources}
    for module, source in sources.items():
        for target, name, _ in imports_of(module, source):
            if name is not None and f"{target}.{name}" in sources:
                graph[module].add(f"{target}.{name}")
            elif target in sources and target != module:
                graph[module].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def _is_foundation(module: str) -> bool:
    """Package-private foundation modules (``pivotal._checks`` ...): their names may be shared."""
    return module.rsplit(".", 1)[-1].startswith("_") and not _is_package(module)


def private_imports(sources: dict[str, str]) -> list[str]:
    """Private names (leading underscore) taken from a sibling that is not a foundation module:
    ``from pivotal.x import _y``, or ``_y`` read as an attribute of an imported ``pivotal.x``."""
    bad = []
    for module, source in sources.items():
        for target, name, line in imports_of(module, source):
            if (name is not None and f"{target}.{name}" not in sources and target in sources and target != module
                    and name.startswith("_") and not _is_foundation(target)):
                bad.append(f"{module}:{line} imports {name} from {target}")
        aliases = _module_aliases(module, source, sources)
        for node in ast.walk(ast.parse(source)):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.attr.startswith("_")
                    and not node.attr.startswith("__") and node.value.id in aliases
                    and aliases[node.value.id] != module and not _is_foundation(aliases[node.value.id])):
                bad.append(f"{module}:{node.lineno} reads {node.value.id}.{node.attr}")
    return bad


def _module_aliases(module: str, source: str, sources: dict[str, str]) -> dict[str, str]:
    """``{local name: pivotal module}`` for ``from pivotal import x [as y]`` and ``import pivotal.x as y``."""
    aliases = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            for (target, name, _), alias in zip(imports_of(module, ast.unparse(node)), node.names):
                if f"{target}.{name}" in sources:
                    aliases[alias.asname or alias.name] = f"{target}.{name}"
        elif isinstance(node, ast.Import):
            aliases.update({alias.asname: alias.name for alias in node.names if alias.asname and alias.name in sources})
    return aliases


def foreign_imports(sources: dict[str, str]) -> list[str]:
    """Imports of anything but pivotal, jax/optax/chex/numpy and the standard library."""
    allowed = THIRD_PARTY | {"pivotal", "__future__"} | set(sys.stdlib_module_names)
    return [f"{module}:{line} imports {target}" for module, source in sources.items()
            for target, _, line in imports_of(module, source) if target.split(".")[0] not in allowed]


def sharding_importers(sources: dict[str, str]) -> list[str]:
    """Modules other than the package and the facade that import ``pivotal.sharding``."""
    graph = import_graph(sources)
    return sorted(m for m, targets in graph.items() if "pivotal.sharding" in targets and m not in SHARDING_IMPORTERS)


def long_modules(sources: dict[str, str], limit: int = MAX_MODULE_LINES) -> list[str]:
    return [f"{m}: {len(s.splitlines())} lines" for m, s in sources.items() if len(s.splitlines()) > limit]


def body_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]) -> int:
    """Lines of code in ``fn``'s body: no docstring, no nested function definitions, no blank or
    comment-only lines."""
    body = fn.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]
    if not body:
        return 0
    covered = set(range(body[0].lineno, body[-1].end_lineno + 1))
    for node in ast.walk(ast.Module(body=body, type_ignores=[])):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            covered -= set(range(start, node.end_lineno + 1))
    return sum(1 for i in covered if lines[i - 1].strip() and not lines[i - 1].strip().startswith("#"))


def function_sizes(sources: dict[str, str]) -> dict[str, int]:
    """``{"module.function": body lines}`` for every function, nested ones included."""
    sizes = {}
    for module, source in sources.items():
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                sizes[f"{module}.{node.name}:{node.lineno}"] = body_lines(node, lines)
    return sizes


def long_functions(sources: dict[str, str], limit: int = MAX_BODY_LINES) -> list[str]:
    return [f"{name}: {size}" for name, size in function_sizes(sources).items() if size > limit]


def definitions(sources: dict[str, str], names: set[str]) -> dict[str, list[str]]:
    """Modules defining a function named one of ``names`` (leading underscores ignored)."""
    found: dict[str, list[str]] = {}
    for module, source in sources.items():
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.lstrip("_") in names:
                found.setdefault(node.name.lstrip("_"), []).append(module)
    return found


# --------------------------------------------------------------------------- the tree as it is


SOURCES = read_sources()


def test_reads_every_module():
    assert {"pivotal", "pivotal._checks", "pivotal.kmeans", "pivotal.sharding"} <= set(SOURCES)


def test_no_import_cycle():
    assert find_cycle(import_graph(SOURCES)) is None


def test_no_private_name_taken_from_a_sibling():
    assert private_imports(SOURCES) == []


def test_only_jax_optax_chex_numpy_and_stdlib():
    assert foreign_imports(SOURCES) == []


def test_nothing_but_the_package_imports_sharding():
    assert sharding_importers(SOURCES) == []


def test_module_and_function_sizes():
    assert long_modules(SOURCES) == []
    assert long_functions(SOURCES) == []


# Argument checks live in pivotal._checks only (the names, without leading underscores, of the
# copies there used to be).
CHECK_NAMES = {"check_key", "check_int", "check_positive_int", "as_int", "check_block_size", "check_finite",
               "check_finite_array", "check_positive_finite", "check_real", "check_scalar", "leading_size",
               "num_examples", "check_losses", "check_loss_fn", "value_range", "check_indices", "as_existing",
               "as_features", "is_traced"}
# pivotal.check_finite (public API) raises on a meta step's metrics; it checks no argument.
PUBLIC_NAMESAKES = {"check_finite": ["pivotal.trainer"]}


def test_one_definition_per_check():
    found = definitions(SOURCES, CHECK_NAMES)
    assert {name: mods for name, mods in found.items()
            if [m for m in mods if m not in PUBLIC_NAMESAKES.get(name, [])] != ["pivotal._checks"]
            and mods != PUBLIC_NAMESAKES.get(name)} == {}


def test_one_restart_loop():
    # Algorithm 2's restart-on-empty loop: the only place that derives per-attempt keys.
    assert [m for m, s in SOURCES.items() if "fold_in(key, attempt)" in s] == ["pivotal.kmeans"]
    assert definitions(SOURCES, {"restart_on_empty"}) == {"restart_on_empty": ["pivotal.kmeans"]}


# --------------------------------------------------------------------------- the checks can fail


BAD = {
    "pivotal": "from pivotal import a, b\n",
    "pivotal.a": "def f():\n    from pivotal.b import g\n    return g\n",
    "pivotal.b": "import flax\nfrom pivotal.a import _hidden\n\ndef g():\n    from experiments import run\n",
    "pivotal.c": "from pivotal import sharding\nfrom pivotal import kmeans as K\nx = K._single\n" + "y = 1\n" * 700,
    "pivotal.kmeans": "from pivotal import select_meta_samples\n",
    "pivotal.sharding": "from pivotal._checks import check_int\n",
    "pivotal._checks": "def check_int():\n    pass\n",
    "pivotal.d": "from pivotal._checks import _private\nfrom . import _checks\n\ndef check_key(key):\n"
                 + '    """Doc."""\n' + "    x = 1\n" * 81,
}


def test_checks_catch_synthetic_bad_cases():
    cycle = find_cycle(import_graph(BAD))
    assert cycle is not None and cycle[0] == cycle[-1]
    assert {"pivotal.a", "pivotal.b"} <= set(cycle) or "pivotal.kmeans" in cycle
    # The function-level import alone closes a cycle, and so does importing the package itself.
    assert find_cycle(import_graph({k: BAD[k] for k in ("pivotal.a", "pivotal.b")})) is not None
    assert find_cycle(import_graph({"pivotal": BAD["pivotal"] + "from pivotal import kmeans\n",
                                    "pivotal.kmeans": BAD["pivotal.kmeans"]})) is not None
    assert find_cycle(import_graph({"pivotal.a": "import pivotal.b\n", "pivotal.b": ""})) is None
    private = private_imports(BAD)
    assert any("_hidden" in p for p in private) and any("K._single" in p for p in private)
    assert not any("_private" in p or "_checks" in p for p in private)  # foundation modules are shared
    foreign = foreign_imports(BAD)
    assert any("flax" in f for f in foreign) and any("experiments" in f for f in foreign)
    assert sharding_importers(BAD) == ["pivotal.c"]
    assert long_modules(BAD) == ["pivotal.c: 703 lines"]
    assert [f.split(":")[0] for f in long_functions(BAD)] == ["pivotal.d.check_key"]
    assert long_functions(BAD, limit=81) == []  # 81 lines: the docstring is not counted
    assert definitions(BAD, {"check_key", "check_int"}) == {"check_int": ["pivotal._checks"],
                                                          "check_key": ["pivotal.d"]}


def test_body_lines_skips_docstring_nested_functions_blanks_and_comments():
    source = ('def f(x):\n    """Doc\n    string."""\n    # why\n    y = x\n\n    def g():\n        return 1\n'
              '    @jax.jit\n    def h():\n        return 2\n    return y + g()\n')
    fn = ast.parse(source).body[0]
    assert body_lines(fn, source.splitlines()) == 2


def test_reads_a_tree_from_disk():
    with tempfile.TemporaryDirectory() as d:
        root = pathlib.Path(d)
        (root / "__init__.py").write_text("from pivotal import a\n")
        (root / "a.py").write_text("from pivotal import b\n")
        (root / "b.py").write_text("def f():\n    from pivotal.a import x\n")
        sources = read_sources(root)
        assert set(sources) == {"pivotal", "pivotal.a", "pivotal.b"}
        assert find_cycle(import_graph(sources)) == ["pivotal.a", "pivotal.b", "pivotal.a"]


# --------------------------------------------------------------------------- keys: typed and raw


def _problem():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((24, 5)).astype(np.float32)
    y = rng.integers(0, 3, 24).astype(np.int32)
    k0, k1 = jax.random.split(jax.random.PRNGKey(1))
    params = {"l1": {"kernel": 0.5 * jax.random.normal(k0, (5, 8)), "bias": jnp.zeros(8)},
              "l2": {"kernel": 0.5 * jax.random.normal(k1, (8, 3)), "bias": jnp.zeros(3)}}

    def forward(p, b):
        h = jnp.tanh(b["x"] @ p["l1"]["kernel"] + p["l1"]["bias"])
        return h, h @ p["l2"]["kernel"] + p["l2"]["bias"]

    def loss_fn(p, b):
        z = forward(p, b)[1]
        return jax.nn.logsumexp(z, -1) - jnp.take_along_axis(z, b["y"][:, None], 1)[:, 0]

    batch = {"x": jnp.asarray(x), "y": jnp.asarray(y), "index": jnp.arange(24)}
    return params, forward, loss_fn, batch


def _trainer_run(rule):
    import optax

    import pivotal

    params, _, loss_fn, batch = _problem()

    def run(key):
        trainer = pivotal.make_meta_step(loss_fn, rule, optimizer=optax.sgd(1.0), learning_rate=0.1,
                                         meta_batch_size=4)
        state = trainer.init(params, key, num_examples=24)
        state, metrics = trainer.step(state, batch, batch, key)
        return state, metrics

    return run


@functools.lru_cache(maxsize=None)
def _key_cases():
    import pivotal
    from pivotal import outofcore, sharding
    from pivotal.kmeans import seed_centroids

    params, forward, loss_fn, batch = _problem()
    h, z = forward(params, batch)
    G = np.asarray(pivotal.rbc_features(h, z, batch["y"]))
    snapshots = [params, jax.tree_util.tree_map(lambda a: 1.1 * a, params), params]
    return {
        "gbc_features": lambda key: pivotal.gbc_features(loss_fn, params, batch, key, num_layers=3,
                                                         importance_sample_size=12, return_info=True),
        "gbc_features(sketch_key)": lambda key: pivotal.gbc_features(
            loss_fn, params, batch, jax.random.key(3), num_layers=2, sketch_dim=4, sketch_key=key),
        "weighted_spherical_kmeans": lambda key: pivotal.weighted_spherical_kmeans(G, 4, key),
        "sharded_spherical_kmeans": lambda key: sharding.sharded_spherical_kmeans(G, 4, key, pivotal.data_mesh(1)),
        "seed_centroids": lambda key: seed_centroids(jnp.asarray(G), jnp.linalg.norm(G, axis=1), key, 4,
                                                     capacity=4, weighted=True, sample_size=10),
        "select_meta_samples": lambda key: pivotal.select_meta_samples(G, 3, key, existing=np.array([0])),
        "random_selection": lambda key: pivotal.random_selection(24, 5, key, existing=[1]),
        "craig_selection": lambda key: pivotal.craig_selection(G, 4, key=key, stochastic=True),
        "sketch_rbc_features": lambda key: pivotal.sketch_rbc_features(h, z, key=key, sketch_classes=2,
                                                                       sketch_dim=3),
        "kmeans_memmap": lambda key: outofcore.kmeans_memmap(G, 4, key, block_rows=7),
        "sample_snapshot_epochs": lambda key: pivotal.sample_snapshot_epochs(10, 2, 3, key),
        "history_features": lambda key: pivotal.history_features(
            pivotal.features.make_gbc_feature_fn(loss_fn, batch, num_layers=2), snapshots, key,
            best_epoch=0, num_snapshots=1, return_epochs=True),
        "direct_weights.init": lambda key: pivotal.direct_weights(weight_lr=1.0).init(key, 24),
        "meta_weight_net.init": lambda key: pivotal.meta_weight_net(hidden=4).init(key, 24),
        "make_meta_step direct init/step": _trainer_run(pivotal.direct_weights(weight_lr=1.0)),
        "make_meta_step meta_weight_net init/step": _trainer_run(pivotal.meta_weight_net(hidden=4)),
    }


KEY_CASES = ["gbc_features", "gbc_features(sketch_key)", "weighted_spherical_kmeans", "sharded_spherical_kmeans",
             "seed_centroids", "select_meta_samples", "random_selection", "craig_selection", "sketch_rbc_features",
             "kmeans_memmap", "sample_snapshot_epochs", "history_features", "direct_weights.init",
             "meta_weight_net.init", "make_meta_step direct init/step", "make_meta_step meta_weight_net init/step"]


def test_key_cases_cover_the_table():
    assert sorted(_key_cases()) == sorted(KEY_CASES)


@pytest.mark.parametrize("case", KEY_CASES)
def test_typed_and_raw_keys_give_identical_results(case):
    fn = _key_cases()[case]
    typed = jax.tree_util.tree_leaves(fn(jax.random.key(0)))
    raw = jax.tree_util.tree_leaves(fn(jax.random.PRNGKey(0)))
    assert len(typed) == len(raw) > 0
    for a, b in zip(typed, raw):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), case


@pytest.mark.parametrize("bad", [None, np.zeros(3, np.uint32), jnp.zeros(2, jnp.int32),
                                 jax.random.split(jax.random.key(0))],
                         ids=["None", "uint32(3)", "int32(2)", "two typed keys"])
@pytest.mark.parametrize("case", ["gbc_features", "weighted_spherical_kmeans", "select_meta_samples",
                                  "random_selection", "sketch_rbc_features", "kmeans_memmap",
                                  "sample_snapshot_epochs", "direct_weights.init", "meta_weight_net.init"])
def test_a_non_key_is_refused_naming_it(case, bad):
    with pytest.raises(TypeError, match="key"):
        _key_cases()[case](bad)
