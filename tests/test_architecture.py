"""The shape of the package, read from its source with ``ast``: functions fit on a screen, modules import their
siblings at the top (so the import graph is what the files say), the graph has no cycle, and no module imports one
of a higher layer (docs/design.md, "Layout")."""

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

PACKAGE = Path(__file__).resolve().parents[1] / "whisper_rope"
MAX_FUNCTION_LINES = 80

#: Functions allowed to be longer than MAX_FUNCTION_LINES, each with why.
LONG_FUNCTIONS_ALLOWED: set = set()

#: Third-party libraries imported inside functions: optional, or heavy and needed by one command only.
# silero_vad: imported when a long recording is first chunked (it loads ONNX Runtime and, on import, sets torch's
# thread count, which speech_chunks restores).
LATE_IMPORTS_ALLOWED = {"matplotlib", "jiwer", "imageio_ffmpeg", "transformers", "ctranslate2", "silero_vad"}
#: Modules of the libraries above the allowlist's, imported inside functions by their full name, and why.
# torch.nn.attention.varlen: CUDA's packed attention kernel; importing it imports torch._dynamo, which would double
# the start-up of every process that only transcribes (packing.varlen_kernel).
LATE_SUBMODULES_ALLOWED = {"torch.nn.attention.varlen"}


def _modules() -> Dict[str, ast.Module]:
    """Dotted module name -> parsed source, for every module of the package."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return modules


MODULES = _modules()


def _is_package(name: str) -> bool:
    return (PACKAGE.parent / name.replace(".", "/") / "__init__.py").is_file()


def _functions(tree: ast.AST) -> Iterator[ast.FunctionDef]:
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def _imported_modules(module: str, node: ast.AST) -> List[str]:
    """The package modules an import statement names (``from .x import y`` names ``x`` and ``x.y`` if that is a
    module); third-party and standard-library imports give their top-level name prefixed with '!'."""
    if isinstance(node, ast.Import):
        return [a.name if a.name.startswith("whisper_rope") else "!" + a.name.split(".")[0] for a in node.names]
    if node.level == 0:
        if not (node.module or "").startswith("whisper_rope"):
            return ["!" + (node.module or "").split(".")[0]]
        base = node.module
    else:
        anchor = module.split(".") if _is_package(module) else module.split(".")[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join(anchor + ([node.module] if node.module else []))
    names = [base] if node.module else []
    names += [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
    return names or [base]


def _import_edges() -> Dict[str, Set[str]]:
    graph: Dict[str, Set[str]] = {name: set() for name in MODULES}
    for name, tree in MODULES.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[name].update(m for m in _imported_modules(name, node) if m in MODULES and m != name)
    return graph


def _cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One import cycle as a list of modules, or [] (depth-first search, three colours)."""
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(node: str) -> List[str]:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return stack[stack.index(target) :] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def test_no_function_is_longer_than_a_screen():
    long: List[Tuple[str, int]] = []
    for name, tree in MODULES.items():
        path = name.replace(".", "/").removeprefix("whisper_rope/") + ("/__init__.py" if _is_package(name) else ".py")
        for function in _functions(tree):
            lines = function.end_lineno - function.lineno + 1
            if lines > MAX_FUNCTION_LINES and f"{path}::{function.name}" not in LONG_FUNCTIONS_ALLOWED:
                long.append((f"{path}::{function.name}", lines))
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_the_allowlist_of_long_functions_only_shrinks():
    """An entry whose function got short (or went away) must leave the allowlist."""
    still_long = set()
    for name, tree in MODULES.items():
        path = name.replace(".", "/").removeprefix("whisper_rope/") + ("/__init__.py" if _is_package(name) else ".py")
        still_long |= {
            f"{path}::{f.name}" for f in _functions(tree) if f.end_lineno - f.lineno + 1 > MAX_FUNCTION_LINES
        }
    assert LONG_FUNCTIONS_ALLOWED <= still_long, LONG_FUNCTIONS_ALLOWED - still_long


def test_no_module_imports_inside_a_function_except_optional_heavy_libraries():
    late = []
    for name, tree in MODULES.items():
        for function in _functions(tree):
            for node in ast.walk(function):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in LATE_SUBMODULES_ALLOWED:
                    continue
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    for imported in _imported_modules(name, node):
                        if imported.lstrip("!") not in LATE_IMPORTS_ALLOWED:
                            late.append(f"{name}.{function.name} imports {imported.lstrip('!')}")
    assert not late, late


def test_the_import_graph_of_the_package_has_no_cycle():
    graph = _import_edges()
    assert graph["whisper_rope.weights.loading"] >= {"whisper_rope.weights.format", "whisper_rope.model"}
    assert not _cycle(graph), " -> ".join(_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) == []


def test_the_weights_layer_is_at_the_bottom():
    """weights/format.py reads and validates .pt files and imports nothing above it in the package: the error types,
    and the ranges the model enforces, so that a stored option is checked by the same bounds (RoPE's base from
    positional.py, the end-of-text penalty from fields.py)."""
    graph = _import_edges()
    assert graph["whisper_rope.weights.format"] <= {
        "whisper_rope.errors",
        "whisper_rope.positional",
        "whisper_rope.fields",
    }


#: The layers of docs/design.md, bottom first: a module imports only modules of its own layer or of layers before
#: it (within a layer, the cycle test above keeps the imports one way). ``NAME.*`` places every module of a
#: subpackage not named elsewhere. The command line is on top: no library module imports it.
LAYERS: List[Tuple[str, Set[str]]] = [
    ("errors and version", {"errors", "version"}),
    ("files and fields", {"fs", "fs.*", "fields", "progress"}),
    ("audio, positions, features", {"variants", "positional", "audio", "features", "packing", "adapted_lengths"}),
    ("decoding", {"decoding", "decoding.*"}),
    ("model", {"model"}),
    ("int8", {"compute_type"}),
    ("transcription", {"transcription", "transcription.*"}),
    ("data", {"data", "data.*"}),
    ("evaluation", {"evaluation", "evaluation.*"}),
    ("weights", {"weights", "weights.*"}),
    ("training", {"training", "training.*"}),
    ("experiments", {"experiments", "experiments.*"}),
    ("public API", {""}),  # whisper_rope/__init__.py
    ("command line", {"cli", "cli.*", "evaluation.__main__", "training.__main__"}),
]  # fmt: skip


def _layer(module: str) -> int:
    """The index in `LAYERS` of the package module ``module`` (its name, or else its subpackage's ``NAME.*``)."""
    short = module.removeprefix("whisper_rope").removeprefix(".")
    exact = [i for i, (_, names) in enumerate(LAYERS) if short in names]
    wildcard = [i for i, (_, names) in enumerate(LAYERS) if short.rpartition(".")[0] + ".*" in names]
    found = exact or wildcard
    assert len(found) == 1, f"{module} is in {len(found)} layers of LAYERS (add it to exactly one)"
    return found[0]


def _upward_imports(graph: Dict[str, Set[str]]) -> List[str]:
    return [
        f"{module} ({LAYERS[_layer(module)][0]}) imports {target} ({LAYERS[_layer(target)][0]})"
        for module, targets in sorted(graph.items())
        for target in sorted(targets)
        if _layer(target) > _layer(module)
    ]


def test_every_module_is_in_one_layer():
    for module in MODULES:
        _layer(module)


def test_no_module_imports_one_from_a_higher_layer():
    upward = _upward_imports(_import_edges())
    assert not upward, "\n".join(upward)


def test_the_layer_check_finds_an_upward_import():
    """The model importing the command line, or training's config importing its command, is caught."""
    upward = _upward_imports({"whisper_rope.model": {"whisper_rope.cli"}, "whisper_rope.training.config": {
        "whisper_rope.cli.finetune", "whisper_rope.weights.loading"}})  # fmt: skip
    assert upward == [
        "whisper_rope.model (model) imports whisper_rope.cli (command line)",
        "whisper_rope.training.config (training) imports whisper_rope.cli.finetune (command line)",
    ]
