"""The layers of the product, checked from the source: producers -> run format <- consumers, and no cycle.

Nodes are the top-level packages, with ``rlhf_core`` split into its layers (``runformat``, ``stability``,
``train``, ``cli``, ``tiny_model``). Every import counts, at module level or inside a function, so a cycle
cannot hide behind a lazy import.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("rlhf_core", "profiler", "dashboard", "memory", "adapters")
# what each layer may import from the project; anything else is a new dependency to think about first
ALLOWED = {
    "rlhf_core": {"rlhf_core.runformat"},
    "rlhf_core.runformat": set(),
    "rlhf_core.stability": {"rlhf_core.runformat"},
    "rlhf_core.tiny_model": set(),
    "profiler": {"rlhf_core.runformat", "rlhf_core.stability"},
    "memory": {"rlhf_core.runformat", "rlhf_core.tiny_model", "profiler"},
    "rlhf_core.train": {"rlhf_core.runformat", "rlhf_core.stability", "rlhf_core.tiny_model", "profiler", "memory"},
    "adapters": {"rlhf_core.runformat", "rlhf_core.stability", "rlhf_core.train", "rlhf_core.tiny_model", "profiler",
                 "memory"},
    "dashboard": {"rlhf_core.runformat", "rlhf_core.stability", "profiler", "memory"},
    "rlhf_core.cli": {"rlhf_core.runformat", "rlhf_core.stability", "rlhf_core.train"},
}


def node(module: str) -> str:
    parts = module.split(".")
    if parts[0] != "rlhf_core":
        return parts[0]
    return ".".join(parts[:2]) if len(parts) > 1 else "rlhf_core"


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def imported(path: Path) -> list[tuple[str, int]]:
    """Every module ``path`` imports (relative imports resolved), with its line."""
    mod = module_name(path)
    package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    out = []
    for n in ast.walk(ast.parse(path.read_text())):
        if isinstance(n, ast.Import):
            out += [(a.name, n.lineno) for a in n.names]
        elif isinstance(n, ast.ImportFrom):
            if n.level:
                base = package[: len(package) - n.level + 1]
                out.append((".".join(base + ([n.module] if n.module else [])), n.lineno))
            else:
                out.append((n.module or "", n.lineno))
    return out


def edges() -> dict[tuple[str, str], str]:
    """(from layer, to layer) -> one place that makes the edge."""
    found: dict[tuple[str, str], str] = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            src = node(module_name(path))
            for target, line in imported(path):
                if target.split(".")[0] in PACKAGES and node(target) != src:
                    found.setdefault((src, node(target)), f"{path.relative_to(ROOT)}:{line}")
    return found


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        state[n] = 2
        stack.pop()
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


def test_no_package_cycle():
    graph: dict[str, set[str]] = {}
    for a, b in edges():
        graph.setdefault(a, set()).add(b)
    assert cycle(graph) is None, f"package cycle: {' -> '.join(cycle(graph) or [])}"


def test_each_layer_imports_only_what_it_may():
    found = edges()
    assert {a for a, _ in found} <= set(ALLOWED), "a new layer: add it to ALLOWED"
    bad = [f"{a} -> {b} ({where})" for (a, b), where in sorted(found.items()) if b not in ALLOWED[a]]
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def test_run_format_and_stability_stay_torch_free():
    mods = [module_name(p) for layer in ("runformat", "stability") for p in (ROOT / "rlhf_core" / layer).rglob("*.py")]
    code = (f"import importlib, sys\nfor m in {sorted(mods)!r}: importlib.import_module(m)\n"
            "heavy = sorted(k for k in ('torch', 'transformers', 'trl', 'dash', 'plotly') if k in sys.modules)\n"
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"the run format / stability layer imported {out.stdout.strip()}"


# Third-party packages worth deferring: heavy to import, or optional (an extra the importer may lack).
DEFERRED = {"torch", "transformers", "trl", "accelerate", "peft", "datasets", "tokenizers", "dash", "plotly", "flask",
            "werkzeug", "triton", "ray", "tensorboard", "deepspeed", "selenium", "pandas", "pyarrow", "tsdownsample",
            "numpy", "orjson", "yaml", "pynvml", "rich", "tqdm", "psutil"}


def _import_sites(path: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """(modules imported at module level, (module, line) imported inside a function and not marked ``# lazy:``).

    ``if TYPE_CHECKING:`` blocks do not count; ``from a import b`` names module ``a.b`` when that is a module."""
    mod = module_name(path)
    package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    lines = path.read_text().splitlines()
    top: list[str] = []
    lazy: list[tuple[str, int]] = []

    def targets(n: ast.Import | ast.ImportFrom) -> list[str]:
        if isinstance(n, ast.Import):
            return [a.name for a in n.names]
        base = ".".join(package[: len(package) - n.level + 1] + ([n.module] if n.module else [])) if n.level \
            else (n.module or "")
        return [f"{base}.{a.name}" if (ROOT / Path(*f"{base}.{a.name}".split("."))).with_suffix(".py").exists()
                else base for a in n.names]

    def walk(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                marked = any("# lazy:" in lines[i - 1] for i in range(child.lineno, (child.end_lineno or 0) + 1))
                if not in_function:
                    top.extend(targets(child))
                elif not marked:
                    lazy.extend((t, child.lineno) for t in targets(child))
            else:
                walk(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    walk(ast.parse("\n".join(lines)), False)
    return top, lazy


def test_function_level_imports_defer_something():
    """An import inside a function must defer a heavy or optional package that the module does not already
    import at module level (or say why on its line: ``# lazy: <reason>``). Otherwise it only hides a dependency."""
    sites = {module_name(p): (p, *_import_sites(p)) for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}

    def pulls(module: str, seen: set[str]) -> set[str]:
        while module not in sites and module.split(".")[0] in PACKAGES and "." in module:
            module = module.rpartition(".")[0]
        if module not in sites:
            return {module.split(".")[0]} & DEFERRED
        if module in seen:
            return set()
        seen.add(module)
        parents = [".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)]
        return set().union(*(pulls(t, seen) for t in sites[module][1] + parents))

    bad = [f"{path.relative_to(ROOT)}:{line} imports {target}"
           for module, (path, _, lazy) in sorted(sites.items()) for target, line in lazy
           if not pulls(target, set()) - pulls(module, set())]
    assert not bad, "function-level imports that defer nothing (move them to the top, or mark # lazy: why):\n" \
        + "\n".join(bad)
