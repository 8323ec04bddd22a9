"""The package's shape: imports flow one way down the layers, no cycles, no oversized modules.

Every ``import`` counts, lazy ones inside functions too: a lazy upward import is still a
dependency a newcomer has to know about.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("mlet_torchrec", "data_pipes", "launch")
MAX_LINES = 500
MAX_FUNCTION_LINES = 100

# Lowest first. A module may import its own layer and the ones before it, never a later one.
LAYERS: list[str] = [
    # foundation: no torch, no project imports
    "mlet_torchrec.errors mlet_torchrec.files mlet_torchrec.io mlet_torchrec.logs mlet_torchrec.names "
    "mlet_torchrec.stale",
    "data_pipes",  # the data set contract: schema, reader, synth, converters
    # the typed config (each model's section declared in models/configs/); the verbs' choices and defaults
    "mlet_torchrec.config mlet_torchrec.models.configs mlet_torchrec.options",
    "mlet_torchrec.ranks",  # this process's rank in its job, barrier, broadcast (torch.distributed)
    "mlet_torchrec.modules",  # MLET tables and the one W1 @ W2 routine
    "mlet_torchrec.models",  # CTR models built on them
    "mlet_torchrec.evaluation",  # metrics and scoring (training evaluates while it trains)
    "mlet_torchrec.training",  # distributed setup, plan, optimizers, loop, checkpoints
    "mlet_torchrec.serving",  # artifact loader, collapse, export
    "mlet_torchrec.experiments",  # the research layer: sweeps, reports, statistics, compression, demo
    "mlet_torchrec.cli",  # argument parsing only
    "launch",  # TorchX components
]


def layer_of(module: str) -> int:
    if module in ("mlet_torchrec", "launch"):  # empty package roots
        return 0
    best, rank = -1, -1
    for i, names in enumerate(LAYERS):
        for prefix in names.split():
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    if rank < 0:
        raise AssertionError(f"{module} belongs to no layer: add it to LAYERS in {Path(__file__).name}")
    return rank


def project_modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """Project modules ``module`` imports (the longest known prefix of each imported name)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    found = set()
    for name in names:
        parts = name.split(".")
        for n in range(len(parts), 0, -1):
            candidate = ".".join(parts[:n])
            if candidate in known:
                found.add(candidate)
                break
    found.discard(module)
    return found


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    known = set(modules)
    return {m: imports_of(m, p, known) for m, p in modules.items()}


def test_every_module_belongs_to_a_layer() -> None:
    for module in project_modules():
        layer_of(module)


def test_no_upward_imports() -> None:
    bad = [
        f"{m} (layer {LAYERS[layer_of(m)].split()[0]}) imports {d} (layer {LAYERS[layer_of(d)].split()[0]})"
        for m, deps in graph().items()
        for d in sorted(deps)
        if layer_of(d) > layer_of(m)
    ]
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_import_cycles() -> None:
    g = graph()
    # package __init__ modules re-exporting children are not edges of a cycle worth reporting
    g = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in g.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(g.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep) :] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_module_over_the_line_limit() -> None:
    long = {m: n for m, p in project_modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by responsibility): {long}"


def long_functions(modules: dict[str, Path]) -> dict[str, int]:
    """Functions (methods, nested ones too) of ``modules`` over :data:`MAX_FUNCTION_LINES` lines, by name."""
    long = {}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long[f"{name}.{node.name}"] = n
    return long


def test_no_function_in_the_library_over_100_lines() -> None:
    library = {m: p for m, p in project_modules().items() if m.split(".")[0] in ("mlet_torchrec", "data_pipes")}
    long = long_functions(library)
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines in mlet_torchrec/ or data_pipes/ (split them): {long}"


def test_the_function_length_checker_sees_methods(tmp_path: Path) -> None:
    body = "\n".join(f"        x = {i}" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "m.py").write_text(f"class C:\n    def f(self):\n{body}\n\n    def g(self):\n        pass\n")
    assert long_functions({"m": tmp_path / "m.py"}) == {"m.f": MAX_FUNCTION_LINES + 1}


def test_the_checker_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from mlet_torchrec.cli import main\n    from . import sibling\n")
    found = imports_of("mlet_torchrec.serving.m", src, {"mlet_torchrec.cli", "mlet_torchrec.serving.sibling"})
    assert found == {"mlet_torchrec.cli", "mlet_torchrec.serving.sibling"}


LIBRARY_PACKAGES = ("mlet_torchrec", "data_pipes")
FRONT_END = "mlet_torchrec.cli"
RESEARCH = "mlet_torchrec.experiments"


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _imported_names(path: Path) -> set[str]:
    """Every module name ``path`` imports, lazy imports too (``from a.b import c`` gives ``a.b`` and ``a.b.c``)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def users_of(modules: dict[str, Path], prefixes: tuple[str, ...], allowed: str) -> list[str]:
    """Modules of the library (``launch/`` has its own tools) outside ``allowed`` importing any of ``prefixes``."""
    return [
        module
        for module, path in modules.items()
        if module.split(".")[0] in LIBRARY_PACKAGES
        and not _within(module, allowed)
        and any(_within(name, prefix) for name in _imported_names(path) for prefix in prefixes)
    ]


def argparse_users(modules: dict[str, Path]) -> list[str]:
    return users_of(modules, ("argparse",), FRONT_END)


LAUNCHER = "mlet_torchrec.training.launcher"
SPAWNERS = ("torch.distributed.launcher", "torch.distributed.run", "torch.distributed.elastic", "torch.multiprocessing")
"""What starts a group of local ranks: only :data:`LAUNCHER` may use it."""


def test_one_place_starts_local_processes() -> None:
    bad = users_of(project_modules(), SPAWNERS, LAUNCHER)
    assert not bad, f"starting local ranks outside {LAUNCHER} (call its run_local): {bad}"


def spawning_tests(paths: list[Path]) -> list[str]:
    """Files among ``paths`` that import a spawner of local ranks (:data:`SPAWNERS`)."""
    return [p.name for p in paths if any(_within(name, s) for name in _imported_names(p) for s in SPAWNERS)]


def test_tests_start_local_ranks_through_the_launcher() -> None:
    bad = spawning_tests(sorted((REPO / "tests").rglob("*.py")))
    assert not bad, f"tests starting local ranks themselves (call {LAUNCHER}.run_local): {bad}"


def test_argparse_only_in_cli() -> None:
    bad = argparse_users(project_modules())
    assert not bad, f"argparse outside {FRONT_END} (declare the flags in a cli/ module): {bad}"


def test_the_library_never_imports_the_research_layer() -> None:
    bad = [
        f"{m} imports {d}"
        for m, deps in graph().items()
        if not (_within(m, RESEARCH) or _within(m, FRONT_END))
        for d in sorted(deps)
        if _within(d, RESEARCH)
    ]
    assert not bad, "the library imports the research layer (experiments/):\n" + "\n".join(bad)


def test_the_argparse_checker_sees_from_imports(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from argparse import ArgumentParser\n")
    assert argparse_users({"mlet_torchrec.serving.m": src, "mlet_torchrec.cli.m": src}) == ["mlet_torchrec.serving.m"]


def test_the_spawn_checker_sees_a_second_launcher(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text("def f():\n    import torch.multiprocessing as mp\n    from torch.distributed.run import main\n")
    found = users_of({"mlet_torchrec.serving.m": src, LAUNCHER: src, "launch.m": src}, SPAWNERS, LAUNCHER)
    assert found == ["mlet_torchrec.serving.m"]
    (tmp_path / "test_plain.py").write_text("from mlet_torchrec.training.launcher import run_local\n")
    assert spawning_tests([src, tmp_path / "test_plain.py"]) == ["m.py"]


TRAINING = REPO / "mlet_torchrec" / "training"
MAX_LOOP_LINES = 80


def training_shape(root: Path) -> tuple[list[str], dict[str, int]]:
    """``nonlocal`` statements under ``root`` and the length of every function there (``file:name``)."""
    nonlocals, lengths = [], {}
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Nonlocal):
                nonlocals.append(f"{path.name}:{node.lineno}")
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lengths[f"{path.name}:{node.name}"] = (node.end_lineno or node.lineno) - node.lineno + 1
    return nonlocals, lengths


def test_the_training_loop_fits_a_screen_and_training_has_no_closures_over_state() -> None:
    nonlocals, lengths = training_shape(TRAINING)
    assert not nonlocals, f"nonlocal in training/ (give the state to the part that owns it): {nonlocals}"
    assert lengths["trainer.py:train"] <= MAX_LOOP_LINES, lengths["trainer.py:train"]


def test_the_training_shape_checker_sees_nonlocal_and_long_functions(tmp_path: Path) -> None:
    body = "\n".join(f"        x += {i}" for i in range(130))
    (tmp_path / "m.py").write_text(f"def f():\n    x = 0\n    def g():\n        nonlocal x\n{body}\n")
    nonlocals, lengths = training_shape(tmp_path)
    assert nonlocals == ["m.py:4"] and lengths["m.py:g"] == 132 and lengths["m.py:f"] == 134
