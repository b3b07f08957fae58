"""The package's layering: `ml_assets.core` never imports Dagster, the import graph has no cycles, core
never imports orchestration or the CLI, orchestration never imports the CLI or the API, inside core a
stage imports its own or earlier stages only (CORE_STAGES), and no function of the package is longer
than 80 lines.

Everything here reads the package as it is on disk (pkgutil, ast): no list of modules is written down,
so a module added later is covered without touching this file.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import ml_assets

PACKAGE_DIR = Path(ml_assets.__file__).parent
PACKAGE = "ml_assets"
CORE = "ml_assets.core"
ORCHESTRATION = "ml_assets.orchestration"
CLI = "ml_assets.cli"
API = "ml_assets.api"
MAX_FUNCTION_LINES = 80


# --- a: importing the core leaves Dagster unimported ----------------------------------------------

# Runs in a fresh interpreter: the test process itself has imported Dagster (conftest does).
# A finder first on sys.meta_path records where the first `dagster` import came from, so a transitive
# import (core module -> third-party library -> dagster) is reported with the module that caused it.
_IMPORT_CORE = textwrap.dedent(
    """
    import importlib, json, pkgutil, sys, traceback

    first_import = {}

    class DagsterWatch:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "dagster" and not first_import:
                first_import["stack"] = "".join(traceback.format_stack(limit=40))
            return None

    sys.meta_path.insert(0, DagsterWatch())
    if "dagster" in sys.modules:
        raise SystemExit("dagster is imported before any ml_assets module: the check would be vacuous")

    import ml_assets.core as core

    errors = []
    modules = [core.__name__] + [
        m.name for m in pkgutil.walk_packages(core.__path__, core.__name__ + ".", onerror=errors.append)
    ]
    offending = None
    for name in modules:
        importlib.import_module(name)
        if "dagster" in sys.modules and offending is None:
            offending = name
    print(json.dumps({
        "modules": modules,
        "walk_errors": errors,
        "dagster_imported": "dagster" in sys.modules,
        "offending": offending,
        "stack": first_import.get("stack"),
    }))
    """
)


def test_importing_every_core_module_does_not_import_dagster():
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORT_CORE],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=PACKAGE_DIR.parent,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])

    modules = report["modules"]
    assert not report["walk_errors"], report["walk_errors"]
    # Not vacuous: the discovery found the core's modules, at every depth.
    assert {f"{CORE}.store", f"{CORE}.ingest.raw", f"{CORE}.spec.load", f"{CORE}.registry"} <= set(modules)
    assert len(modules) == len(set(modules))
    # The same modules the files on disk define.
    on_disk = {module_name(path) for path in (PACKAGE_DIR / "core").rglob("*.py")}
    assert set(modules) == on_disk

    assert not report["dagster_imported"], (
        f"importing {report['offending']} imported dagster; first import:\n{report['stack']}"
    )


# --- b: the import graph ---------------------------------------------------------------------------


def module_name(path: Path, root: Path = PACKAGE_DIR) -> str:
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(root: Path = PACKAGE_DIR) -> dict[str, set[str]]:
    """Module -> the package's modules it imports, at any depth of its code (top level, functions,
    conditional blocks). `from pkg import name` is an edge to `pkg.name` when that is a module, else to
    `pkg`; a package's `__init__` is a module like any other, so its re-exports are edges too."""
    files = {module_name(path, root): path for path in root.rglob("*.py")}
    packages = {name for name, path in files.items() if path.name == "__init__.py"}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        # The package a relative import is relative to.
        here = name if name in packages else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base_parts = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                    base = ".".join([*base_parts, *([node.module] if node.module else [])])
                else:
                    base = node.module or ""
                for alias in node.names:
                    submodule = f"{base}.{alias.name}"
                    targets.add(submodule if submodule in files else base)
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def path_between(graph: dict[str, set[str]], start: str, is_target) -> list[str] | None:
    """The shortest import chain from `start` to a module satisfying `is_target`, or None."""
    previous: dict[str, str | None] = {start: None}
    queue = [start]
    while queue:
        node = queue.pop(0)
        if node != start and is_target(node):
            chain = [node]
            while previous[chain[-1]] is not None:
                chain.append(previous[chain[-1]])
            return chain[::-1]
        for nxt in sorted(graph.get(node, ())):
            if nxt not in previous:
                previous[nxt] = node
                queue.append(nxt)
    return None


def in_layer(module: str, layer: str) -> bool:
    return module == layer or module.startswith(f"{layer}.")


def test_import_graph_reader_sees_every_kind_of_import(tmp_path):
    """The checks below are only as good as the graph: a synthetic package with each import form and a
    cycle through a function-level import and an `__init__` re-export."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from pkg.sub.leaf import thing\n")
    (pkg / "sub" / "leaf.py").write_text("def thing():\n    from pkg import top\n    return top\n")
    (pkg / "top.py").write_text("import pkg.other\nfrom . import sub\n")
    (pkg / "other.py").write_text("from .sub import thing\nimport json\n")

    graph = import_graph(pkg)

    assert graph == {
        "pkg": set(),
        "pkg.sub": {"pkg.sub.leaf"},
        "pkg.sub.leaf": {"pkg.top"},
        "pkg.top": {"pkg.other", "pkg.sub"},
        "pkg.other": {"pkg.sub"},
    }
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1]
    assert all(b in graph[a] for a, b in zip(cycle, cycle[1:], strict=False))
    assert find_cycle({**graph, "pkg.sub.leaf": set()}) is None
    assert path_between(graph, "pkg.other", lambda m: m == "pkg.top") == [
        "pkg.other",
        "pkg.sub",
        "pkg.sub.leaf",
        "pkg.top",
    ]


def test_package_import_graph_is_read_whole():
    graph = import_graph()
    on_disk = {module_name(path) for path in PACKAGE_DIR.rglob("*.py")}
    assert set(graph) == on_disk
    # Not vacuous: the layers exist and depend on each other the intended way.
    assert any(in_layer(t, CORE) for t in graph[CLI]) and any(in_layer(t, ORCHESTRATION) for t in graph[CLI])
    assert any(
        in_layer(t, CORE) for m, targets in graph.items() if in_layer(m, ORCHESTRATION) for t in targets
    )
    assert graph[f"{CORE}.ingest"]  # a package's re-exports are edges


def test_import_graph_has_no_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_core_imports_neither_orchestration_nor_cli():
    graph = import_graph()
    core_modules = [m for m in graph if in_layer(m, CORE)]
    assert len(core_modules) > 10
    bad = {}
    for module in core_modules:
        chain = path_between(graph, module, lambda m: in_layer(m, ORCHESTRATION) or in_layer(m, CLI))
        if chain:
            bad[module] = " -> ".join(chain)
    assert not bad, f"core modules reaching orchestration or the CLI: {bad}"


def test_orchestration_does_not_import_cli():
    graph = import_graph()
    orchestration = [m for m in graph if in_layer(m, ORCHESTRATION)]
    assert len(orchestration) > 5
    bad = {}
    for module in orchestration:
        chain = path_between(graph, module, lambda m: in_layer(m, CLI))
        if chain:
            bad[module] = " -> ".join(chain)
    assert not bad, f"orchestration modules reaching the CLI: {bad}"


def test_orchestration_does_not_import_the_api():
    """The HTTP door and the Dagster layer are two doors over the core: neither imports the other."""
    graph = import_graph()
    bad = {}
    for module in graph:
        if in_layer(module, ORCHESTRATION) or in_layer(module, API):
            other = API if in_layer(module, ORCHESTRATION) else ORCHESTRATION
            chain = path_between(graph, module, lambda m, other=other: in_layer(m, other))
            if chain:
                bad[module] = " -> ".join(chain)
    assert not bad, f"orchestration and the API reaching each other: {bad}"


# --- c: inside core, a stage imports its own or earlier stages, never a later one ------------------

# The core's stages in the order the code runs them (docs/design.md, "The house"). An entry names a
# module or a package of ml_assets.core (then every module under it, unless a longer entry names it).
CORE_STAGES: list[tuple[str, ...]] = [
    # The shared bottom: the spec's models, the warehouse and its platform tables (check verdicts, model
    # versions), SQL helpers, metrics, and the model formats every later stage reads.
    (
        "errors",
        "sql",
        "hashing",
        "metrics",
        "progress",
        "figures",
        "linear",
        "store",
        "changes",
        "check_results",
        "registry",
        "spec",
    ),
    ("ingest",),
    # Loading pipeline files: a source that leaves its columns out is read (through ingest) to infer them.
    ("spec.load", "spec.infer"),
    ("validate",),
    ("dataset", "profile"),
    # Point-in-time history features, joined into the modelling table, and their guard.
    ("history", "history_guard"),
    ("features",),
    # The search (its Optuna method beside it) and one fit; a fit on a Dask cluster (LightGBM's Dask
    # interface) beside them.
    ("tuning", "tuning_optuna", "dask_fit"),
    ("train", "ablation"),
    ("evaluate",),
    # Everything a prediction needs; the gate below loads a version with its loader.
    ("serving",),
    ("promotion",),
    ("rollback",),
    # The MLflow mirror of what the registry, the gate and rollback decided.
    ("tracking",),
    # The monitors watch what serving produced (batch scores, the request log).
    ("drift", "performance", "retrain_policy"),
    # Tools of the CLI (`ml-assets init`, the report server).
    ("scaffold", "leakage", "report_server"),
]


def core_stage(module: str, stages: list[tuple[str, ...]] = CORE_STAGES) -> int | None:
    """The rank of a core module's stage (the longest entry naming it), or None when none does."""
    name = module.removeprefix(f"{CORE}.")
    best: tuple[int, int] | None = None
    for rank, entries in enumerate(stages):
        for entry in entries:
            if (name == entry or name.startswith(f"{entry}.")) and (best is None or len(entry) > best[1]):
                best = (rank, len(entry))
    return best[0] if best else None


def upward_imports(graph: dict[str, set[str]], stages: list[tuple[str, ...]] = CORE_STAGES) -> list[str]:
    """Every import of a core module by a core module of an earlier stage."""
    found = []
    for module, targets in sorted(graph.items()):
        if not in_layer(module, CORE) or module == CORE:
            continue
        for target in sorted(targets):
            if in_layer(target, CORE) and target != CORE:
                here, there = core_stage(module, stages), core_stage(target, stages)
                if here is not None and there is not None and there > here:
                    found.append(f"{module} (stage {here}) imports {target} (stage {there})")
    return found


def test_every_core_module_has_a_stage():
    graph = import_graph()
    core_modules = [m for m in graph if in_layer(m, CORE) and m != CORE]
    assert len(core_modules) > 30
    unplaced = [m for m in core_modules if core_stage(m) is None]
    assert not unplaced, f"core modules in no stage of CORE_STAGES (place them): {unplaced}"


def test_core_stages_import_earlier_stages_only():
    graph = import_graph()
    # Not vacuous: stages do import earlier ones (the gate loads with serving's loader, drift reads the
    # request log), and within a stage (tuning's fit used by train is across two).
    assert f"{CORE}.serving.loader" in graph[f"{CORE}.promotion"]
    assert f"{CORE}.serving.request_log" in graph[f"{CORE}.drift"]
    bad = upward_imports(graph)
    assert not bad, "imports of a later stage:\n" + "\n".join(bad)


def test_a_planted_upward_import_is_caught(tmp_path):
    """The check above fails on an upward import, at any depth of a module's code: planted in a copy of
    the real core (a function-level import of the serving package in dataset, as drift once had)."""
    root = tmp_path / "ml_assets"
    for path in PACKAGE_DIR.rglob("*.py"):
        copy = root / path.relative_to(PACKAGE_DIR)
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_text(path.read_text())
    assert upward_imports(import_graph(root)) == []
    dataset = root / "core" / "dataset.py"
    dataset.write_text(
        dataset.read_text() + "\n\ndef planted():\n    from ml_assets.core.serving import skew\n"
    )

    found = upward_imports(import_graph(root))

    assert found == [
        f"{CORE}.dataset (stage {core_stage(CORE + '.dataset')}) imports {CORE}.serving.skew "
        f"(stage {core_stage(CORE + '.serving.skew')})"
    ]


def test_stage_lookup_takes_the_longest_entry():
    stages = [("a",), ("b", "a.late")]
    assert core_stage(f"{CORE}.a.early", stages) == 0
    assert core_stage(f"{CORE}.a.late", stages) == 1
    assert core_stage(f"{CORE}.a.late.deeper", stages) == 1
    assert core_stage(f"{CORE}.c", stages) is None
    graph = {f"{CORE}.a.early": {f"{CORE}.a.late"}, f"{CORE}.a.late": {f"{CORE}.a.early"}}
    assert upward_imports(graph, stages) == [f"{CORE}.a.early (stage 0) imports {CORE}.a.late (stage 1)"]


# --- d: functions stay short enough to read --------------------------------------------------------


def test_no_function_is_longer_than_80_lines():
    functions = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):  # nested functions too; a factory's length includes its inner asset
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                functions.append((f"{path.relative_to(PACKAGE_DIR.parent)}:{node.lineno}", node.name, length))
    # The walk found every layer's functions.
    for layer in ("core", "orchestration"):
        assert sum(where.startswith(f"ml_assets/{layer}/") for where, _, _ in functions) > 20
    too_long = [
        f"{where} {name}() is {length} lines"
        for where, name, length in functions
        if length > MAX_FUNCTION_LINES
    ]
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(too_long)
