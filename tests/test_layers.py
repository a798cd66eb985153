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
