"""The import rules of docs/architecture.md, checked on the source: every import (also those inside
functions) points down the layer order or sideways within a layer, no modules import each other in
a cycle, and no module imports another's private (underscore) names."""

import ast
import re
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
ARCHITECTURE = SRC.parent / "docs" / "architecture.md"

# lowest first; a module belongs to the layer of the longest prefix naming it
LAYERS = [
    ("ground", ["smallgpt.errors", "smallgpt.io", "smallgpt.progress", "smallgpt.device"]),
    ("data", ["smallgpt.data"]),
    ("model", ["smallgpt.model", "smallgpt.model.cache_slots"]),
    ("config", ["smallgpt.config"]),
    ("train", ["smallgpt.train"]),
    ("runs", ["smallgpt.runs"]),
    (
        "jobs",
        [
            "smallgpt.decode",
            "smallgpt.generate",
            "smallgpt.evaluate",
            "smallgpt.chat",
            "smallgpt.classify",
            "smallgpt.experiments",
            "smallgpt.export",
            "smallgpt.preparation",
            "smallgpt.serve",
            "smallgpt.serve.engine",
            "smallgpt.api",
        ],
    ),
    ("front", ["smallgpt.cli", "smallgpt.__main__", "smallgpt"]),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted((SRC / "smallgpt").rglob("*.py"))}


def layer_of(module: str) -> int:
    matches = [
        (len(prefix), index)
        for index, (_, prefixes) in enumerate(LAYERS)
        for prefix in prefixes
        if module == prefix or module.startswith(prefix + ".")
    ]
    assert matches, f"{module} is in no layer: add it to LAYERS here and to docs/architecture.md"
    return max(matches)[1]


def imports(module: str) -> list[tuple[str, int, list[str]]]:
    """(imported smallgpt module, line, names taken from it) for every import in `module`."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from ..y import z
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"  # `from smallgpt.model import hf` imports a module
                if submodule in MODULES:
                    found.append((submodule, node.lineno, []))
                else:
                    found.append((base, node.lineno, [alias.name]))
    return [(target, line, names) for target, line, names in found if target.split(".")[0] == "smallgpt"]


EDGES = {module: imports(module) for module in MODULES}


def test_every_import_points_down_or_sideways():
    upward = [
        f"{module} (line {line}, layer {LAYERS[layer_of(module)][0]}) imports {target} "
        f"(layer {LAYERS[layer_of(target)][0]})"
        for module, targets in EDGES.items()
        for target, line, _ in targets
        if layer_of(target) > layer_of(module)
    ]
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, str] = {}  # visiting | done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "visiting"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "visiting":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles():
    graph = {m: {t for t, _, _ in targets if t in MODULES and t != m} for m, targets in EDGES.items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_imports_private_names_of_another():
    private = [
        f"{module} (line {line}) imports {name} from {target}"
        for module, targets in EDGES.items()
        for target, line, names in targets
        for name in names
        if name.startswith("_") and not name.startswith("__")
    ]
    assert not private, "\n".join(private)


def test_config_validation_loads_no_conversion_code():
    code = (
        "import sys\n"
        "from smallgpt.config import load_config\n"
        "load_config(None, ['--dataset=x', '--init_from=gpt2']).validate()\n"
        "print(sorted(m for m in sys.modules if m.startswith('smallgpt.model.hf')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def documented_modules() -> set[str]:
    """The files named in the first column of docs/architecture.md's module table."""
    section = ARCHITECTURE.read_text(encoding="utf-8").split("\n## Modules\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    return {name for first_column in rows for name in re.findall(r"`([^`]+)`", first_column)}


def test_every_module_is_in_the_architecture_docs_module_table():
    files = {str(path.relative_to(SRC / "smallgpt")) for path in MODULES.values()}
    missing = sorted(files - documented_modules())
    assert not missing, f"docs/architecture.md's module table lacks: {', '.join(missing)}"


def test_the_cli_imports_every_verb_where_this_test_sees_it():
    from smallgpt.cli import COMMANDS

    verbs = [
        verb
        for entry in COMMANDS.values()
        for verb in (entry.values() if isinstance(entry, dict) else [entry])
    ]
    assert "train" in COMMANDS  # in the one table, as every other verb
    imported = {target for target, _, _ in EDGES["smallgpt.cli"]} | {"smallgpt.cli"}
    unseen = sorted({verb.function.__module__ for verb in verbs} - imported)
    assert not unseen, f"smallgpt.cli reaches these verbs' modules without an import statement: {unseen}"


def test_only_the_server_runs_a_decode_engine_in_a_process():
    """decode.py is the engine every front-end shares; its process and IPC (serve/engine.py) are the
    server's alone, and the engine does not know about them."""
    users = {
        module
        for module, targets in EDGES.items()
        for target, _, _ in targets
        if target == "smallgpt.serve.engine"
    }
    assert users and all(module.startswith("smallgpt.serve") for module in users), users
    assert not [t for t, _, _ in EDGES["smallgpt.decode"] if t.startswith("smallgpt.serve")]
    assert "multiprocessing" not in (SRC / "smallgpt" / "decode.py").read_text(encoding="utf-8")
